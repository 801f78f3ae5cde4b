"""Turn validated rows into token ids and labels, masking everything the model should not learn to say.

Alpaca and chat rows are rendered with the tokenizer's chat template (alpaca rows become a user
turn and an assistant turn), so training sees exactly the prompt the chat API builds at serving
time. A conversation is cut into segments (prompt text, assistant text, prompt text, ...) by
rendering each prefix with ``add_generation_prompt=True`` and taking the text difference; segments
are tokenized separately and concatenated, so the prompt's tokens are a prefix of the example's
tokens, as they are when a served model continues a tokenized prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from ftune.data.schema import RowProblem

IGNORE_INDEX = -100
"""Label of a position that does not count in the loss (the PyTorch cross-entropy default)."""

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
"""Prompt of an alpaca row without input, used when the tokenizer has no chat template."""

ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
"""Prompt of an alpaca row with a non-empty input, used when the tokenizer has no chat template."""

_ENCODE_BATCH = 1024


@dataclass
class Example:
    """One tokenized training or validation example (or a packed sequence of several)."""

    input_ids: list[int]
    """Token ids fed to the model."""
    labels: list[int]
    """Target per position: the token id where it is trained, IGNORE_INDEX where masked."""
    prompt_ids: list[int] | None = None
    """Validation only: the prompt up to the last answer, ending in the generation prompt."""
    reference: str | None = None
    """Validation only: the expected last answer, for exact match by greedy generation."""
    position_ids: list[int] | None = None
    """Packed sequences only: positions restarting at 0 at each packed example."""

    @property
    def num_trained(self) -> int:
        """Number of positions that count in the loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def alpaca_to_messages(row: dict) -> list[dict[str, str]]:
    """Converts an alpaca row to a user turn and an assistant turn.

    Args:
        row: A valid alpaca row.

    Returns:
        ``[user, assistant]``; the user turn is the instruction, plus a blank line and the input
        when the input is not empty.
    """
    user = row["instruction"]
    if row.get("input"):
        user = f"{user}\n\n{row['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """Renders the classic Alpaca prompt used when the tokenizer has no chat template.

    Args:
        instruction: The task.
        input: Optional context for the task; left out when empty.

    Returns:
        The prompt text, ending with ``### Response:`` and a newline.
    """
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else eos (common for Llama-style tokenizers), else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


class RowTokenizer:
    """Tokenizes validated rows of one format for one tokenizer.

    Args:
        tokenizer: A Hugging Face tokenizer (fast or slow).
        fmt: ``alpaca``, ``chat`` or ``text``.
        mask_prompt: Give prompt tokens label IGNORE_INDEX (answers and text rows are always trained).

    Raises:
        RowProblem: (from ``tokenize``) the chat template rejects a conversation, or renders it
            in a way that cannot be split into turns.
    """

    def __init__(self, tokenizer: Any, fmt: str, *, mask_prompt: bool = True) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.mask_prompt = mask_prompt
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.eos_id = tokenizer.eos_token_id
        self.special_tokens = _special_tokens(tokenizer)
        self.special_prefix = _special_prefix(tokenizer)

    def segments(self, row: dict) -> tuple[list[tuple[str, bool]], str | None]:
        """Cuts a row into text segments.

        Args:
            row: A valid row of this tokenizer's format.

        Returns:
            ``([(text, is_answer), ...], reference)``; an answer segment of a template-less
            alpaca or a text row is followed by eos when the ids are built. ``reference`` is
            the last answer (None for text rows).
        """
        if self.fmt == "text":
            return [(row["text"], True)], None
        if self.fmt == "alpaca" and not self.has_chat_template:
            prompt = alpaca_prompt(row["instruction"], row.get("input"))
            return [(prompt, False), (row["output"], True)], row["output"]
        messages = (
            alpaca_to_messages(row)
            if self.fmt == "alpaca"
            else [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        )
        reference = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        return self._chat_segments(messages), reference

    def tokenize(self, rows: Iterable[dict]) -> list[Example | RowProblem]:
        """Tokenizes rows, keeping their order.

        Args:
            rows: Valid rows of this tokenizer's format.

        Returns:
            Per row an Example (full length, not truncated) with ``prompt_ids`` and
            ``reference`` set for alpaca and chat rows, or the RowProblem that stopped it.
        """
        cut: list[tuple[list[tuple[str, bool]], str | None] | RowProblem] = []
        for row in rows:
            try:
                cut.append(self.segments(row))
            except RowProblem as problem:
                cut.append(problem)
        texts = [text for item in cut if not isinstance(item, RowProblem) for text, _ in item[0]]
        encoded = iter(self._encode(texts))
        out: list[Example | RowProblem] = []
        for item in cut:
            if isinstance(item, RowProblem):
                out.append(item)
                continue
            segments, reference = item
            out.append(self._build([(next(encoded), answer) for _, answer in segments], reference))
        return out

    def _build(self, segments: list[tuple[list[int], bool]], reference: str | None) -> Example:
        input_ids: list[int] = []
        labels: list[int] = []
        first = segments[0][0] if segments else []
        if self.special_prefix and first[: len(self.special_prefix)] != self.special_prefix:
            input_ids += self.special_prefix
            labels += [IGNORE_INDEX] * len(self.special_prefix)
        # A template ends assistant turns itself; raw text and template-less answers get eos here.
        append_eos = self.eos_id is not None and (self.fmt == "text" or not self.has_chat_template)
        prompt_end = 0
        for ids, answer in segments:
            if answer:
                prompt_end = len(input_ids)
                if append_eos:
                    ids = [*ids, self.eos_id]
            input_ids += ids
            labels += ids if answer or not self.mask_prompt else [IGNORE_INDEX] * len(ids)
        if self.fmt == "text":
            return Example(input_ids, labels)
        return Example(input_ids, labels, prompt_ids=input_ids[:prompt_end], reference=reference)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_BATCH):
            batch = list(texts[start : start + _ENCODE_BATCH])
            out += self.tokenizer(batch, add_special_tokens=False)["input_ids"]
        return out

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
            raise RowProblem(f"the tokenizer's chat template rejects this conversation: {e}") from e

    def _chat_segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        segments: list[tuple[str, bool]] = []
        done = ""  # rendered text already assigned to segments
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True)
            full = self._render(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise _not_incremental(i)
            answer = full[len(prompt) :]
            # Whitespace a template writes after the end-of-turn token is not something to learn.
            kept = answer.rstrip()
            if not kept.endswith(self.special_tokens):
                kept = answer
            segments += [(prompt[len(done) :], False), (kept, True)]
            done = prompt + kept
        whole = self._render(messages, add_generation_prompt=False)
        if not whole.startswith(done):
            raise _not_incremental(len(messages) - 1)
        if whole[len(done) :]:
            segments.append((whole[len(done) :], False))
        return [(text, answer) for text, answer in segments if text]


def truncate(example: Example, max_len: int) -> tuple[Example, bool]:
    """Cuts an example to at most ``max_len`` tokens.

    Args:
        example: An unpacked example.
        max_len: Maximum number of tokens.

    Returns:
        The (possibly new) example and whether it was cut.
    """
    if len(example.input_ids) <= max_len:
        return example, False
    return Example(
        example.input_ids[:max_len],
        example.labels[:max_len],
        prompt_ids=example.prompt_ids,
        reference=example.reference,
    ), True


def _special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before the text with ``add_special_tokens=True`` (usually bos)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return list(special[:start])
    return []


def _special_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Strings of the tokenizer's special tokens (eos, end-of-turn markers, ...)."""
    tokens = {tokenizer.eos_token} if tokenizer.eos_token else set()
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            tokens.add(str(token))
    return tuple(sorted(tokens))


def _not_incremental(index: int) -> RowProblem:
    return RowProblem(
        "cannot locate the assistant turns: the tokenizer's chat template does not render this "
        f"conversation incrementally (the rendering of messages[:{index}] with the generation prompt "
        f"is not a prefix of the rendering of messages[:{index + 1}]), so prompt tokens cannot be masked. "
        "Use a model whose chat template renders turns in order, or pre-render the conversations and "
        "use format text",
        skippable=False,
    )
