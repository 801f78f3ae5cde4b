"""GPU check of the adapter pool: gathered mixed-adapter forwards, unloads and slot reuse on the GPU.

Deleting a slot restacks the adapters with an index that must live on the stacks' device; a slot reuse
copies tensors read on the CPU into the GPU weights and stacks. Skipped without CUDA.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.adapter_pool import AdapterPool

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_unloads_and_slot_reuse_on_the_gpu_keep_the_adapters_right(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, DynamicCache

    from serve.synthetic import write_random_adapters

    adapters = write_random_adapters(tiny_model_dir, tmp_path, {"a": 1, "b": 2, "c": 3, "d": 4})
    adapters.update(write_random_adapters(tiny_model_dir, tmp_path, {"r4": 5}, r=4))

    def pool(gathered: bool) -> AdapterPool:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda().eval()
        return AdapterPool(model, gathered=gathered)

    pools = {"gathered": pool(True), "peft loop": pool(False), "fresh": pool(True)}
    names = ["c", "__base__", "d", "r4", "c"]
    ids = torch.tensor([tiny_tokenizer("hello there")["input_ids"]] * len(names), device="cuda")
    positions = torch.arange(ids.shape[1], device="cuda").expand_as(ids)
    logits = {}
    for label, served in pools.items():
        steps = [("load", "c"), ("load", "d"), ("load", "r4")]
        if label != "fresh":
            steps = [("load", "a"), ("load", "b"), ("load", "c"), ("evict", "b"),
                     ("load", "d"),  # copied into b's vacant slot: read on the CPU, copied into GPU weights
                     ("evict", "a"), ("load", "r4")]  # another rank: a's slot deleted, restacked on the GPU
        for step, name in steps:
            asyncio.run(served.load(name, adapters[name]) if step == "load" else served.evict(name))
        assert served.resident == ["c", "d", "r4"] and served.vacant_slots == 0
        assert served.counters.slot_reuses == (0 if label == "fresh" else 1)
        assert served.gathered == (label != "peft loop")
        logits[label] = served.forward(ids, torch.ones_like(ids), positions, DynamicCache(), names)
    torch.testing.assert_close(logits["gathered"], logits["fresh"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits["peft loop"], logits["fresh"], atol=1e-4, rtol=0)
