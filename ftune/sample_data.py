"""The built-in sample data: a closed world of facts, asked as questions, with a held-out split.

The task is instruction following over facts the base model already knows. The world is four
families of facts (20 capitals, 25 letters of the alphabet and their successors, 60 words in
uppercase, the same 60 words reversed: 165 facts). The built-in tiny base model is pretrained on
every fact stated tersely, as a knowledge-base entry (``capital of Kenya = Nairobi``), and on no
question: it knows the facts but does not answer questions. The instruction data asks about the facts
in natural phrasings (``Which city is the capital of Kenya?`` -> ``Nairobi``), three per family.

A fixed fifth of the facts (a hash of family and key, not a seed) is held out: no question about
them is in ``train.jsonl``; ``heldout.jsonl`` asks about each of them in every phrasing. Exact match
on the held-out file therefore measures whether fine-tuning taught the model to *answer questions*
from what it knows, not whether it memorised training rows. A 2-layer, width-64 model learns this
with LoRA in about a hundred CPU steps (measured in the README), where the base model scores near 0.

Run ``python -m ftune.sample_data --out DIR`` to write ``DIR/train.jsonl`` and ``DIR/heldout.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

Row = dict[str, str]

SAMPLE_ROWS = 4000
"""Rows of the built-in sample dataset (``builtin:sample-instructions``); the tiny model's tokenizer is
trained on the same rows."""
SAMPLE_SEED = 0
"""Generator seed of the built-in sample dataset."""

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


@dataclass(frozen=True)
class Family:
    """One kind of fact: the closed set of facts, how instructions ask for one, how pretraining states it."""

    facts: tuple[tuple[str, str], ...]
    """(key, answer) pairs: the whole closed world of this family."""
    questions: tuple[str, ...]
    """Phrasings of the instruction data (``{key}`` is replaced): natural questions."""
    statement: str
    """How the base model's pretraining text states a fact (``{key}``): a terse knowledge-base entry.

    The key comes last, as in the questions (``capital of {key}`` / ``Which city is the capital of
    {key}?``): with the key first (``{key} capital``) LoRA memorised the training questions but held-out
    exact match stayed near 10 %; with it last, 91 % after 75 steps."""


FAMILIES: dict[str, Family] = {
    "capital": Family(
        facts=CAPITALS,
        questions=("What is the capital of {key}?", "Which city is the capital of {key}?",
                   "Name the capital city of {key}."),
        statement="capital of {key}",
    ),
    "next_letter": Family(
        facts=tuple((a, b) for a, b in zip(_ALPHABET, _ALPHABET[1:])),
        questions=("Which letter comes after {key} in the alphabet?", "What letter follows {key}?",
                   "Name the letter after {key}."),
        statement="letter after {key}",
    ),
    "uppercase": Family(
        facts=tuple((w, w.upper()) for w in WORDS),
        questions=("Write {key} in uppercase.", "What is {key} in capital letters?", "Uppercase the word {key}."),
        statement="uppercase of {key}",
    ),
    "reverse": Family(
        facts=tuple((w, w[::-1]) for w in WORDS),
        questions=("Reverse the letters of {key}.", "Spell {key} backwards.", "What is {key} written backwards?"),
        statement="reverse of {key}",
    ),
}
"""The closed world: family name -> its facts, question phrasings and pretraining statement."""

HELD_OUT_SHARE = 0.2
"""Share of each family's facts never asked in the training file (they make up heldout.jsonl)."""


def is_held_out(family: str, key: str) -> bool:
    """Whether a fact belongs to the held-out split: a fixed hash, so the split never depends on a seed."""
    digest = hashlib.sha256(f"{family}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_SHARE


def family_of(question: str) -> str | None:
    """The family whose phrasing ``question`` uses, or None for a question of no family."""
    for name, family in FAMILIES.items():
        for phrasing in family.questions:
            before, after = phrasing.split("{key}")
            if question.startswith(before) and question.endswith(after) and len(question) > len(before + after):
                return name
    return None


def _question(family: str, phrasing: str, key: str, answer: str) -> Row:
    return {"instruction": phrasing.format(key=key), "input": "", "output": answer}


def heldout_rows() -> list[Row]:
    """Every question about every held-out fact, in every phrasing (file order: family, fact, phrasing)."""
    return [
        _question(name, phrasing, key, answer)
        for name, family in FAMILIES.items()
        for key, answer in family.facts
        if is_held_out(name, key)
        for phrasing in family.questions
    ]


def knowledge_texts() -> list[str]:
    """The base model's pretraining text: every fact of the closed world, stated tersely.

    Each fact appears twice, as ``statement = answer`` and as ``statement`` and ``answer`` on two lines.
    No question phrasing appears here, so the base model knows every fact but cannot answer a question.
    """
    return [
        f"{family.statement.format(key=key)}{separator}{answer}"
        for family in FAMILIES.values()
        for key, answer in family.facts
        for separator in (" = ", "\n")
    ]


def generate_rows(n: int = 4000, seed: int = 0) -> list[Row]:
    """Generates the training rows: questions about the facts outside the held-out split.

    Families take turns so each gets ``n / len(FAMILIES)`` rows (give or take one); within a family
    the fact and the phrasing are drawn at random, then the rows are shuffled so any prefix or split
    of the file mixes all families.

    Args:
        n: Number of rows.
        seed: Seed of the private ``random.Random``; the global RNG is never touched.

    Returns:
        ``n`` dicts with string keys ``instruction``, ``input`` (always empty) and ``output``.

    Raises:
        ValueError: If ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    names = list(FAMILIES)
    seen = {name: [fact for fact in FAMILIES[name].facts if not is_held_out(name, fact[0])] for name in names}
    rows = []
    for i in range(n):
        name = names[i % len(names)]
        key, answer = rng.choice(seen[name])
        rows.append(_question(name, rng.choice(FAMILIES[name].questions), key, answer))
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
    """Writes ``out_dir/train.jsonl`` and ``out_dir/heldout.jsonl``; the same seed gives identical bytes.

    Args:
        out_dir: Directory to write into; created if missing.
        n: Number of training rows.
        seed: Generator seed of the training rows (the held-out file does not depend on it).

    Returns:
        Path of the written ``train.jsonl``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "heldout.jsonl", heldout_rows())
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
    print(f"wrote {args.rows} rows to {path} and {len(heldout_rows())} held-out rows to {path.parent / 'heldout.jsonl'}")


if __name__ == "__main__":
    main()
