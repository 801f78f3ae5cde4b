"""LoRA / DoRA / QLoRA wrapping of the tiny Llama: counts, frozen base, PEFT-format round trip."""

from __future__ import annotations

import json

import pytest
import torch

from ftune.adapters import (
    add_adapter,
    expected_trainable_parameters,
    load_adapter,
    save_adapter,
    targeted_linears,
    trainable_parameters,
)
from ftune.config import LoraConfig, ModelConfig
from ftune.model import load_base_model, resolve_precision


@pytest.fixture()
def base(tiny_model_dir):
    return load_base_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32)


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(r=4),
        LoraConfig(r=8, use_dora=True),
        LoraConfig(r=16, use_rslora=True, target_modules=["q_proj", "v_proj"]),
    ],
    ids=["lora", "dora", "rslora-qv"],
)
def test_trainable_count_matches_formula(base, lora):
    expected = expected_trainable_parameters(base, lora)
    names = targeted_linears(base, lora)
    model = add_adapter(base, lora)
    assert trainable_parameters(model) == expected > 0
    assert all(".lora_" in n or "lora_magnitude" in n for n, p in model.named_parameters() if p.requires_grad)
    if lora.target_modules == "all-linear":
        assert not any(n.endswith("lm_head") for n in names)
        assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    else:
        assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}


def test_qlora_nf4_on_cpu(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), load_in_4bit=True)
    base = load_base_model(cfg, dtype=torch.float32)
    kinds = {type(m).__name__ for m in base.modules()}
    assert "Linear4bit" in kinds
    lora = LoraConfig(r=4)
    expected = expected_trainable_parameters(base, lora)
    model = add_adapter(base, lora)
    assert trainable_parameters(model) == expected
    ids = torch.tensor([[1, 5, 9, 12]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert grads and all(g is not None for g in grads)


def test_adapter_saves_in_peft_format_and_reloads(base, tiny_model_dir, tmp_path):
    model = add_adapter(base, LoraConfig(r=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 12, 20]])
    expected = model(input_ids=ids).logits
    out = save_adapter(model, tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    fresh = load_base_model(ModelConfig(name_or_path=str(tiny_model_dir)), dtype=torch.float32, for_training=False)
    reloaded = load_adapter(fresh, out)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_precision_resolution():
    assert resolve_precision("auto", use_gpu=False) == torch.float32
    assert resolve_precision("bf16", use_gpu=False) == torch.bfloat16
