"""Loading an adapter into the weights of one that was evicted, instead of through peft's injection.

Under LRU churn nearly every load follows an eviction. peft deletes the evicted adapter and injects the
new one, and its injection walks every module of the model (each loaded adapter's own submodules
included) several times: most of a load's time, growing with the adapters loaded. When the incoming
adapter has the same structure as the evicted one (same target modules and ranks, same flags), its
tensors can instead be copied into the evicted adapter's weights, already allocated in every layer
(its *slot*): the model's structure does not change at all, only weights and per-layer scalings do.

What may differ between the slot's adapter and the new one (:data:`FREE_FIELDS`): ``lora_alpha``
(the scaling is set per layer from the new config, as peft computes it), the dropout (inert in eval
mode) and fields that describe where the adapter came from. Anything else falls back to peft.

A read that fails (a truncated file, a missing or misshapen tensor) fails before anything is copied;
the slot is left as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serve.registry import WEIGHTS_FILE

KEY_PREFIX = "base_model.model."
"""What peft puts before a module's name in a saved adapter's tensor names."""

FREE_FIELDS = frozenset(
    {"lora_alpha", "lora_dropout", "base_model_name_or_path", "revision", "inference_mode",
     "init_lora_weights", "peft_version"}
)
"""Config fields in which a slot's adapter and the adapter copied into it may differ."""


@dataclass(frozen=True)
class SlotWeights:
    """An adapter read from disk and checked against a slot, ready to be copied in."""

    config: Any
    """Its peft ``LoraConfig``."""
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Layer name -> (lora_A weight, lora_B weight), one entry per layer the slot has."""


def slot_layers(named_layers: list[tuple[str, torch.nn.Module]], slot: str) -> dict[str, torch.nn.Module]:
    """The LoRA layers (by module name) that hold adapter ``slot``."""
    return {name: layer for name, layer in named_layers if slot in getattr(layer, "lora_A", {})}


def why_not_reusable(config: Any, layers: dict[str, torch.nn.Module], slot: str) -> str | None:
    """Why adapter ``slot`` cannot take another adapter's weights (None when it can)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(config, LoraConfig):
        return f"a {type(config).__name__}, not plain LoRA"
    if config.modules_to_save or config.trainable_token_indices or config.alpha_pattern:
        return "modules_to_save, trainable tokens or an alpha_pattern"
    if not layers:
        return "no LoRA layer"
    for name, layer in layers.items():
        if not isinstance(layer, LoraLinear) or slot in getattr(layer, "lora_variant", {}):
            return f"{name}: not a plain Linear LoRA layer (e.g. DoRA)"
        if layer.lora_B[slot].bias is not None:
            return f"{name}: has a LoRA bias"
    return None


def why_incompatible(slot_config: Any, new_config: Any) -> str | None:
    """Why an adapter with ``new_config`` cannot go into a slot made for ``slot_config`` (None: it can)."""
    if type(new_config) is not type(slot_config):
        return f"a {type(new_config).__name__}, the slot holds a {type(slot_config).__name__}"
    old, new = _shaping_fields(slot_config), _shaping_fields(new_config)
    differ = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return f"differs in {', '.join(differ)}" if differ else None


def _shaping_fields(config: Any) -> dict[str, Any]:
    fields = {key: value for key, value in config.to_dict().items() if key not in FREE_FIELDS}
    return {key: sorted(value) if isinstance(value, (set, frozenset)) else value
            for key, value in fields.items()}


def read_config(adapter_dir: Path) -> Any:
    """The adapter's peft config, as peft's own ``load_adapter`` would make it (for inference)."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    return config


def read_for_slot(
    adapter_dir: Path, layers: dict[str, torch.nn.Module], slot: str, config: Any
) -> SlotWeights | None:
    """Read the adapter's weights (safetensors only) and check each against the slot's weight.

    Returns None when the file's tensors are not exactly the slot's (other modules, extra tensors):
    then peft's own loader decides. Raises, before anything is copied, when the file cannot be read
    or a tensor has the wrong shape.
    """
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / WEIGHTS_FILE), device="cpu")
    expected = {f"{KEY_PREFIX}{name}.lora_{ab}.weight" for name in layers for ab in "AB"}
    if set(state) != expected:
        return None
    tensors = {}
    for name, layer in layers.items():
        pair = []
        for ab, module in (("A", layer.lora_A[slot]), ("B", layer.lora_B[slot])):
            key = f"{KEY_PREFIX}{name}.lora_{ab}.weight"
            if state[key].shape != module.weight.shape:
                raise ValueError(f"{key} has shape {list(state[key].shape)}, the model expects "
                                 f"{list(module.weight.shape)}")
            if not state[key].dtype.is_floating_point:
                raise ValueError(f"{key} holds {state[key].dtype}, not floating-point weights")
            pair.append(state[key])
        tensors[name] = (pair[0], pair[1])
    return SlotWeights(config, tensors)


def copy_into_slot(weights: SlotWeights, layers: dict[str, torch.nn.Module], slot: str) -> None:
    """Copy ``weights`` into adapter ``slot``'s weights; set each layer's alpha and scaling as peft would."""
    config = weights.config
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = weights.tensors[name]
            layer.lora_A[slot].weight.copy_(a)
            layer.lora_B[slot].weight.copy_(b)
            r = layer.r[slot]  # the slot's rank in this layer (rank_pattern included), the new one's too
            layer.lora_alpha[slot] = config.lora_alpha
            layer.scaling[slot] = config.lora_alpha / (math.sqrt(r) if config.use_rslora else r)
