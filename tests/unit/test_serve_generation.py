"""Batched decoding: stop strings, finish reasons, sampling, mixed-adapter batches on the tiny model, and
rows that fail or are cancelled without taking their batch with them."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.generation import (
    BASE_ADAPTER,
    BatchDecoder,
    Delta,
    GenerationRequest,
    RowError,
    SamplingParams,
    StopMatcher,
    TextStream,
    sample_token,
)

# ---- stop strings ---------------------------------------------------------------------------------


def feed_all(stops, chunks):
    matcher, out = StopMatcher(stops), []
    for chunk in chunks:
        text, hit = matcher.feed(chunk)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_string_split_across_chunks_is_found_and_cut():
    assert feed_all(["END"], ["hello E", "N", "D and more"]) == ("hello ", True)


def test_partial_match_is_held_back_then_released():
    matcher = StopMatcher(["END"])
    assert matcher.feed("abcE") == ("abc", False)  # "E" might start "END"
    assert matcher.feed("x") == ("Ex", False)
    assert matcher.feed("EN") == ("", False)
    assert matcher.flush() == "EN"


def test_earliest_of_several_stops_wins():
    assert feed_all(["world", "lo"], ["hello world"]) == ("hel", True)


def test_no_stops_passes_text_through():
    assert feed_all([], ["a", "b"]) == ("ab", False)


# ---- sampling ------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9])
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0.0), torch.Generator()) == 1


def test_same_seed_same_tokens_and_tiny_top_p_is_greedy():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_tokens=1, temperature=1.5)

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [sample_token(logits, params, gen) for _ in range(20)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6)
    gen = torch.Generator().manual_seed(3)
    assert {sample_token(logits, nucleus, gen) for _ in range(10)} == {int(logits.argmax())}


# ---- decoding with a scripted model ----------------------------------------------------------------

ALPHABET = "abcdefgh"
EOS, PAD = 8, 9


class CharTokenizer:
    """One token per character; EOS and PAD decode to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHABET[i] for i in ids if i < len(ALPHABET))


