"""Deterministic train/validation split: a seeded permutation picks the held-out rows."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import TypeVar

from ftune.errors import DataError

T = TypeVar("T")


def validation_size(num_rows: int, fraction: float, max_rows: int | None) -> int:
    """Number of held-out rows: ``fraction`` of the rows rounded to nearest, capped at ``max_rows``."""
    size = math.floor(num_rows * fraction + 0.5)
    return size if max_rows is None else min(size, max_rows)


def split_rows(
    rows: Sequence[T], *, fraction: float, max_rows: int | None, seed: int, source: str = "the dataset"
) -> tuple[list[T], list[T]]:
    """Holds out a seeded random share of the rows for validation.

    The same rows and seed always give the same split; the rows of each part keep file order.

    Args:
        rows: All usable rows.
        fraction: Share to hold out (data.validation_fraction).
        max_rows: Cap on held-out rows (data.max_validation_rows), or None.
        seed: Seed of the permutation (data.seed).
        source: Dataset name for messages.

    Returns:
        ``(train, validation)``.

    Raises:
        DataError: Either part would be empty.
    """
    size = validation_size(len(rows), fraction, max_rows)
    if size == 0:
        raise DataError(
            f"{source}: the validation split would be empty: {len(rows)} usable rows x "
            f"data.validation_fraction={fraction} rounds to 0 rows. Add rows, raise "
            "data.validation_fraction, or give a separate file as data.validation_path."
        )
    if size >= len(rows):
        raise DataError(
            f"{source}: holding out {size} of {len(rows)} usable rows for validation leaves none to train "
            "on; add rows, lower data.validation_fraction, or give data.validation_path."
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:size])
    train = [row for i, row in enumerate(rows) if i not in held_out]
    validation = [row for i, row in enumerate(rows) if i in held_out]
    return train, validation
