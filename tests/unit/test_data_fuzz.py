"""Fuzzing the data pipeline: random and truncated files in every local format ftune reads (JSON Lines,
JSON list, plain text, Parquet, a save_to_disk directory) end in prepared data, a skip, or a DataError
that names the file and, for a row, its line; never in another exception.

Seeded (``derandomize``) and bounded in examples, so it takes a few seconds and fails the same way on
every run; to search further, raise FUZZ_EXAMPLES and drop ``derandomize`` locally.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftune.config import DataConfig
from ftune.data import prepare_data
from ftune.errors import DataError

FUZZ_EXAMPLES = 60
"""Examples per test (each one a file read and, when it holds good rows, tokenized)."""

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

WHOLE_FILE_PROBLEMS = (
    "the dataset is empty",
    "cannot be read as Parquet",
    "cannot be read as a dataset saved with Dataset.save_to_disk",
    "a plain text file holds",
    "the file holds one JSON object",
    "no training examples left",
)
"""DataErrors about the file as a whole, which name it without a line."""

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
VALIDATION_ROWS = {
    "auto": GOOD,
    "alpaca": GOOD,
    "chat": {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]},
    "text": {"text": "Hi."},
}
"""A good validation row per data.format, so only the fuzzed file can be at fault."""

clean_texts = st.text(st.characters(codec="utf-8"), max_size=12)
texts = clean_texts | st.sampled_from(["", " ", "\ud800", "\x00", "\u2028"])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]) | values,
                           "content": texts | values}),  # fmt: skip
    max_size=3,
)
rows = st.one_of(
    values,
    st.fixed_dictionaries({"instruction": texts | values, "output": texts | values}, optional={"input": texts}),
    st.fixed_dictionaries({"messages": messages | values}),
    st.fixed_dictionaries({"text": texts | values}),
)
extremes = st.one_of(  # valid JSON that Python's reader refuses: nesting past its stack, 5000-digit numbers
    st.integers(500, 3000).map(lambda depth: ("[" * depth + "]" * depth).encode()),
    st.integers(500, 3000).map(lambda depth: ('{"text": ' + "[" * depth + "1" + "]" * depth + "}").encode()),
    st.just(('{"instruction": "a", "output": ' + "9" * 5000 + "}").encode()),
)
json_lines = st.one_of(
    rows.map(lambda row: json.dumps(row).encode()),
    rows.map(lambda row: json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.binary(max_size=24),
    extremes,
)
newlines = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def cut(draw, data: bytes) -> bytes:
    """``data``, or ``data`` cut short at a random byte."""
    if not data or not draw(st.booleans()):
        return data
    return data[: draw(st.integers(0, len(data) - 1))]


@st.composite
def jsonl_files(draw) -> bytes:
    lines = draw(st.lists(json_lines, max_size=6))
    newline = draw(newlines)
    body = b"".join(line + newline for line in [json.dumps(GOOD).encode(), *lines])
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + draw(cut(body))


@st.composite
def json_list_files(draw) -> bytes:
    items = draw(st.lists(rows.map(json.dumps) | extremes.map(bytes.decode), max_size=6))
    newline = draw(newlines).decode()
    body = ("[" + newline + ("," + newline).join([json.dumps(GOOD), *items]) + newline + "]").encode()
    return draw(cut(body))


@st.composite
def text_files(draw) -> bytes:
    lines = draw(st.lists(texts.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=16), max_size=8))
    return draw(cut(draw(newlines).join([b"hello", *lines])))


def located(message: str, name: str, lines: int) -> None:
    """Fails unless ``message`` names the file and, unless it is about the whole file, a line in it."""
    assert message.startswith(name), f"the error does not start with the file name: {message}"
    places = [int(n) for n in re.findall(re.escape(name) + r"(?::|, row )(\d+)", message)]
    if not places:
        assert any(problem in message for problem in WHOLE_FILE_PROBLEMS), f"no line named: {message}"
    assert all(1 <= n <= lines for n in places), f"line out of range (file has {lines}): {message}"


class Fuzz:
    """Writes each example's file, runs ``prepare_data`` on it, and checks how it ended."""

    def __init__(self, folder: Path, tokenizer):
        self.folder = folder
        self.tokenizer = tokenizer
        self.count = itertools.count()
        self.validation = {}
        for fmt, row in VALIDATION_ROWS.items():
            self.validation[fmt] = folder / f"validation-{fmt}.jsonl"
            self.validation[fmt].write_text(json.dumps(row) + "\n", encoding="utf-8")

    def path(self, suffix: str) -> Path:
        return self.folder / f"fuzz{next(self.count)}{suffix}"

    def check(self, path: Path, lines: int, *, skip: bool, fmt: str = "auto") -> None:
        validation = str(self.validation[fmt])
        cfg = DataConfig(path=str(path), validation_path=validation, skip_bad_rows=skip, format=fmt)
        try:
            data = prepare_data(cfg, self.tokenizer)
        except DataError as e:
            located(str(e), str(path), lines)
            return
        assert all(1 <= n <= lines for n in data.stats.skipped_lines), data.stats.skipped_lines
        assert skip or not data.stats.skipped, "rows are skipped only with data.skip_bad_rows"

    def check_file(self, suffix: str, content: bytes, *, skip: bool, fmt: str = "auto", rows: int = 0) -> None:
        """Check ``content`` saved with ``suffix``: a text file by its lines, else as a table of ``rows``."""
        path = self.path(suffix)
        path.write_bytes(content)
        lines = rows or content.count(b"\n") + content.count(b"\r") + 1
        try:
            self.check(path, lines, skip=skip, fmt=fmt)
        finally:
            path.unlink()


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, tiny_tokenizer) -> Fuzz:
    return Fuzz(tmp_path_factory.mktemp("fuzz"), tiny_tokenizer)


