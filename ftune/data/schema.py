"""Row schemas (alpaca, chat, text): format detection and per-row checks that name the bad field."""

from __future__ import annotations

from typing import Any

FORMATS = ("alpaca", "chat", "text")
"""Row formats a dataset may use."""

CHAT_ROLES = ("system", "user", "assistant")
"""Roles allowed in a chat row's messages."""

REQUIREMENTS = {
    "alpaca": "alpaca rows need 'instruction' and 'output' strings and may have an 'input' string",
    "chat": 'chat rows need \'messages\': a list of {"role": ..., "content": ...} objects '
    "with at least one assistant turn",
    "text": "text rows need a 'text' string",
}
"""What a row of each format must hold, appended to messages about a missing or wrong field."""

_KEYS = {"alpaca": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}


class RowProblem(Exception):
    """What is wrong with one row; ``ftune.data`` turns it into a located DataError or a skip.

    Attributes:
        skippable: False for problems that are not the row's fault (e.g. a chat template that
            cannot be split into turns), which data.skip_bad_rows must not hide.
    """

    def __init__(self, message: str, *, skippable: bool = True) -> None:
        super().__init__(message)
        self.skippable = skippable


def json_type(value: Any) -> str:
    """Names a decoded value's type the way a JSON user would (``a number``, ``null``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def guess_format(row: dict) -> str | None:
    """The format a row's keys suggest (``messages`` -> chat, ``instruction``/``output`` -> alpaca,
    ``text`` -> text), or None when no known key is present."""
    for fmt in ("chat", "alpaca", "text"):
        if any(key in row for key in _KEYS[fmt]):
            return fmt
    return None


def check_row(value: Any, fmt: str, origin: str = "set by data.format") -> None:
    """Checks one decoded row against a format.

    Args:
        value: The decoded row.
        fmt: ``alpaca``, ``chat`` or ``text``.
        origin: How the format was chosen, for the mismatch message (e.g. ``detected from line 1``).

    Raises:
        RowProblem: Naming the field that is wrong, what is wrong with it and what is expected.
    """
    if not isinstance(value, dict):
        raise RowProblem(
            f"the row is {json_type(value)}, not an object; {REQUIREMENTS[fmt]}, e.g. " + _EXAMPLES[fmt]
        )
    if not any(key in value for key in _KEYS[fmt]):
        other = guess_format(value)
        keys = ", ".join(repr(k) for k in list(value)[:8]) or "none"
        if other is not None:
            raise RowProblem(
                f"field {_KEYS[fmt][0]!r} is missing: the row looks like {other} data (keys {keys}) but "
                f"the dataset's format is {fmt} "
                f"({origin}); use one format per file, or set data.format to match the rows"
            )
        if origin.startswith("set by"):
            raise RowProblem(f"field {_KEYS[fmt][0]!r} is missing (row keys: {keys}); {REQUIREMENTS[fmt]}")
        raise RowProblem(
            f"field {_KEYS[fmt][0]!r} is missing (row keys: {keys}); the dataset's format is {fmt} "
            f"({origin}) and {REQUIREMENTS[fmt]}"
        )
    _CHECKS[fmt](value)


def describe_unknown_row(value: Any) -> RowProblem:
    """The problem of a row in a dataset whose format could not be detected."""
    if isinstance(value, dict):
        fmt = guess_format(value)
        if fmt is not None:
            try:
                check_row(value, fmt, origin="guessed from this row's keys")
            except RowProblem as problem:
                return problem
        keys = ", ".join(repr(k) for k in list(value)[:8]) or "none"
        return RowProblem(
            f"cannot tell the row format from its keys ({keys}); expected alpaca ('instruction', "
            "'input', 'output'), chat ('messages') or text ('text') rows. Rename the keys, or set "
            "data.format"
        )
    return RowProblem(
        f"the row is {json_type(value)}, not an object; each row must be an object such as "
        + _EXAMPLES["alpaca"]
    )


def _string_field(row: dict, key: str, *, required: bool, label: str | None = None) -> None:
    label = label or key
    if key not in row or (not required and row[key] is None):
        if required:
            raise RowProblem(f"field {label!r} is missing")
        return
    value = row[key]
    if not isinstance(value, str):
        hint = (
            f'; quote it: "{value}"'
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else ""
        )
        raise RowProblem(f"field {label!r} must be a string, got {json_type(value)}{hint}")
    if required and not value.strip():
        raise RowProblem(f"field {label!r} is empty; it must contain text")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = f"{value[e.start]!r} at character {e.start + 1}"
            raise RowProblem(
                f"field {label!r} holds an unpaired surrogate ({bad}), which is not text: a JSON "
                "\\ud800-\\udfff escape must come in a high-low pair; fix or remove the escape"
            ) from None


def _check_alpaca(row: dict) -> None:
    try:
        _string_field(row, "instruction", required=True)
        _string_field(row, "input", required=False)
        _string_field(row, "output", required=True)
    except RowProblem as problem:
        raise RowProblem(f"{problem} ({REQUIREMENTS['alpaca']})") from None


def _check_text(row: dict) -> None:
    try:
        _string_field(row, "text", required=True)
    except RowProblem as problem:
        raise RowProblem(f"{problem} ({REQUIREMENTS['text']})") from None


def _check_chat(row: dict) -> None:
    messages = row["messages"]
    if not isinstance(messages, list):
        raise RowProblem(
            f"field 'messages' must be a list, got {json_type(messages)} ({REQUIREMENTS['chat']})"
        )
    if not messages:
        raise RowProblem(f"field 'messages' is an empty list ({REQUIREMENTS['chat']})")
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RowProblem(
                f"field {field!r} must be an object with 'role' and 'content', got {json_type(message)}"
            )
        role = message.get("role")
        if "role" not in message:
            raise RowProblem(f"field '{field}.role' is missing; allowed roles: {', '.join(CHAT_ROLES)}")
        if role not in CHAT_ROLES:
            shown = repr(role) if isinstance(role, str) else json_type(role)
            raise RowProblem(
                f"field '{field}.role' is {shown}, not an allowed role; "
                f"allowed roles: {', '.join(CHAT_ROLES)}"
            )
        _string_field(message, "content", required=True, label=f"{field}.content")
    if not any(message["role"] == "assistant" for message in messages):
        raise RowProblem(
            "field 'messages' has no assistant turn; every chat row needs at least one message with "
            "role 'assistant' (the text the model learns to produce)"
        )


_CHECKS = {"alpaca": _check_alpaca, "chat": _check_chat, "text": _check_text}

_EXAMPLES = {
    "alpaca": '{"instruction": "...", "input": "", "output": "..."}',
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "text": '{"text": "..."}',
}


def detect_format(rows: list[tuple[int, Any]]) -> tuple[str, int] | None:
    """Detects the format from the first row that is valid under the format its keys suggest.

    Args:
        rows: ``(line, decoded value)`` pairs in file order; undecodable rows left out.

    Returns:
        ``(format, line)`` of the row it was detected from, or None when no row is valid.
    """
    for line, value in rows:
        if not isinstance(value, dict):
            continue
        fmt = guess_format(value)
        if fmt is None:
            continue
        try:
            check_row(value, fmt)
        except RowProblem:
            continue
        return fmt, line
    return None
