"""GPU smoke test: LoRA and QLoRA train a ~100M Llama for a few steps in the training job's DeepSpeed engine.

bf16 (where supported), sdpa attention, ZeRO-2 on a single-rank NCCL group, built by
``train.loop.build_engine`` from a model saved with save_pretrained, as a worker of the training job
does. Skipped without CUDA.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 12
SEQ_LEN = 256
MICRO_BATCH = 4


@pytest.fixture(scope="module")
def llama_100m(tmp_path_factory) -> Path:
    """A random-weight Llama of about 100M parameters (768 wide, 12 layers, GQA), saved in HF format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    path = tmp_path_factory.mktemp("llama-100m")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    assert 90e6 < model.num_parameters() < 130e6
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def single_rank_group():
    """A one-process NCCL group: what Ray Train gives each worker and DeepSpeed needs."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_train_on_gpu(llama_100m, single_rank_group, method):
    from ftune.config import TrainJobConfig
    from train.loop import build_engine

    cfg = TrainJobConfig.model_validate(
        {
            "model": {
                "name_or_path": str(llama_100m),
                "load_in_4bit": method == "qlora",
                "attn_implementation": "sdpa",
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"max_seq_len": SEQ_LEN},
            "train": {
                "lr": 2e-3,
                "micro_batch_size": MICRO_BATCH,
                "global_batch_size": MICRO_BATCH,
                "max_steps": STEPS,
                "warmup_ratio": 0.0,
                "lr_schedule": "constant",
                "precision": "auto",
            },
            "scaling": {"num_workers": 1, "use_gpu": True},
        }
    )
    torch.cuda.reset_peak_memory_stats()
    engine, ds_config = build_engine(cfg, 1, STEPS, user_deepspeed={})
    assert ds_config["bf16"]["enabled"] is torch.cuda.is_bf16_supported()  # precision auto
    assert ds_config["zero_optimization"]["stage"] == 2
    base = engine.module.get_base_model()
    assert getattr(base, "is_loaded_in_4bit", False) is (method == "qlora")
    frozen = {n: p.detach().clone() for n, p in engine.module.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().float().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert all(p.device.type == "cuda" for p in engine.module.parameters())

    # One repeated batch of a constant token: an adapter learns to predict it within a few steps.
    ids = torch.full((MICRO_BATCH, SEQ_LEN), 1234, dtype=torch.long, device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    engine.train()
    losses = []
    for _ in range(STEPS):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))

    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0] / 2, losses
    for name, param in engine.module.named_parameters():
        if name in frozen:
            assert torch.equal(param.detach(), frozen[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(param.detach().float(), lora[name]), f"adapter {name} did not change"
    assert torch.cuda.max_memory_allocated() > 0
    del engine
    torch.cuda.empty_cache()
