"""AdapterPool: adapters share one peft model; eviction waits for the requests using an adapter; a load
that fails half-way leaves the model as it was."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from serve.adapter_pool import AdapterPool


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    return write_random_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"), {"a": 1, "b": 2})


@pytest.fixture
def pool(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())


def last_logits(pool, tokenizer, names):
    from transformers import DynamicCache

    ids = torch.tensor([tokenizer("hello there")["input_ids"]] * len(names))
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return pool.forward(ids, mask, positions, DynamicCache(), names)


def test_rows_get_their_own_adapter_and_base_rows_stay_base(pool, adapters, tiny_tokenizer):
    base_only = last_logits(pool, tiny_tokenizer, ["__base__"])
    for name, path in adapters.items():
        asyncio.run(pool.load(name, path))
    mixed = last_logits(pool, tiny_tokenizer, ["a", "__base__", "b"])
    torch.testing.assert_close(mixed[1], base_only[0], atol=1e-6, rtol=0)
    assert not torch.allclose(mixed[0], base_only[0], atol=1e-3)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)
    torch.testing.assert_close(last_logits(pool, tiny_tokenizer, ["b"])[0], mixed[2], atol=1e-5, rtol=0)


def test_eviction_waits_for_users_and_a_reload_revives(pool, adapters):
    async def scenario():
        await pool.load("a", adapters["a"])
        await pool.load("b", adapters["b"])
        pool.acquire("a")
        await pool.evict("a")  # in use: stays resident, but new requests reload it through the LRU
        assert pool.resident == ["a", "b"] and pool.loaded == ["b"]
        await pool.release("a")  # last user gone: now it is deleted
        assert pool.resident == ["b"]
        await pool.evict("b")
        assert pool.resident == [] and pool.loaded == []

        await pool.load("a", adapters["a"])
        pool.acquire("a")
        await pool.evict("a")
        await pool.load("a", adapters["a"])  # asked for again while still in use: kept, not reloaded
        await pool.release("a")
        assert pool.resident == ["a"] and pool.loaded == ["a"]

    asyncio.run(scenario())


def test_base_forward_after_every_adapter_was_unloaded(pool, adapters, tiny_tokenizer):
    before = last_logits(pool, tiny_tokenizer, ["__base__"])
    asyncio.run(pool.load("a", adapters["a"]))
    asyncio.run(pool.evict("a"))
    torch.testing.assert_close(last_logits(pool, tiny_tokenizer, ["__base__"]), before, atol=1e-6, rtol=0)
    asyncio.run(pool.load("b", adapters["b"]))  # loading into the emptied peft model works
    assert pool.loaded == ["b"]


def test_acquire_of_an_adapter_that_is_not_loaded_is_a_bug(pool):
    with pytest.raises(RuntimeError, match="not loaded"):
        pool.acquire("ghost")


def test_forward_matches_peft_own_mixed_batch_forward(pool, adapters, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name, path in adapters.items():
        asyncio.run(pool.load(name, path))
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters["a"], adapter_name="a"
    )
    reference.load_adapter(adapters["b"], adapter_name="b")
    names = ["b", "__base__", "a", "b"]
    ids = torch.tensor([tiny_tokenizer("hello there")["input_ids"]] * len(names))
    with torch.inference_mode():
        expected = reference.eval()(input_ids=ids, adapter_names=names).logits[:, -1, :]
    torch.testing.assert_close(last_logits(pool, tiny_tokenizer, names), expected, atol=1e-5, rtol=0)


def test_concurrent_loads_of_one_adapter_all_wait_for_it(pool, adapters):
    async def load_and_check():
        await pool.load("a", adapters["a"])
        return pool.resident  # usable the moment load returns, for every caller

    async def scenario():
        return await asyncio.gather(*(load_and_check() for _ in range(3)))

    assert asyncio.run(scenario()) == [["a"]] * 3



@pytest.fixture(scope="module")
def mixed_rank_adapters(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    out = tmp_path_factory.mktemp("ranks")
    return {**write_random_adapters(tiny_model_dir, out, {"r4": 3}, r=4),
            **write_random_adapters(tiny_model_dir, out, {"r16": 4}, r=16)}


@pytest.mark.parametrize("names", [["r16", "__base__", "r4", "r16"], ["r4", "r4"], ["__base__", "__base__"]])
def test_gathered_forward_equals_peft_loop_with_mixed_ranks(tiny_model_dir, mixed_rank_adapters, tiny_tokenizer, names):
    from transformers import AutoModelForCausalLM

    pools = [AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), gathered=g) for g in (True, False)]
    for p in pools:
        for name, path in mixed_rank_adapters.items():
            asyncio.run(p.load(name, path))
    assert pools[0].gathered and not pools[1].gathered
    torch.testing.assert_close(last_logits(pools[0], tiny_tokenizer, names), last_logits(pools[1], tiny_tokenizer, names),
                               atol=1e-5, rtol=0)


def test_gathered_stacks_follow_unloads(pool, mixed_rank_adapters, tiny_tokenizer):
    for name, path in mixed_rank_adapters.items():
        asyncio.run(pool.load(name, path))
    r4_before = last_logits(pool, tiny_tokenizer, ["r4", "r16"])[0]
    asyncio.run(pool.evict("r16"))
    assert pool.gathered and pool.resident == ["r4"]
    torch.testing.assert_close(last_logits(pool, tiny_tokenizer, ["r4", "__base__"])[0], r4_before, atol=1e-5, rtol=0)


def test_dora_adapter_is_not_stacked(pool, adapters, tiny_model_dir, tmp_path):
    from serve.synthetic import write_random_adapters

    asyncio.run(pool.load("a", adapters["a"]))
    assert pool.gathered
    dora = write_random_adapters(tiny_model_dir, tmp_path, {"d": 5}, use_dora=True)["d"]
    asyncio.run(pool.load("d", dora))
    assert not pool.gathered and "DoRA" in pool._gathered.reason  # peft's loop (which refuses mixed DoRA batches)
    asyncio.run(pool.evict("d"))
    assert pool.gathered


def truncated_copy(adapter: Path, where: Path) -> Path:
    from serve.registry import WEIGHTS_FILE

    copy = shutil.copytree(adapter, where)
    (copy / WEIGHTS_FILE).write_bytes((adapter / WEIGHTS_FILE).read_bytes()[:-1000])
    return copy


def test_a_failed_first_load_leaves_the_base_model_exactly_as_it_was(
    pool, adapters, tiny_tokenizer, tmp_path
):
    before = last_logits(pool, tiny_tokenizer, ["__base__"])
    with pytest.raises(Exception, match="(?i)safetensor|deserializ|incomplete"):
        asyncio.run(pool.load("cut", truncated_copy(adapters["a"], tmp_path / "cut")))
    assert pool.resident == [] and pool.loaded == []
    assert torch.equal(last_logits(pool, tiny_tokenizer, ["__base__"]), before)
    asyncio.run(pool.load("a", adapters["a"]))  # the model still takes adapters
    assert pool.resident == ["a"]


def test_a_failed_load_leaves_the_other_adapters_exactly_as_they_were(
    pool, adapters, tiny_tokenizer, tmp_path
):
    asyncio.run(pool.load("a", adapters["a"]))
    names = ["a", "__base__"]
    before = last_logits(pool, tiny_tokenizer, names)
    with pytest.raises(Exception, match="(?i)safetensor|deserializ|incomplete"):
        asyncio.run(pool.load("cut", truncated_copy(adapters["b"], tmp_path / "cut")))
    assert pool.resident == ["a"] and pool.loaded == ["a"] and pool.gathered
    assert torch.equal(last_logits(pool, tiny_tokenizer, names), before)
    asyncio.run(pool.load("b", adapters["b"]))
    assert pool.resident == ["a", "b"]


def test_counters_count_loads_unloads_and_failed_loads(pool, adapters, tmp_path):
    async def scenario():
        await pool.load("a", adapters["a"])
        await pool.load("b", adapters["b"])
        await pool.load("a", adapters["a"])  # still loaded: no load
        pool.acquire("b")
        await pool.evict("b")  # in use: unloaded only when released
        assert pool.counters.unloads == 0
        await pool.release("b")
        await pool.evict("a")
        await pool.load("a", adapters["a"])
        with pytest.raises(Exception, match="(?i)safetensor|deserializ|incomplete"):
            await pool.load("cut", truncated_copy(adapters["b"], tmp_path / "cut"))

    asyncio.run(scenario())
    counters = pool.counters.as_dict()
    assert (counters["loads"], counters["unloads"], counters["failed_loads"]) == (3, 2, 1)
    assert counters["ms_per_load"] > 0 and counters["ms_per_unload"] > 0
    assert counters["load_s"] >= pool.last_load_s > 0


def test_adapter_layers_are_the_lora_modules_of_the_model_in_order(pool, adapters):
    from peft.tuners.lora import LoraLayer

    from serve.adapter_pool import _adapter_layers

    for name, path in adapters.items():
        asyncio.run(pool.load(name, path))
    expected = [m for m in pool._base.modules() if isinstance(m, LoraLayer)]
    assert expected and [id(m) for m in _adapter_layers(pool._base)] == [id(m) for m in expected]


def test_gathered_stacks_keep_each_adapter_in_its_slot_through_unloads(pool, adapters, mixed_rank_adapters):
    from serve.gathered_lora import GatheredLora

    for name, path in {**adapters, **mixed_rank_adapters}.items():
        asyncio.run(pool.load(name, path))
    layers = pool._adapter_layers
    a, r16, b, r4 = (pool._slot_of[name] for name in ("a", "r16", "b", "r4"))  # their names in the peft model
    stacks = GatheredLora()
    stacks.sync(layers, [a, r16, b, r4])
    before = {slot: (stacks._stacks[0].a[stacks.slots[slot]], stacks._stacks[0].b[stacks.slots[slot]])
              for slot in (b, r4)}
    assert all(x.any() for pair in before.values() for x in pair)
    stacks.sync(layers, [b, r4])  # unload a and r16: the rest move down, the rank stays padded to 16
    assert stacks.adapters == [b, r4] and stacks.slots == {b: 1, r4: 2}
    assert stacks._stacks[0].a.shape[0] == 3 and stacks._stacks[0].a.device == layers[0].weight.device
    for slot, (a, b) in before.items():
        assert torch.equal(stacks._stacks[0].a[stacks.slots[slot]], a)
        assert torch.equal(stacks._stacks[0].b[stacks.slots[slot]], b)
    assert not stacks._stacks[0].a[0].any() and not stacks._stacks[0].b[0].any()  # slot 0 is still the base
