"""Tokenization: which tokens are trained (answers, end-of-turn) and which are masked (prompts)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from ftune.config import DataConfig
from ftune.data import IGNORE_INDEX, prepare_data
from ftune.data.tokenize import Example, RowTokenizer, truncate
from ftune.errors import DataError

ALPACA = {"instruction": "Reverse the letters of the word.", "input": "river", "output": "revir"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
    ]
}


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_model_dir):
    """The tiny tokenizer with its chat template removed, as for a base model without one."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    return tokenizer


def tokenize_one(tokenizer, row: dict, fmt: str, *, mask_prompt: bool = True) -> Example:
    (example,) = RowTokenizer(tokenizer, fmt, mask_prompt=mask_prompt).tokenize([row])
    assert isinstance(example, Example), example
    return example


def trained_runs(tokenizer, example: Example) -> list[str]:
    """Decoded maximal runs of consecutive trained positions."""
    runs: list[list[int]] = []
    previous_trained = False
    for label in example.labels:
        trained = label != IGNORE_INDEX
        if trained and not previous_trained:
            runs.append([])
        if trained:
            runs[-1].append(label)
        previous_trained = trained
    return [tokenizer.decode(run) for run in runs]


def test_alpaca_trains_only_the_answer_and_end_token(tiny_tokenizer):
    example = tokenize_one(tiny_tokenizer, ALPACA, "alpaca")
    assert trained_runs(tiny_tokenizer, example) == ["revir" + tiny_tokenizer.eos_token]
    # Labels are the input ids themselves where trained (the model shifts them).
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids))
    # The prompt is masked entirely and ends where the answer starts.
    n = len(example.prompt_ids)
    assert example.input_ids[:n] == example.prompt_ids
    assert set(example.labels[:n]) == {IGNORE_INDEX}
    assert example.labels[n] != IGNORE_INDEX
    assert example.reference == "revir"


def test_alpaca_uses_the_chat_template_like_the_chat_api(tiny_tokenizer):
    example = tokenize_one(tiny_tokenizer, ALPACA, "alpaca")
    messages = [{"role": "user", "content": "Reverse the letters of the word.\n\nriver"}]
    prompt = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.decode(example.prompt_ids) == prompt
    full = tiny_tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "revir"}], tokenize=False
    )
    assert tiny_tokenizer.decode(example.input_ids) == full
    assert (
        example.input_ids.count(tiny_tokenizer.bos_token_id) == 1
    )  # bos is in the template: not added twice


def test_alpaca_without_chat_template_uses_the_alpaca_prompt_and_appends_eos(plain_tokenizer):
    example = tokenize_one(plain_tokenizer, ALPACA, "alpaca")
    expected = (
        "### Instruction:\nReverse the letters of the word.\n\n### Input:\nriver\n\n### Response:\nrevir"
    )
    assert (
        plain_tokenizer.decode(example.input_ids)
        == plain_tokenizer.bos_token + expected + plain_tokenizer.eos_token
    )
    assert trained_runs(plain_tokenizer, example) == ["revir" + plain_tokenizer.eos_token]
    assert plain_tokenizer.decode(example.prompt_ids).endswith("### Response:\n")

    no_input = tokenize_one(plain_tokenizer, {"instruction": "Say hi.", "output": "hi"}, "alpaca")
    assert "### Input" not in plain_tokenizer.decode(no_input.input_ids)


def test_multi_turn_chat_trains_every_assistant_turn_and_nothing_else(tiny_tokenizer):
    example = tokenize_one(tiny_tokenizer, CHAT, "chat")
    eos = tiny_tokenizer.eos_token
    assert trained_runs(tiny_tokenizer, example) == ["5" + eos, "Lima" + eos]
    assert tiny_tokenizer.decode(example.input_ids) == tiny_tokenizer.apply_chat_template(
        CHAT["messages"], tokenize=False
    )
    # The validation prompt is everything before the last answer, ending in the generation prompt.
    prompt = tiny_tokenizer.apply_chat_template(
        CHAT["messages"][:-1], tokenize=False, add_generation_prompt=True
    )
    assert tiny_tokenizer.decode(example.prompt_ids) == prompt
    assert example.reference == "Lima"


def test_chat_turns_after_the_last_answer_are_masked(tiny_tokenizer):
    row = {"messages": [*CHAT["messages"], {"role": "user", "content": "Thanks!"}]}
    example = tokenize_one(tiny_tokenizer, row, "chat")
    assert trained_runs(tiny_tokenizer, example) == [
        "5" + tiny_tokenizer.eos_token,
        "Lima" + tiny_tokenizer.eos_token,
    ]
    assert "Thanks!" in tiny_tokenizer.decode(example.input_ids)


def test_text_rows_train_every_token_and_end_with_eos(tiny_tokenizer):
    example = tokenize_one(tiny_tokenizer, {"text": "The cat sat."}, "text")
    assert example.input_ids[0] == tiny_tokenizer.bos_token_id
    assert example.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert example.labels[0] == IGNORE_INDEX  # bos is never a target
    assert example.labels[1:] == example.input_ids[1:]
    assert example.prompt_ids is None and example.reference is None


@pytest.mark.parametrize("row,fmt", [(ALPACA, "alpaca"), (CHAT, "chat")])
def test_mask_prompt_false_trains_the_prompt_too(tiny_tokenizer, row, fmt):
    masked = tokenize_one(tiny_tokenizer, row, fmt, mask_prompt=True)
    unmasked = tokenize_one(tiny_tokenizer, row, fmt, mask_prompt=False)
    assert unmasked.input_ids == masked.input_ids
    assert unmasked.num_trained > masked.num_trained
    assert unmasked.labels == unmasked.input_ids


def test_truncate_cuts_and_reports():
    example = Example(list(range(10)), list(range(10)), prompt_ids=[0, 1], reference="x")
    cut, was_cut = truncate(example, 4)
    assert was_cut and cut.input_ids == [0, 1, 2, 3] and cut.labels == [0, 1, 2, 3]
    assert cut.prompt_ids == [0, 1] and cut.reference == "x"
    same, was_cut = truncate(example, 10)
    assert not was_cut and same is example


def test_truncation_is_counted_and_examples_without_answers_are_dropped(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    long_answer = {"instruction": "Count.", "output": " ".join(str(i) for i in range(200))}
    long_prompt = {"instruction": " ".join(["word"] * 300), "output": "yes"}
    short = {"instruction": "Say hi.", "output": "hi"}
    path.write_text("\n".join(json.dumps(r) for r in [long_answer, long_prompt, short, short]))
    data = prepare_data(DataConfig(path=str(path), validation_path=str(path), max_seq_len=64), tiny_tokenizer)
    # Per split: the long answer is cut, the long prompt is cut and then has nothing to train on.
    assert data.stats.truncated == 4
    assert data.stats.dropped == 2
    assert len(data.train) == 3 and all(len(e.input_ids) <= 64 for e in data.train)
    assert "4 truncated to 64 tokens, 2 dropped" in data.summary()


def test_template_that_cannot_be_split_into_turns_is_an_error_even_when_skipping(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{% for m in messages|reverse %}{{ m['role'] ~ ': ' ~ m['content'] ~ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHAT) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(path), validation_path=str(path), skip_bad_rows=True), tokenizer)
    assert f"{path}:1" in str(e.value) and "chat template" in str(e.value)