class ScriptedModel:
    """Next token is the letter after the last one; after 'h' comes EOS. Records each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, attention_mask, position_ids, cache, adapter_names):
        self.calls.append((tuple(input_ids.shape), list(adapter_names)))
        assert attention_mask.shape[0] == input_ids.shape[0] == len(adapter_names)
        last = input_ids[:, -1]
        logits = torch.full((len(last), 10), -1e9)
        logits[torch.arange(len(last)), torch.where(last >= 7, EOS, last + 1)] = 0.0
        return logits


def decode(requests, model=None):
    model = model or ScriptedModel()
    decoder = BatchDecoder(requests, model, CharTokenizer(), eos_token_ids=[EOS], pad_token_id=PAD)
    texts, finals = [""] * len(requests), [None] * len(requests)
    while not decoder.done:
        for i, delta in enumerate(decoder.step()):
            if delta is not None:
                texts[i] += delta.text
                finals[i] = (delta.finish_reason, delta.completion_tokens)
    return texts, finals, model


def req(prompt, max_tokens=20, stop=(), adapter=None):
    return GenerationRequest(
        tuple(ALPHABET.index(c) for c in prompt), SamplingParams(max_tokens, stop=stop), adapter
    )


def test_finish_reasons_eos_length_and_stop_in_one_batch():
    texts, finals, model = decode([req("a"), req("a", max_tokens=3), req("ab", stop=("ef",), adapter="x")])
    assert texts == ["bcdefgh", "bcd", "cd"]
    assert finals == [("stop", 8), ("length", 3), ("stop", 4)]  # EOS counts as a generated token
    # Finished rows leave the batch: 3 rows until the 3rd step, then 2, then 1.
    widths = [shape[0] for shape, _ in model.calls]
    assert widths == [3, 3, 3, 2, 1, 1, 1, 1]
    assert model.calls[0][1] == [BASE_ADAPTER, BASE_ADAPTER, "x"]
    assert model.calls[3][1] == [BASE_ADAPTER, "x"]


def test_left_padding_keeps_every_prompt_last_token_at_the_end():
    _, _, model = decode([req("a"), req("abcd")])
    assert model.calls[0][0] == (2, 4)


def test_text_stream_holds_back_incomplete_characters(tiny_tokenizer):
    ids = tiny_tokenizer("héllo wörld")["input_ids"]
    stream = TextStream(tiny_tokenizer, ids[:1])
    text = "".join(stream.add(i) for i in ids[1:]) + stream.add(None, final=True)
    assert text == "héllo wörld"
    assert "\ufffd" not in text


# ---- mixed adapters on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    return write_random_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"), {"one": 1, "two": 2})


@pytest.fixture(scope="module")
def pool(tiny_model_dir, adapters):
    from transformers import AutoModelForCausalLM

    from serve.adapter_pool import AdapterPool

    pool = AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    for name, path in adapters.items():
        asyncio.run(pool.load(name, path))
    return pool


def run_decoder(pool, tokenizer, requests):
    decoder = BatchDecoder(
        requests,
        pool.forward,
        tokenizer,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = [[] for _ in requests]
    while not decoder.done:
        for i, delta in enumerate(decoder.step()):
            if delta is not None:
                ids[i].append(delta.text)
    return ["".join(parts) for parts in ids]


def test_mixed_adapter_batch_equals_each_request_alone(pool, tiny_tokenizer):
    prompts = ["Name a color.", "What is two plus two? Answer briefly.", "Hi"]
    requests = [
        GenerationRequest(tuple(tiny_tokenizer(p)["input_ids"]), SamplingParams(12, ignore_eos=True), adapter)
        for p, adapter in zip(prompts, ["one", "two", None])
    ]
    mixed = run_decoder(pool, tiny_tokenizer, requests)
    alone = [run_decoder(pool, tiny_tokenizer, [r])[0] for r in requests]
    assert mixed == alone
    same_prompt = [
        GenerationRequest(requests[0].prompt_ids, requests[0].params, a) for a in ("one", "two", None)
    ]
    outputs = run_decoder(pool, tiny_tokenizer, same_prompt)
    assert len(set(outputs)) == 3, "each adapter (and the base) must give its own greedy text"


def test_base_rows_match_transformers_generate(pool, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    prompt = tiny_tokenizer("The capital of France")["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )
    expected = tiny_tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
    ours = run_decoder(
        pool, tiny_tokenizer, [GenerationRequest(tuple(prompt), SamplingParams(max_tokens=10), None)]
    )
    assert ours == [expected]


def test_seeded_sampling_is_reproducible_in_different_batches(pool, tiny_tokenizer):
    prompt = tuple(tiny_tokenizer("Tell me a story")["input_ids"])
    seeded = GenerationRequest(prompt, SamplingParams(10, temperature=1.0, seed=7, ignore_eos=True), "one")
    other = GenerationRequest(prompt, SamplingParams(10, temperature=1.0, seed=8, ignore_eos=True), "one")
    first = run_decoder(pool, tiny_tokenizer, [seeded])[0]
    in_batch = run_decoder(pool, tiny_tokenizer, [other, seeded])
    assert in_batch[1] == first
    assert in_batch[0] != first


def test_ignore_eos_generates_exactly_max_tokens():
    request = GenerationRequest((0,), SamplingParams(max_tokens=10, ignore_eos=True))
    texts, finals, _ = decode([request])
    assert texts == ["bcdefgh"] and finals == [("length", 10)]


def test_deltas_of_one_request_join_into_one():
    joined = Delta("Hel", None, 5, 1).then(Delta("", None, 5, 2)).then(Delta("lo", "length", 5, 3))
    assert joined == Delta("Hello", "length", 5, 3)


# ---- one row's failure or departure is its own ------------------------------------------------------


class UniformModel(ScriptedModel):
    """Equal logits over the 8 letters: every draw depends on the seed."""

    def __call__(self, input_ids, attention_mask, position_ids, cache, adapter_names):
        self.calls.append((tuple(input_ids.shape), list(adapter_names)))
        logits = torch.full((input_ids.shape[0], 10), -1e9)
        logits[:, :8] = 0.0
        return logits


class MixedModel(ScriptedModel):
    """The scripted alphabet, and NaN logits for rows whose adapter is "nan" (a broken adapter)."""

    def __call__(self, input_ids, attention_mask, position_ids, cache, adapter_names):
        logits = super().__call__(input_ids, attention_mask, position_ids, cache, adapter_names)
        logits[[i for i, name in enumerate(adapter_names) if name == "nan"]] = float("nan")
        return logits


class PickyTokenizer(CharTokenizer):
    """Fails to decode token 7 ('h'), as a tokenizer may fail on an id it cannot render."""

    def decode(self, ids, skip_special_tokens=True):
        if 7 in ids:
            raise KeyError("token 7")
        return super().decode(ids, skip_special_tokens)


@pytest.mark.parametrize("temperature", [5e-324, 3e-260, 1e-45, 1e-30, 2.0])
def test_any_temperature_in_openai_range_gives_a_token_not_nan(temperature):
    logits = torch.tensor([0.1, 3.0, 2.9, -50.0])
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=0.5)
    token = sample_token(logits, params, torch.Generator().manual_seed(0))
    assert token in {1, 2}
    if temperature < 1e-3:  # the shifted logits make a tiny temperature greedy, never inf/inf
        assert token == 1


@pytest.mark.parametrize("top_p", [5e-324, 1e-50, 1e-9])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    logits = torch.tensor([0.1, 3.0, 2.9])
    params = SamplingParams(max_tokens=1, temperature=2.0, top_p=top_p)
    assert sample_token(logits, params, torch.Generator().manual_seed(0)) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_are_a_row_error(bad):
    logits = torch.tensor([0.1, bad, 2.9])
    for temperature in (0.0, 1.0):
        with pytest.raises(RowError, match="non-finite"):
            sample_token(logits, SamplingParams(1, temperature=temperature), torch.Generator())
    with pytest.raises(RowError):
        sample_token(torch.full((3,), float("-inf")), SamplingParams(1, temperature=1.0), torch.Generator())


def test_any_integer_seed_decodes_and_seeds_wrap_at_2_to_the_64():
    def sampled(seed):
        request = GenerationRequest((0,), SamplingParams(8, temperature=2.0, seed=seed, ignore_eos=True))
        return decode([request], UniformModel())[0][0]

    for seed in (2**70, -(2**63), 2**64 - 1):  # torch's manual_seed refuses 2**70
        assert len(sampled(seed)) == 8
    assert sampled(2**64 + 5) == sampled(5)


def test_a_row_with_nan_logits_fails_alone_and_its_neighbours_finish_as_alone():
    broken = GenerationRequest((0,), SamplingParams(5, temperature=1.0, seed=1), "nan")
    others = [req("a"), req("ab", stop=("ef",))]
    alone = [decode([r])[0][0] for r in others]
    model = MixedModel()
    batch = [others[0], broken, others[1]]
    decoder = BatchDecoder(batch, model, CharTokenizer(), eos_token_ids=[EOS], pad_token_id=PAD)
    texts, errors = ["", "", ""], [None, None, None]
    while not decoder.done:
        for i, delta in enumerate(decoder.step()):
            if delta is not None:
                texts[i] += delta.text
                errors[i] = delta.error
    assert [texts[0], texts[2]] == alone and errors[0] is None and errors[2] is None
    assert "non-finite" in errors[1] and texts[1] == ""
    assert decoder.failed == 1 and decoder.cancelled == 0
    assert [shape[0] for shape, _ in model.calls][:2] == [3, 2], "the failed row left the batch at once"


def test_a_row_that_cannot_start_fails_alone():
    good, unreadable = req("a", max_tokens=3), req("h")
    model = ScriptedModel()
    decoder = BatchDecoder([unreadable, good], model, PickyTokenizer(), eos_token_ids=[EOS], pad_token_id=PAD)
    first = decoder.step()
    assert first[0].error and "could not start decoding" in first[0].error
    assert first[1].text == "b" and first[1].error is None
    while not decoder.done:
        decoder.step()
    assert all(shape[0] == 1 for shape, _ in model.calls), "the failed row never reached the model"


def test_a_cancelled_row_leaves_the_batch_before_the_next_forward_pass():
    rows = [req("a"), req("a")]
    model = ScriptedModel()
    decoder = BatchDecoder(rows, model, CharTokenizer(), eos_token_ids=[EOS], pad_token_id=PAD)
    texts = ["", ""]
    for i, delta in enumerate(decoder.step()):
        texts[i] += delta.text
    rows[0].cancelled.set()  # its caller went away
    while not decoder.done:
        for i, delta in enumerate(decoder.step()):
            if delta is not None:
                texts[i] += delta.text
    assert texts == ["b", "bcdefgh"]
    assert [shape[0] for shape, _ in model.calls] == [2] + [1] * 7
    assert decoder.cancelled == 1 and decoder.failed == 0


def test_a_batch_whose_callers_all_left_ends_without_a_forward_pass():
    rows = [req("a"), req("b")]
    for row in rows:
        row.cancelled.set()
    model = ScriptedModel()
    decoder = BatchDecoder(rows, model, CharTokenizer(), eos_token_ids=[EOS], pad_token_id=PAD)
    assert decoder.step() == [None, None]
    assert decoder.done and decoder.cancelled == 2 and model.calls == []
