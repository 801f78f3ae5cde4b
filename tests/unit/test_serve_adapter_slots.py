"""Slot reuse: a load after an eviction copies the adapter into the evicted adapter's weights, and serves
exactly what peft's own load would; anything of another structure, or a bad file, does not get in."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from serve import adapter_slots
from serve.adapter_pool import AdapterPool
from serve.registry import WEIGHTS_FILE


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    out = tmp_path_factory.mktemp("slots")
    made = write_random_adapters(tiny_model_dir, out, {"a": 1, "b": 2, "c": 3})
    made["c_alpha3"] = with_config(made["c"], out / "c_alpha3", lora_alpha=3.0, lora_dropout=0.1)
    made["c_rslora"] = with_config(made["c"], out / "c_rslora", use_rslora=True)
    made.update(write_random_adapters(tiny_model_dir, out, {"r4": 4}, r=4))
    return made


def with_config(adapter: Path, where: Path, **changes) -> Path:
    """A copy of ``adapter`` whose adapter_config.json has ``changes``."""
    copy = shutil.copytree(adapter, where)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy


def make_pool(tiny_model_dir, gathered=True) -> AdapterPool:
    from transformers import AutoModelForCausalLM

    return AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), gathered=gathered)


def logits(pool, tokenizer, names):
    from transformers import DynamicCache

    ids = torch.tensor([tokenizer("hello there, slot")["input_ids"]] * len(names))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return pool.forward(ids, torch.ones_like(ids), positions, DynamicCache(), names)


def peft_reference(tiny_model_dir, tokenizer, paths: dict[str, Path], names):
    """What peft's own loads and mixed-batch forward give for rows ``names``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (first, path), *rest = paths.items()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(path), adapter_name=first)
    for name, path in rest:
        model.load_adapter(str(path), adapter_name=name)
    ids = torch.tensor([tokenizer("hello there, slot")["input_ids"]] * len(names))
    with torch.inference_mode():
        return model.eval()(input_ids=ids, adapter_names=names).logits[:, -1, :]


def evict_a_keep_b(pool, adapters):
    async def scenario():
        await pool.load("a", adapters["a"])
        await pool.load("b", adapters["b"])
        await pool.evict("a")

    asyncio.run(scenario())
    assert pool.vacant_slots == 1 and pool.loaded == ["b"] and pool.resident == ["b"]


@pytest.mark.parametrize("gathered", [True, False])
@pytest.mark.parametrize("incoming", ["c", "c_alpha3"])
def test_a_load_into_a_vacant_slot_serves_what_a_fresh_peft_load_does(
    tiny_model_dir, tiny_tokenizer, adapters, gathered, incoming
):
    pool = make_pool(tiny_model_dir, gathered)
    evict_a_keep_b(pool, adapters)
    neighbour = logits(pool, tiny_tokenizer, ["b", "__base__"])
    asyncio.run(pool.load(incoming, adapters[incoming]))
    assert pool.counters.slot_reuses == 1 and pool.vacant_slots == 0 and pool.gathered == gathered
    assert pool.resident == sorted(["b", incoming]) and pool.counters.loads == 3

    names = [incoming, "b", "__base__", incoming]
    served = logits(pool, tiny_tokenizer, names)
    loaded = {"b": adapters["b"], incoming: adapters[incoming]}
    expected = peft_reference(tiny_model_dir, tiny_tokenizer, loaded, names)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(served[1:3], neighbour, atol=1e-6, rtol=0)  # the other rows as before
    assert not torch.allclose(served[0], neighbour[0], atol=1e-3)
    torch.testing.assert_close(logits(pool, tiny_tokenizer, [incoming])[0], served[0], atol=1e-5, rtol=0)


def test_the_slot_takes_the_new_adapters_config(tiny_model_dir, adapters):
    pool = make_pool(tiny_model_dir)
    evict_a_keep_b(pool, adapters)
    asyncio.run(pool.load("c", adapters["c_alpha3"]))
    slot = pool._slot_of["c"]
    assert pool._peft.peft_config[slot].lora_alpha == 3.0
    layer = adapter_slots.slot_layers(pool._named_layers, slot)
    assert layer and all(m.scaling[slot] == 3.0 / 8 and m.lora_alpha[slot] == 3.0 for m in layer.values())


@pytest.mark.parametrize("incoming", ["c_rslora", "r4"])
def test_an_adapter_of_another_structure_goes_through_peft(
    tiny_model_dir, tiny_tokenizer, adapters, incoming
):
    pool = make_pool(tiny_model_dir)
    evict_a_keep_b(pool, adapters)
    asyncio.run(pool.load(incoming, adapters[incoming]))
    assert pool.counters.slot_reuses == 0 and pool.vacant_slots == 0  # the vacant slot was deleted
    assert len(pool._peft.peft_config) == 2 and pool.resident == sorted(["b", incoming])
    names = [incoming, "b"]
    loaded = {"b": adapters["b"], incoming: adapters[incoming]}
    expected = peft_reference(tiny_model_dir, tiny_tokenizer, loaded, names)
    torch.testing.assert_close(logits(pool, tiny_tokenizer, names), expected, atol=1e-5, rtol=0)


