"""Pack tokenized examples into sequences of exactly ``max_seq_len`` tokens to spend no compute on padding."""

from __future__ import annotations

from collections.abc import Iterable

from ftune.data.tokenize import IGNORE_INDEX, Example


def pack_examples(examples: Iterable[Example], max_seq_len: int, pad_id: int) -> list[Example]:
    """Concatenates examples, in order, into sequences of exactly ``max_seq_len`` tokens.

    An example that does not fit in the current sequence starts the next one (it is never split,
    so an answer always sits after its prompt, as in torchtune's PackedDataset); the tail of each
    sequence is padded with ``pad_id`` and label IGNORE_INDEX. Padding at the end of a causal
    sequence is never attended to by real tokens, so no attention mask is needed for it.
    ``position_ids`` restart at 0 for each packed example (flash-attention kernels use the
    restarts to keep examples from attending to each other).

    Args:
        examples: Examples of at most ``max_seq_len`` tokens each (truncate first).
        max_seq_len: Length of every packed sequence.
        pad_id: Token id that fills the end of a sequence.

    Returns:
        The packed sequences; every trained label of the input appears exactly once.

    Raises:
        ValueError: An example is longer than ``max_seq_len``.
    """
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def flush() -> None:
        fill = max_seq_len - len(ids)
        start = positions[-1] + 1
        packed.append(
            Example(
                ids + [pad_id] * fill,
                labels + [IGNORE_INDEX] * fill,
                position_ids=positions + list(range(start, start + fill)),
            )
        )
        ids.clear()
        labels.clear()
        positions.clear()

    for example in examples:
        length = len(example.input_ids)
        if length > max_seq_len:
            raise ValueError(f"example of {length} tokens is longer than max_seq_len={max_seq_len}")
        if len(ids) + length > max_seq_len:
            flush()
        ids.extend(example.input_ids)
        labels.extend(example.labels)
        positions.extend(range(length))
    if ids:
        flush()
    return packed
