"""The built-in sample instruction dataset: short, checkable tasks a tiny model can learn on CPU.

Every row is alpaca-style (``instruction``, ``input``, ``output``) and its output is the single
correct answer, so exact-match accuracy is meaningful. The families are deliberately narrow (a
fixed word list, small numbers, one phrasing or two per family) so that a 2-layer, width-64
model visibly learns them within a few hundred steps. Rows repeat across a 4000-row file for the
small families (capitals, next letter); that is intended: the dataset exists to show loss going
down, not to measure generalisation.

Run ``python -m ftune.sample_data --out DIR`` to write ``DIR/train.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

Row = dict[str, str]

# fmt: off
WORDS: tuple[str, ...] = (
    "apple", "bird", "boat", "bread", "cake", "cat", "chair", "cloud", "coin", "cup",
    "desk", "dog", "door", "drum", "duck", "egg", "fish", "flag", "frog", "gate",
    "goat", "hat", "horse", "house", "jam", "key", "kite", "lamp", "leaf", "lion",
    "milk", "moon", "mouse", "nest", "note", "owl", "pen", "pig", "plant", "rain",
    "ring", "river", "road", "rock", "rose", "salt", "ship", "shoe", "snow", "sock",
    "star", "stone", "sun", "table", "tea", "tiger", "train", "tree", "wolf", "zebra",
)
# fmt: on
"""Short lowercase words used by the word families; a fixed list keeps the task learnable."""

CAPITALS: tuple[tuple[str, str], ...] = (
    ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasilia"),
    ("Canada", "Ottawa"),
    ("China", "Beijing"),
    ("Egypt", "Cairo"),
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Greece", "Athens"),
    ("India", "New Delhi"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"),
    ("Mexico", "Mexico City"),
    ("Norway", "Oslo"),
    ("Peru", "Lima"),
    ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"),
    ("Spain", "Madrid"),
    ("Sweden", "Stockholm"),
)
"""Country -> capital pairs for the capital family."""

_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _add(rng: random.Random) -> Row:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return {"instruction": f"What is {a} + {b}?", "input": "", "output": str(a + b)}


def _subtract(rng: random.Random) -> Row:
    # a >= b keeps answers non-negative, so the output vocabulary stays small.
    b = rng.randint(0, 49)
    a = rng.randint(b, 99)
    return {"instruction": f"What is {a} - {b}?", "input": "", "output": str(a - b)}


def _reverse(rng: random.Random) -> Row:
    word = rng.choice(WORDS)
    return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}


def _uppercase(rng: random.Random) -> Row:
    word = rng.choice(WORDS)
    return {"instruction": "Write the word in uppercase.", "input": word, "output": word.upper()}


def _sort(rng: random.Random) -> Row:
    numbers = [rng.randint(0, 20) for _ in range(rng.choice((3, 4)))]
    return {
        "instruction": "Sort the numbers from smallest to largest.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, sorted(numbers))),
    }


def _count_letters(rng: random.Random) -> Row:
    word = rng.choice(WORDS)
    return {"instruction": "How many letters are in the word?", "input": word, "output": str(len(word))}


def _next_letter(rng: random.Random) -> Row:
    letter = rng.choice(_ALPHABET[:-1])  # 'z' has no successor
    return {
        "instruction": f"Which letter comes after {letter} in the alphabet?",
        "input": "",
        "output": _ALPHABET[_ALPHABET.index(letter) + 1],
    }


def _larger(rng: random.Random) -> Row:
    a, b = rng.sample(range(100), 2)  # distinct, so there is one right answer
    return {"instruction": f"Which number is larger: {a} or {b}?", "input": "", "output": str(max(a, b))}


def _capital(rng: random.Random) -> Row:
    country, capital = rng.choice(CAPITALS)
    return {"instruction": f"What is the capital of {country}?", "input": "", "output": capital}


FAMILIES: dict[str, Callable[[random.Random], Row]] = {
    "add": _add,
    "subtract": _subtract,
    "reverse": _reverse,
    "uppercase": _uppercase,
    "sort": _sort,
    "count_letters": _count_letters,
    "next_letter": _next_letter,
    "larger": _larger,
    "capital": _capital,
}
"""Task family name -> row generator; each takes the dataset's private RNG."""


def generate_rows(n: int = 4000, seed: int = 0) -> list[Row]:
    """Generates the sample instruction rows.

    Families take turns so each gets ``n / len(FAMILIES)`` rows (give or take one), then the rows
    are shuffled so any prefix or split of the file mixes all families.

    Args:
        n: Number of rows.
        seed: Seed of the private ``random.Random``; the global RNG is never touched.

    Returns:
        ``n`` dicts with string keys ``instruction``, ``input`` (possibly empty) and ``output``.

    Raises:
        ValueError: If ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    generators = list(FAMILIES.values())
    rows = [generators[i % len(generators)](rng) for i in range(n)]
    rng.shuffle(rows)
    return rows


def to_chat(row: Row) -> dict[str, list[dict[str, str]]]:
    """Converts an alpaca-style row to the chat (``messages``) format.

    Args:
        row: A dict with ``instruction``, optional ``input`` and ``output``.

    Returns:
        ``{"messages": [user, assistant]}`` where the user turn is the instruction, followed by a
        blank line and the input when the input is not empty.
    """
    user = row["instruction"]
    if row.get("input"):
        user = f"{user}\n\n{row['input']}"
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": row["output"]},
        ]
    }


def jsonl_text(rows: Iterable[dict]) -> str:
    """Renders rows as JSON Lines: one object per line, sorted keys, non-ASCII kept as is.

    Args:
        rows: JSON-serialisable dicts.

    Returns:
        The text, each line ending in ``\n``.
    """
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Writes rows as JSON Lines (see ``jsonl_text``) in UTF-8.

    Args:
        path: File to write; its parent directory must exist.
        rows: JSON-serialisable dicts.

    Returns:
        The path written.
    """
    path = Path(path)
    # Bytes, not text mode, so no platform newline translation: determinism is tested by bytes.
    path.write_bytes(jsonl_text(rows).encode("utf-8"))
    return path


def write_sample_dataset(out_dir: str | Path, n: int = 4000, seed: int = 0) -> Path:
    """Writes the sample dataset to ``out_dir/train.jsonl``; the same seed gives identical bytes.

    Args:
        out_dir: Directory to write into; created if missing.
        n: Number of rows.
        seed: Generator seed.

    Returns:
        Path of the written ``train.jsonl``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_jsonl(out_dir / "train.jsonl", generate_rows(n, seed))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m ftune.sample_data --out DIR [--rows N] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write train.jsonl into")
    parser.add_argument("--rows", type=int, default=4000, help="number of rows (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args(argv)
    if args.rows < 0:
        parser.error(f"--rows must be >= 0, got {args.rows}")
    path = write_sample_dataset(args.out, n=args.rows, seed=args.seed)
    print(f"wrote {args.rows} rows to {path}")


if __name__ == "__main__":
    main()
