"""Read raw dataset rows, each with the 1-based line (or row) number it came from.

Supported sources: JSON Lines (``.jsonl``; ``.json`` holding JSON Lines or one top-level list),
plain text (``.txt``, one example per blank-line-separated paragraph), Parquet (``.parquet``), a
directory written by ``datasets.Dataset.save_to_disk``, a hub dataset (``hf:NAME[:SPLIT]``) and
``builtin:`` names. Readers never judge a row's schema; a line that is not even JSON becomes a
``RawRow`` with ``error`` set, so ``data.skip_bad_rows`` can skip it like any other bad row.

Text files must be UTF-8: a UTF-16, UTF-32 or binary file is refused as a whole, with the command
that converts it. A line ends at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (old Mac files), as editors count.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ftune.data.encoding import check_text_file
from ftune.errors import DataError

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
"""File extensions read by ``read_source`` (directories and ``hf:`` / ``builtin:`` names aside)."""

_WHITESPACE = re.compile(r"\s*")
_UNDECODABLE = re.compile("[\udc80-\udcff]")
"""Bytes that are not UTF-8, as the ``surrogateescape`` error handler keeps them."""


@dataclass
class RawRow:
    """One row as read from the source, before any schema check."""

    line: int
    """1-based line in the file (JSON Lines, JSON list, text) or row index + 1 (Parquet, datasets)."""
    value: Any = None
    """The decoded row, normally a dict; None when ``error`` is set."""
    error: str | None = None
    """Why the row could not be decoded at all (e.g. invalid JSON); None for a decoded row."""


@dataclass
class Source:
    """The rows of one dataset file, and how to point at one of them in a message."""

    name: str
    """The path as shown to the user in messages."""
    rows: list[RawRow] = field(default_factory=list)
    """Rows in file order."""
    unit: Literal["line", "row"] = "line"
    """Whether ``RawRow.line`` is a line of a text file or the index + 1 of a table row."""
    fixed_format: str | None = None
    """Row format implied by the file type (``text`` for ``.txt``), else None."""

    def where(self, line: int) -> str:
        """Location of a row for messages: ``file:17`` or ``file, row 17``."""
        return f"{self.name}:{line}" if self.unit == "line" else f"{self.name}, row {line}"


def read_source(path: str, *, setting: str = "data.path", max_rows: int | None = None) -> Source:
    """Reads the raw rows of a dataset.

    Args:
        path: A file path, a ``save_to_disk`` directory, ``hf:NAME[:SPLIT]`` or a ``builtin:`` name.
        setting: The config key the path came from, named in messages (``data.path``,
            ``data.validation_path``).
        max_rows: Read only the first this many rows (bad rows count); None reads them all.

    Returns:
        The rows with their line numbers.

    Raises:
        DataError: The path does not exist, has an unsupported type, cannot be parsed as a whole,
            or holds no rows.
    """
    if path.startswith("builtin:"):
        from ftune.builtin_assets import resolve_builtin

        try:
            path = resolve_builtin(path)
        except ValueError as e:
            raise DataError(f"{setting}: {e}") from e
    if path.startswith("hf:"):
        source = _read_hub(path, setting, max_rows)
    else:
        source = _read_local(path, setting, max_rows)
    if not source.rows:
        raise DataError(
            f"{source.name}: the dataset is empty (no rows found); point {setting} at a file with data."
        )
    return source


def _read_local(path: str, setting: str, max_rows: int | None) -> Source:
    local = Path(path).expanduser()
    if not local.exists():
        raise DataError(
            f"{path}: data file not found (absolute path {local.absolute()}); "
            f"check {setting}: it must be an existing file, a save_to_disk directory, "
            "hf:NAME[:SPLIT] or builtin:sample-instructions."
        )
    if local.is_dir():
        return _read_saved_dataset(local, path, setting, max_rows)
    suffix = local.suffix.lower()
    if suffix in (".jsonl", ".json", ".txt"):
        check_text_file(local, path, setting)
    if suffix == ".jsonl":
        return _read_json_lines(local, path, max_rows)
    if suffix == ".json":
        return _read_json(local, path, max_rows)
    if suffix == ".txt":
        return _read_text(local, path, max_rows)
    if suffix == ".parquet":
        return _read_parquet(local, path, max_rows)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; {setting} must end in "
        f"{', '.join(SUFFIXES)}, or be a save_to_disk directory or hf:NAME[:SPLIT]. "
        "Convert the file, or rename it if it already holds one of these formats."
    )


def _lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yields ``(line, text, None)``, or ``(line, None, why)`` for a line that is not UTF-8 text.

    ``\\n``, ``\\r\\n`` and a lone ``\\r`` all end a line; the text keeps one ``\\n`` at its end.
    """
    with path.open(encoding="utf-8", errors="surrogateescape", newline=None) as f:
        for line, text in enumerate(f, start=1):
            bad = _UNDECODABLE.search(text)
            if bad is not None:
                yield line, None, (
                    f"not valid UTF-8 text (bad byte at column {bad.start() + 1}); save the file as UTF-8"
                )
            elif "\x00" in text:
                yield line, None, (
                    f"a NUL byte at column {text.index(chr(0)) + 1}, which text never holds (binary data, "
                    "or a UTF-16 file?); save the file as UTF-8 text"
                )
            else:
                yield line, (text.lstrip("\ufeff") if line == 1 else text), None