def bad_copies(adapter: Path, where: Path) -> dict[str, Path]:
    """A truncated copy of ``adapter`` and one whose first tensor has the wrong shape."""
    from safetensors.torch import load_file, save_file

    cut = shutil.copytree(adapter, where / "cut")
    (cut / WEIGHTS_FILE).write_bytes((adapter / WEIGHTS_FILE).read_bytes()[:-1000])
    shaped = shutil.copytree(adapter, where / "shaped")
    state = load_file(adapter / WEIGHTS_FILE)
    first = sorted(state)[0]
    state[first] = state[first][:, :-1].contiguous()
    save_file(state, shaped / WEIGHTS_FILE)
    return {"cut": cut, "shaped": shaped}


@pytest.mark.parametrize("bad", ["cut", "shaped"])
def test_a_bad_file_leaves_the_vacant_slot_and_the_neighbours_as_they_were(
    tiny_model_dir, tiny_tokenizer, adapters, tmp_path, bad
):
    pool = make_pool(tiny_model_dir)
    evict_a_keep_b(pool, adapters)
    slot = pool._vacant[0]
    weights = {name: layer.lora_A[slot].weight.clone() for name, layer in pool._named_layers}
    before = logits(pool, tiny_tokenizer, ["b", "__base__"])
    with pytest.raises(Exception, match="(?i)safetensor|deserializ|incomplete|shape"):
        asyncio.run(pool.load(bad, bad_copies(adapters["c"], tmp_path)[bad]))
    assert pool.loaded == ["b"] and pool.resident == ["b"] and pool._vacant == [slot]
    assert pool.counters.failed_loads == 1 and pool.counters.slot_reuses == 0
    assert all(torch.equal(layer.lora_A[slot].weight, weights[name]) for name, layer in pool._named_layers)
    assert torch.equal(logits(pool, tiny_tokenizer, ["b", "__base__"]), before)

    asyncio.run(pool.load("c", adapters["c"]))  # the slot still takes a good adapter
    assert pool.counters.slot_reuses == 1
    loaded = {"b": adapters["b"], "c": adapters["c"]}
    expected = peft_reference(tiny_model_dir, tiny_tokenizer, loaded, ["c", "b"])
    torch.testing.assert_close(logits(pool, tiny_tokenizer, ["c", "b"]), expected, atol=1e-5, rtol=0)


def test_a_copy_that_fails_half_way_frees_the_slot(tiny_model_dir, tiny_tokenizer, adapters, monkeypatch):
    pool = make_pool(tiny_model_dir)
    evict_a_keep_b(pool, adapters)
    slot = pool._vacant[0]
    before = logits(pool, tiny_tokenizer, ["b", "__base__"])

    def copy_one_layer_then_fail(weights, layers, slot):
        name = next(iter(layers))
        layers[name].lora_A[slot].weight.data.copy_(weights.tensors[name][0])
        raise RuntimeError("copy failed")

    monkeypatch.setattr(adapter_slots, "copy_into_slot", copy_one_layer_then_fail)
    with pytest.raises(RuntimeError, match="copy failed"):
        asyncio.run(pool.load("c", adapters["c"]))
    assert slot not in pool._peft.peft_config and pool.vacant_slots == 0
    assert all(slot not in layer.lora_A for _, layer in pool._named_layers)
    assert pool.resident == ["b"] and pool.loaded == ["b"] and pool.gathered
    torch.testing.assert_close(logits(pool, tiny_tokenizer, ["b", "__base__"]), before, atol=1e-6, rtol=0)


def test_an_evicted_dora_adapter_is_deleted_not_kept(tiny_model_dir, adapters, tmp_path):
    from serve.synthetic import write_random_adapters

    pool = make_pool(tiny_model_dir)
    dora = write_random_adapters(tiny_model_dir, tmp_path, {"d": 5}, use_dora=True)["d"]
    asyncio.run(pool.load("d", dora))
    asyncio.run(pool.evict("d"))
    assert pool.vacant_slots == 0 and not pool._peft.peft_config


def test_config_fields_that_do_not_shape_a_slot_may_differ(adapters):
    base = adapter_slots.read_config(adapters["c"])
    assert adapter_slots.why_incompatible(base, adapter_slots.read_config(adapters["c_alpha3"])) is None
    rslora = adapter_slots.read_config(adapters["c_rslora"])
    assert adapter_slots.why_incompatible(base, rslora) == "differs in use_rslora"
    assert adapter_slots.why_incompatible(base, adapter_slots.read_config(adapters["r4"])) == "differs in r"