formats = st.sampled_from(["auto", "auto", "alpaca", "chat", "text"])


@FUZZ
@given(content=jsonl_files(), skip=st.booleans(), fmt=formats)
def test_json_lines(fuzz, content, skip, fmt):
    fuzz.check_file(".jsonl", content, skip=skip, fmt=fmt)


@FUZZ
@given(content=json_list_files() | jsonl_files(), skip=st.booleans(), fmt=formats)
def test_json(fuzz, content, skip, fmt):
    fuzz.check_file(".json", content, skip=skip, fmt=fmt)


@FUZZ
@given(content=text_files(), skip=st.booleans(), fmt=formats)
def test_plain_text(fuzz, content, skip, fmt):
    fuzz.check_file(".txt", content, skip=skip, fmt=fmt)


def parquet_bytes(table_rows: list) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(table_rows), out)
    return out.getvalue()


parquet_rows = st.lists(  # Arrow strings are UTF-8: no lone surrogates
    st.fixed_dictionaries(
        {"instruction": clean_texts, "output": clean_texts | st.none()}, optional={"input": clean_texts}
    ),
    min_size=1,
    max_size=5,
) | st.lists(
    st.fixed_dictionaries({"text": clean_texts | st.none(), "other": st.integers(-5, 5)}), min_size=1, max_size=5
)


@FUZZ
@given(table_rows=parquet_rows, data=st.data(), skip=st.booleans())
def test_parquet(fuzz, table_rows, data, skip):
    content = parquet_bytes(table_rows)
    content = data.draw(cut(content) | st.binary(max_size=64).map(lambda junk: content[:-len(junk) or None] + junk))
    fuzz.check_file(".parquet", content, skip=skip, rows=len(table_rows))


@settings(FUZZ, max_examples=5)
@given(table_rows=parquet_rows, keep=st.integers(0, 4000), skip=st.booleans())
def test_saved_dataset(fuzz, table_rows, keep, skip):
    import shutil

    import datasets

    folder = fuzz.path("")
    datasets.Dataset.from_list(table_rows).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:keep])
    try:
        fuzz.check(folder, len(table_rows), skip=skip)
    finally:
        shutil.rmtree(folder)
