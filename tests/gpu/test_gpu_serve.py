"""GPU check of the adapter pool: gathered mixed-adapter forwards and unloads with the stacks on the GPU.

Unloading restacks the adapters with an index that must live on the stacks' device. Skipped without CUDA.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.adapter_pool import AdapterPool

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_unloads_on_the_gpu_keep_the_other_adapters_right(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, DynamicCache

    from serve.synthetic import write_random_adapters

    adapters = write_random_adapters(tiny_model_dir, tmp_path, {"a": 1, "b": 2, "c": 3})
    pools = {
        gathered: AdapterPool(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda().eval(), gathered=gathered
        )
        for gathered in (True, False)
    }
    names = ["c", "__base__", "a", "c"]
    ids = torch.tensor([tiny_tokenizer("hello there")["input_ids"]] * len(names), device="cuda")
    positions = torch.arange(ids.shape[1], device="cuda").expand_as(ids)
    logits = {}
    for gathered, pool in pools.items():
        for name, path in adapters.items():
            asyncio.run(pool.load(name, path))
        asyncio.run(pool.evict("b"))  # restacks a and c without b's slot, on the GPU
        assert pool.resident == ["a", "c"] and pool.gathered == gathered
        logits[gathered] = pool.forward(ids, torch.ones_like(ids), positions, DynamicCache(), names)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-4, rtol=0)
