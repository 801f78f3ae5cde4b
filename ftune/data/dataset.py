"""``prepare_data``: read, check, split, tokenize, truncate and pack a dataset, and count what happened."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftune.config import DataConfig
from ftune.data.packing import pack_examples
from ftune.data.readers import Source, read_source
from ftune.data.schema import RowProblem, check_row, describe_unknown_row, detect_format
from ftune.data.split import split_rows
from ftune.data.tokenize import Example, RowTokenizer, pad_token_id, truncate
from ftune.errors import DataError

SKIP_HINT = "Fix the row, or set data.skip_bad_rows=true to skip bad rows."
_SHOWN_LINES = 10


@dataclass
class SkippedRow:
    """A bad row left out because data.skip_bad_rows is set."""

    file: str
    """The file it is in."""
    line: int
    """Its 1-based line (or row) number."""
    reason: str
    """What is wrong with it."""


@dataclass
class DataStats:
    """What ``prepare_data`` read, skipped, cut and produced."""

    source: str = ""
    """The training file, as given."""
    validation_source: str | None = None
    """The validation file, or None when validation rows were held out of the training file."""
    format: str = ""
    """Row format of the training file (alpaca, chat or text)."""
    format_origin: str = ""
    """How the format was chosen: ``set by data.format``, ``detected from line N``, ..."""
    rows_read: int = 0
    """Rows read from all files, bad ones included."""
    skipped: list[SkippedRow] = field(default_factory=list)
    """Bad rows skipped (data.skip_bad_rows), with line and reason."""
    max_seq_len: int = 0
    """Length examples were truncated to."""
    truncated: int = 0
    """Examples (train and validation) longer than max_seq_len, cut to it."""
    dropped: int = 0
    """Examples dropped because nothing trainable was left after truncation."""
    train_examples: int = 0
    """Training examples (before packing)."""
    validation_examples: int = 0
    """Validation examples."""
    train_tokens: int = 0
    """Tokens in the training examples (before packing, no padding)."""
    train_trained_tokens: int = 0
    """Training tokens that count in the loss."""
    validation_tokens: int = 0
    """Tokens in the validation examples."""
    packed_sequences: int | None = None
    """Number of packed training sequences, or None without packing."""

    @property
    def rows_skipped(self) -> int:
        """Number of bad rows skipped."""
        return len(self.skipped)

    @property
    def skipped_lines(self) -> list[int]:
        """Line (or row) numbers of the skipped rows, in the order they were met."""
        return [row.line for row in self.skipped]

    def summary(self) -> str:
        """One line for the logs: sizes, format, tokens, truncation, skipped rows, packing."""
        validation = f"from {self.validation_source}" if self.validation_source else "held out"
        parts = [
            (
                f"data: {self.train_examples} train examples from {self.source} ({self.format}, "
                f"{self.format_origin}), {self.validation_examples} validation examples {validation}"
            ),
            f"{self.train_tokens:,} train tokens, {self.train_trained_tokens:,} trained",
            (
                f"{self.truncated} truncated to {self.max_seq_len} tokens, {self.dropped} dropped with "
                "nothing left to train on"
            ),
        ]
        if self.skipped:
            files = sorted({row.file for row in self.skipped})
            lines = ", ".join(str(line) for line in self.skipped_lines[:_SHOWN_LINES])
            more = f" and {self.rows_skipped - _SHOWN_LINES} more" if self.rows_skipped > _SHOWN_LINES else ""
            parts.append(f"{self.rows_skipped} bad rows skipped (in {', '.join(files)}: lines {lines}{more})")
        if self.packed_sequences is not None:
            parts.append(f"packed into {self.packed_sequences} sequences of {self.max_seq_len} tokens")
        return "; ".join(parts)


@dataclass
class PreparedData:
    """Tokenized training and validation examples, and the statistics of how they were made."""

    train: list[Example]
    """Training examples (packed sequences when data.packing is set)."""
    validation: list[Example]
    """Validation examples, never packed, with ``prompt_ids`` and ``reference`` for alpaca and chat."""
    stats: DataStats
    """Counts of rows read, skipped, truncated, dropped, and tokens."""

    def summary(self) -> str:
        """One line for the logs (see ``DataStats.summary``)."""
        return self.stats.summary()


def prepare_data(cfg: DataConfig, tokenizer: Any) -> PreparedData:
    """Reads, checks, splits and tokenizes the dataset a config describes.

    Deterministic: the same config, files and tokenizer give the same examples on every worker.

    Args:
        cfg: The data section of the job config.
        tokenizer: The base model's Hugging Face tokenizer.

    Returns:
        The training and validation examples and their statistics.

    Raises:
        DataError: For any problem with the data, naming file, line and field and saying how to
            fix it; with data.skip_bad_rows only if no usable rows or examples remain.
    """
    stats = DataStats(max_seq_len=cfg.max_seq_len)
    train_source = read_source(cfg.path, setting="data.path", max_rows=cfg.max_rows)
    stats.source = train_source.name
    fmt, stats.format_origin, train_rows = _valid_rows(train_source, cfg, stats)
    stats.format = fmt
    if cfg.validation_path is not None:
        validation_source = read_source(
            cfg.validation_path, setting="data.validation_path", max_rows=cfg.max_validation_rows
        )
        stats.validation_source = validation_source.name
        validation_fmt, _, validation_rows = _valid_rows(validation_source, cfg, stats)
    else:
        validation_source, validation_fmt = train_source, fmt
        train_rows, validation_rows = split_rows(
            train_rows,
            fraction=cfg.validation_fraction,
            max_rows=cfg.max_validation_rows,
            seed=cfg.seed,
            source=train_source.name,
        )

    train = _tokenize(train_source, train_rows, fmt, tokenizer, cfg, stats, "training")
    validation = _tokenize(
        validation_source, validation_rows, validation_fmt, tokenizer, cfg, stats, "validation"
    )
    for example in train:
        example.prompt_ids = example.reference = None  # only evaluation generates from prompts
    stats.train_examples, stats.validation_examples = len(train), len(validation)
    stats.train_tokens = sum(len(example.input_ids) for example in train)
    stats.train_trained_tokens = sum(example.num_trained for example in train)
    stats.validation_tokens = sum(len(example.input_ids) for example in validation)
    if cfg.packing:
        train = pack_examples(train, cfg.max_seq_len, pad_token_id(tokenizer))
        stats.packed_sequences = len(train)
    return PreparedData(train=train, validation=validation, stats=stats)


def _bad_row(source: Source, line: int, problem: RowProblem, cfg: DataConfig, stats: DataStats) -> None:
    """Raises the located DataError for a bad row, or records it as skipped."""
    reason = str(problem).rstrip(". ")
    if not problem.skippable:
        raise DataError(f"{source.where(line)}: {reason}.") from None
    if not cfg.skip_bad_rows:
        raise DataError(f"{source.where(line)}: {reason}. {SKIP_HINT}") from None
    stats.skipped.append(SkippedRow(source.name, line, reason))


def _valid_rows(source: Source, cfg: DataConfig, stats: DataStats) -> tuple[str, str, list[tuple[int, Any]]]:
    """Checks every row of a source; returns (format, how it was chosen, [(line, row), ...])."""
    stats.rows_read += len(source.rows)
    fmt: str | None
    if source.fixed_format is not None:
        if cfg.format not in ("auto", source.fixed_format):
            raise DataError(
                f"{source.name}: a plain text file holds {source.fixed_format} rows (one per paragraph), "
                f"but data.format is {cfg.format}; set data.format=auto, or convert the file to JSON Lines "
                f"with {cfg.format} rows."
            )
        fmt, origin = source.fixed_format, "from the .txt file type"
    elif cfg.format != "auto":
        fmt, origin = cfg.format, "set by data.format"
    else:
        detected = detect_format([(row.line, row.value) for row in source.rows if row.error is None])
        fmt, origin = (detected[0], f"detected from {source.unit} {detected[1]}") if detected else (None, "")

    valid: list[tuple[int, Any]] = []
    for row in source.rows:
        try:
            if row.error is not None:
                raise RowProblem(row.error)
            if fmt is None:
                raise describe_unknown_row(row.value)
            check_row(row.value, fmt, origin)
        except RowProblem as problem:
            _bad_row(source, row.line, problem, cfg, stats)
            continue
        valid.append((row.line, row.value))
    if not valid:
        first = next(s for s in stats.skipped if s.file == source.name)
        raise DataError(
            f"{source.name}: every row is bad ({len(source.rows)} skipped), so there is nothing to train on; "
            f"the first: {source.where(first.line)}: {first.reason}. Fix the rows, or check that "
            "the path points at the right file."
        )
    assert fmt is not None  # a valid row implies a format
    return fmt, origin, valid


def _tokenize(
    source: Source,
    rows: list[tuple[int, Any]],
    fmt: str,
    tokenizer: Any,
    cfg: DataConfig,
    stats: DataStats,
    split: str,
) -> list[Example]:
    """Tokenizes and truncates the rows of one split, skipping or raising on bad ones."""
    row_tokenizer = RowTokenizer(tokenizer, fmt, mask_prompt=cfg.mask_prompt)
    if fmt == "chat" and not row_tokenizer.has_chat_template:
        raise DataError(
            f"{source.name}: chat rows are rendered with the tokenizer's chat template, and this tokenizer "
            "has none; use a model that ships a chat template (e.g. an instruct model), or convert the "
            "rows to alpaca or text format."
        )
    examples: list[Example] = []
    dropped = skipped = 0
    longest = 0
    for (line, _), result in zip(rows, row_tokenizer.tokenize(value for _, value in rows)):
        if isinstance(result, RowProblem):
            _bad_row(source, line, result, cfg, stats)
            skipped += 1
            continue
        longest = max(longest, len(result.input_ids))
        example, was_cut = truncate(result, cfg.max_seq_len)
        stats.truncated += was_cut
        if example.num_trained == 0:
            dropped += 1
            continue
        examples.append(example)
    stats.dropped += dropped
    if not examples:
        why = []
        if dropped:
            why.append(
                f"{dropped} had no answer tokens left after truncation to data.max_seq_len={cfg.max_seq_len} "
                f"(the longest has {longest} tokens); raise data.max_seq_len or shorten the prompts"
            )
        if skipped:
            why.append(f"{skipped} were skipped as bad rows")
        raise DataError(f"{source.name}: no {split} examples left out of {len(rows)} rows: {'; '.join(why)}.")
    return examples
