"""Collator: padding to the longest example rounded up to a multiple of 8, with the right fill values."""

from __future__ import annotations

import pytest
import torch

from ftune.data import IGNORE_INDEX, Collator, Example, pack_examples, pad_token_id


def test_pads_to_the_longest_rounded_up_to_a_multiple_of_8():
    batch = Collator(pad_id=2)(
        [Example([10, 11, 12], [-100, 11, 12]), Example(list(range(20, 30)), list(range(20, 30)))]
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for tensor in batch.values():
        assert tensor.shape == (2, 16) and tensor.dtype == torch.long
    assert batch["input_ids"][0].tolist() == [10, 11, 12] + [2] * 13
    assert batch["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert batch["labels"][0].tolist() == [-100, 11, 12] + [IGNORE_INDEX] * 13
    assert batch["attention_mask"][1].tolist() == [1] * 10 + [0] * 6


def test_exact_multiple_is_not_padded_further():
    batch = Collator(pad_id=0)([Example(list(range(1, 9)), list(range(1, 9)))])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["attention_mask"].all()


def test_packed_examples_carry_position_ids():
    packed = pack_examples(
        [Example([5, 6, 7], [-100, 6, 7]), Example([8, 9], [-100, 9]), Example([1, 2, 3, 4], [1, 2, 3, 4])],
        max_seq_len=6,
        pad_id=0,
    )
    assert [e.input_ids for e in packed] == [[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0]]
    assert [e.labels for e in packed] == [[-100, 6, 7, -100, 9, -100], [1, 2, 3, 4, -100, -100]]
    assert [e.position_ids for e in packed] == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]
    batch = Collator(pad_id=0)(packed)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6, 7]]


def test_packing_rejects_an_untruncated_example():
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        pack_examples([Example([1] * 9, [1] * 9)], max_seq_len=8, pad_id=0)


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError):
        Collator(pad_id=0)([])


def test_pad_id_of_the_tiny_tokenizer(tiny_tokenizer):
    assert pad_token_id(tiny_tokenizer) == tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
