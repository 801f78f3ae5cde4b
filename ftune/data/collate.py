"""Batch examples into padded LongTensors for a causal language model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ftune.data.tokenize import IGNORE_INDEX, Example


@dataclass
class Collator:
    """Pads a list of examples to the longest one, rounded up to a multiple of ``pad_to_multiple_of``.

    Returns ``input_ids`` (padded with ``pad_id``), ``attention_mask`` (0 on padding) and
    ``labels`` (IGNORE_INDEX on padding), plus ``position_ids`` when the examples are packed.
    """

    pad_id: int
    """Token id written into padding positions (``ftune.data.pad_token_id(tokenizer)``)."""
    pad_to_multiple_of: int = 8
    """Round the padded length up to a multiple of this (tensor-core friendly shapes)."""

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Builds one batch.

        Args:
            examples: At least one example.

        Returns:
            A dict of ``[batch, length]`` LongTensors.

        Raises:
            ValueError: ``examples`` is empty.
        """
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        longest = max(len(example.input_ids) for example in examples)
        multiple = max(1, self.pad_to_multiple_of)
        length = -(-longest // multiple) * multiple
        shape = (len(examples), length)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        packed = all(example.position_ids is not None for example in examples)
        position_ids = torch.zeros(shape, dtype=torch.long) if packed else None
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
            if position_ids is not None:
                last = example.position_ids[-1] if example.position_ids else -1
                position_ids[row, :n] = torch.tensor(example.position_ids, dtype=torch.long)
                position_ids[row, n:] = torch.arange(last + 1, last + 1 + length - n)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        return batch
