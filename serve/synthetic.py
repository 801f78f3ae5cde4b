"""Seeded random LoRA adapters, for exercising serving (tests, benchmarks, demos) without training first.

Each adapter has random ``lora_B`` weights (peft initialises them to zero, which would make every
adapter equal to the base model), so different seeds give visibly different greedy completions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ftune.adapters import add_adapter, save_adapter
from ftune.config import LoraConfig


def write_random_adapters(
    base_model_dir: str | Path,
    out_dir: str | Path,
    seeds: dict[str, int],
    *,
    r: int = 8,
    scale: float = 0.5,
    use_dora: bool = False,
) -> dict[str, Path]:
    """Write one PEFT adapter per name into ``out_dir/<name>``.

    Args:
        base_model_dir: Hugging Face model directory the adapters are made for.
        out_dir: Parent directory of the adapters.
        seeds: Adapter name -> seed of its weights.
        r: LoRA rank.
        scale: Standard deviation of the random lora_B weights.
        use_dora: Make DoRA adapters (which cannot be served in mixed batches; for error tests).

    Returns:
        Adapter name -> its directory.
    """
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    out = {}
    for name, seed in seeds.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = add_adapter(
                copy.deepcopy(base), LoraConfig(r=r, alpha=2.0 * r, dropout=0.0, use_dora=use_dora)
            )
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if "lora_B" in param_name:
                        param.normal_(0.0, scale)
        out[name] = save_adapter(model, Path(out_dir) / name)
    return out
