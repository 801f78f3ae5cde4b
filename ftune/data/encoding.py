"""Tell a dataset file that is not UTF-8 text (UTF-16, UTF-32, binary) from its first bytes, and say how
to convert it, before its lines are read as garbage rows."""

from __future__ import annotations

from pathlib import Path

from ftune.errors import DataError

SNIFF_BYTES = 4096
"""How much of the file's start is looked at."""

_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian, with a byte-order mark)", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian, with a byte-order mark)", "UTF-32"),
    (b"\xff\xfe", "UTF-16 (little-endian, with a byte-order mark)", "UTF-16"),
    (b"\xfe\xff", "UTF-16 (big-endian, with a byte-order mark)", "UTF-16"),
)
"""Byte-order marks, longest first: UTF-32's little-endian mark starts with UTF-16's."""


def sniff_encoding(head: bytes) -> tuple[str, str | None] | None:
    """Names the encoding of a file starting with ``head`` when it is plainly not UTF-8.

    Returns:
        ``(description, iconv name)`` for UTF-16/UTF-32 text, ``("binary data", None)`` for a start
        made largely of NUL bytes in no UTF-16 pattern, or None (UTF-8, or no telling from NULs).
    """
    for bom, description, iconv in _BOMS:
        if head.startswith(bom):
            return description, iconv
    nuls = head.count(0)
    if nuls * 4 < len(head) or not head:
        return None  # a few NULs are a bad row's problem, not the file's
    odd, even = head[1::2].count(0), head[0::2].count(0)
    if even * 20 < odd:  # ASCII in UTF-16LE: every second byte, from the second, is NUL
        return "UTF-16 (little-endian, without a byte-order mark)", "UTF-16LE"
    if odd * 20 < even:
        return "UTF-16 (big-endian, without a byte-order mark)", "UTF-16BE"
    return "binary data", None


def check_text_file(path: Path, name: str, setting: str) -> None:
    """Refuses a text dataset (.jsonl, .json, .txt) that is UTF-16, UTF-32 or binary.

    Raises:
        DataError: naming the file, the encoding found and the command that converts it.
    """
    with path.open("rb") as f:
        found = sniff_encoding(f.read(SNIFF_BYTES))
    if found is None:
        return
    description, iconv = found
    if iconv is None:
        raise DataError(
            f"{name}:1: the file holds binary data (NUL bytes), not UTF-8 text; check that {setting} "
            f"points at the dataset, and that a Parquet file's name ends in .parquet."
        )
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    raise DataError(
        f"{name}:1: the file is {description}, not UTF-8; convert it, e.g. "
        f"`iconv -f {iconv} -t UTF-8 {path} > {converted}`, and point {setting} at the converted file."
    )