def _too_deep(what: str) -> str:
    return (
        f"{what} nested deeper than the JSON reader allows (about {sys.getrecursionlimit()} levels of "
        "lists and objects); rows hold strings, so check for a run of unclosed [ or {"
    )


def _read_json_lines(path: Path, name: str, max_rows: int | None) -> Source:
    source = Source(name)
    for line, text, error in _lines(path):
        if max_rows is not None and len(source.rows) >= max_rows:
            break
        if error is not None:
            source.rows.append(RawRow(line, error=error))
            continue
        if not text.strip():
            continue  # blank lines are not rows
        try:
            source.rows.append(RawRow(line, json.loads(text)))
        except json.JSONDecodeError as e:
            error = f"invalid JSON: {e.msg} (column {e.colno}); each line must hold one complete JSON object"
            source.rows.append(RawRow(line, error=error))
        except RecursionError:
            source.rows.append(RawRow(line, error=_too_deep("the line is")))
        except ValueError as e:  # valid syntax Python will not read, e.g. an integer of 5000 digits
            source.rows.append(RawRow(line, error=f"unreadable JSON: {e}"))
    return source


def _read_json(path: Path, name: str, max_rows: int | None) -> Source:
    raw = path.read_bytes()
    if raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            text = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as e:
            line = _one_newline(raw[: e.start].decode("utf-8")).count("\n") + 1
            raise DataError(f"{name}:{line}: not valid UTF-8 text; save the file as UTF-8.") from e
        text = _one_newline(text)  # JSON reads \r as blank space; line numbers count it as a line end
        return _read_json_list(text, _WHITESPACE.match(text).end(), name, max_rows)
    source = _read_json_lines(path, name, max_rows)
    if source.rows and source.rows[0].error is not None:
        # Not JSON Lines; maybe one pretty-printed object (e.g. {"data": [...]}): say so plainly.
        try:
            whole = json.loads(raw.decode("utf-8", errors="replace").lstrip("\ufeff"))
        except (ValueError, RecursionError):
            return source
        if isinstance(whole, dict):
            keys = ", ".join(repr(k) for k in list(whole)[:8])
            raise DataError(
                f"{name}: the file holds one JSON object (keys {keys}), not rows; a .json dataset must be "
                "JSON Lines (one object per line) or a list of row objects. If the rows sit under one "
                "key, save that list on its own."
            )
    return source


