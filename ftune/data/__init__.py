"""The data pipeline: read a dataset, check every row, split, tokenize with prompt masking, pack.

Entry point: ``prepare_data(cfg.data, tokenizer)`` returns the training and validation examples
and the statistics of how they were made; ``Collator`` turns examples into padded batches. Every
mistake in the data raises ``ftune.errors.DataError`` naming the file, line and field.
"""

from __future__ import annotations

from ftune.data.collate import Collator
from ftune.data.dataset import DataStats, PreparedData, SkippedRow, prepare_data
from ftune.data.packing import pack_examples
from ftune.data.readers import read_source
from ftune.data.split import split_rows
from ftune.data.tokenize import IGNORE_INDEX, Example, alpaca_prompt, alpaca_to_messages, pad_token_id

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "DataStats",
    "Example",
    "PreparedData",
    "SkippedRow",
    "alpaca_prompt",
    "alpaca_to_messages",
    "pack_examples",
    "pad_token_id",
    "prepare_data",
    "read_source",
    "split_rows",
]
