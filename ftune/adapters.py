"""LoRA, DoRA and QLoRA adapters via peft: build, count, save and load in standard PEFT format."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ftune.config import LoraConfig

OUTPUT_LAYER_NAMES = ("lm_head",)


def peft_config(cfg: LoraConfig):
    """The peft.LoraConfig for a lora section (task: causal LM)."""
    import peft

    return peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias=cfg.bias,
    )


def add_adapter(model: nn.Module, cfg: LoraConfig, *, gradient_checkpointing: bool = False):
    """Wrap a frozen base model in a trainable peft adapter.

    4-bit (QLoRA) models are first prepared with peft's ``prepare_model_for_kbit_training``.
    """
    import peft

    if getattr(model, "is_loaded_in_4bit", False):
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft_config(cfg))


def targeted_linears(model: nn.Module, cfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of the linear layers the adapter will wrap."""
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        if not isinstance(module, nn.Linear) and "Linear" not in type(module).__name__:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if cfg.target_modules == "all-linear":
            if leaf in OUTPUT_LAYER_NAMES:
                continue
        elif leaf not in cfg.target_modules:
            continue
        out[name] = (module.in_features, module.out_features)
    return out


def expected_trainable_parameters(model: nn.Module, cfg: LoraConfig) -> int:
    """Trainable parameters the adapter adds: r·(in+out) per layer, plus out for DoRA's magnitude."""
    total = 0
    for fan_in, fan_out in targeted_linears(model, cfg).values():
        total += cfg.r * (fan_in + fan_out)
        if cfg.use_dora:
            total += fan_out
    return total


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter weights (the state peft saves)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (what PeftModel.from_pretrained reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_adapter(base_model: nn.Module, adapter_dir: str | Path, *, name: str = "default"):
    """Attach a saved adapter to a base model with PeftModel.from_pretrained (safetensors only)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=name, is_trainable=False)