def _one_newline(text: str) -> str:
    """``\\r\\n`` and a lone ``\\r`` as ``\\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_json_list(text: str, start: int, name: str, max_rows: int | None) -> Source:
    """Parses a top-level JSON list element by element to know the line each row starts on."""
    source = Source(name)
    decoder = json.JSONDecoder()
    counted_to, line = 0, 1

    def fail(e: json.JSONDecodeError) -> DataError:
        return DataError(
            f"{name}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}). A .json file holding a list "
            "must be valid JSON as a whole, so bad rows in it cannot be skipped; fix the file "
            "(or convert it to JSON Lines, where data.skip_bad_rows can skip bad lines)."
        )

    pos = _WHITESPACE.match(text, start + 1).end()
    if text[pos : pos + 1] == "]":
        return source
    while max_rows is None or len(source.rows) < max_rows:
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise fail(e) from e
        except RecursionError as e:
            raise DataError(f"{name}:{line}: {_too_deep('the row starting here is')}.") from e
        except ValueError as e:  # valid syntax Python will not read, e.g. an integer of 5000 digits
            raise DataError(f"{name}:{line}: unreadable JSON: {e}; fix the row.") from e
        source.rows.append(RawRow(line, value))
        pos = _WHITESPACE.match(text, end).end()
        separator = text[pos : pos + 1]
        if separator == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
            continue
        if separator == "]":
            break
        raise fail(json.JSONDecodeError("Expecting ',' or ']' after a list element", text, pos))
    return source


def _read_text(path: Path, name: str, max_rows: int | None) -> Source:
    source = Source(name, fixed_format="text")
    paragraph: list[str] = []
    first_line = 0

    def close() -> None:
        if paragraph:
            source.rows.append(RawRow(first_line, {"text": "\n".join(paragraph)}))
            paragraph.clear()

    for line, text, error in _lines(path):
        if max_rows is not None and len(source.rows) >= max_rows:
            return source
        if error is not None:
            close()
            source.rows.append(RawRow(line, error=error))
            continue
        text = text.rstrip("\n")
        if text.strip():
            if not paragraph:
                first_line = line
            paragraph.append(text.rstrip())
        else:
            close()
    if max_rows is None or len(source.rows) < max_rows:
        close()
    return source


def _read_parquet(path: Path, name: str, max_rows: int | None) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = Source(name, unit="row")
    try:
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                if max_rows is not None and len(source.rows) >= max_rows:
                    return source
                source.rows.append(RawRow(len(source.rows) + 1, value))
    except (pa.ArrowException, OSError, ValueError) as e:  # ValueError: e.g. a string column not UTF-8
        raise DataError(
            f"{name}: cannot be read as Parquet ({e}); check that the file is a complete Parquet file, "
            "or give it the extension of the format it really holds."
        ) from e
    return source


def _rows_of_dataset(dataset: Any, name: str, max_rows: int | None) -> Source:
    count = len(dataset) if max_rows is None else min(max_rows, len(dataset))
    if count < len(dataset):
        dataset = dataset.select(range(count))
    return Source(name, [RawRow(i + 1, row) for i, row in enumerate(dataset)], unit="row")


def _read_saved_dataset(path: Path, name: str, setting: str, max_rows: int | None) -> Source:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(
            f"{name}: is a directory but not a dataset saved with Dataset.save_to_disk ({e}); point "
            f"{setting} at a data file (.jsonl, .json, .txt, .parquet) or a save_to_disk directory."
        ) from e
    except Exception as e:  # arrow, JSON and schema errors of a damaged save all mean "cannot read it"
        raise _damaged_save(name, setting, e) from e
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(
                f"{name}: the saved DatasetDict has no 'train' split (splits: {', '.join(dataset)}); "
                "save the split to train on as 'train', or save that split alone with Dataset.save_to_disk."
            )
        dataset = dataset["train"]
    try:
        return _rows_of_dataset(dataset, name, max_rows)
    except Exception as e:  # rows are read lazily from the arrow files: damage shows up here
        raise _damaged_save(name, setting, e) from e


def _damaged_save(name: str, setting: str, e: Exception) -> DataError:
    return DataError(
        f"{name}: cannot be read as a dataset saved with Dataset.save_to_disk ({type(e).__name__}: {e}); "
        f"save it again, or point {setting} at a data file (.jsonl, .json, .txt, .parquet)."
    )


def _read_hub(path: str, setting: str, max_rows: int | None) -> Source:
    """Loads ``hf:NAME[:SPLIT]`` with ``datasets.load_dataset`` (needs the hub or its local cache)."""
    import datasets

    dataset_id, _, split = path[len("hf:") :].partition(":")
    split = split or "train"
    if not dataset_id:
        raise DataError(f"{setting}: {path!r} names no dataset; write hf:NAME or hf:NAME:SPLIT.")
    if max_rows is not None and "[" not in split:
        split = f"{split}[:{max_rows}]"  # let datasets slice instead of loading every row
    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # hub, network and split errors all mean "cannot load this"
        raise DataError(
            f"{path}: cannot load hub dataset {dataset_id!r} split {split!r}: {e}. Check {setting} "
            "(name and split), network access, or that the dataset is in the local Hugging Face cache."
        ) from e
    return _rows_of_dataset(dataset, path, max_rows)
