"""Mixed-adapter LoRA in two batched matmuls per layer, whatever the number of adapters in the batch.

peft's mixed-batch forward (``adapter_names``) loops over the adapters present in a batch: per layer
and per adapter an index, two small matmuls and an index-add, so a batch that mixes 8 adapters costs
several times a single-adapter batch. Here every layer keeps its loaded adapters stacked,

    A: [n + 1, r_max, in]      B: [n + 1, out, r_max]   (scaling folded into B, slot 0 all zeros = base)

and a batch gathers each row's slot and applies ``x @ A[i].T @ B[i].T`` with two ``bmm`` calls (the
idea of S-LoRA's and Punica's gathered kernels, in plain torch). Adapters of lower rank are padded
with zeros, which changes nothing in the product. A batch whose rows all use one adapter takes two
plain matmuls instead. The gathered per-row weights are kept while the batch's composition stays the
same (a decode's rows stay for many steps).

Only vanilla LoRA on ``nn.Linear`` layers is stacked. With a DoRA (or other variant) adapter, a
``lora_bias`` or a non-Linear LoRA layer loaded, :meth:`GatheredLora.supports` is false and the
caller keeps peft's own mixed-batch forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch

from ftune.compat.peft_private import adapters_disabled, set_adapters_disabled

BASE_SLOT = 0


@dataclass
class _Stack:
    a: torch.Tensor
    """[n + 1, r_max, in]: every adapter's lora_A weight, zero-padded to the largest rank."""
    b: torch.Tensor
    """[n + 1, out, r_max]: every adapter's lora_B weight times its scaling, zero-padded."""


class GatheredLora:
    """The loaded adapters of a peft model, stacked per layer for gathered mixed-batch forwards."""

    def __init__(self) -> None:
        self.adapters: list[str] = []
        """Stacked adapters; adapter ``adapters[i]`` lives in slot ``i + 1``."""
        self.slots: dict[str, int] = {}
        self.layers: list[torch.nn.Module] = []
        self.reason: str | None = "no adapter loaded"
        """Why the loaded adapters cannot be gathered (None when they can)."""
        self._stacks: list[_Stack] = []
        # Rows' gathered (A^T, B^T) per layer for the last batch composition: a decode keeps its rows for
        # many steps, so the gather is done once per composition, not once per layer and step.
        self._gathered_for: tuple[int, ...] | None = None
        self._gathered: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def supports(self) -> bool:
        """Whether every loaded adapter can be applied by gathering (else: use peft's mixed batch)."""
        return self.reason is None

    def sync(self, layers: list[torch.nn.Module], adapters: list[str]) -> None:
        """Stack exactly ``adapters`` of ``layers``; after a load or an unload only the change is restacked."""
        self._gathered_for = None
        reason = _unsupported(layers, adapters) if adapters else "no adapter loaded"
        if reason is not None:
            self.adapters, self.slots, self.layers, self._stacks, self.reason = [], {}, [], [], reason
            return
        if self.reason is not None or [id(m) for m in layers] != [id(m) for m in self.layers]:
            self.adapters, self.slots, self.layers, self._stacks = [], {}, list(layers), []
            self._stacks = [_Stack(*_empty_slot(layer)) for layer in self.layers]
        self.reason = None
        kept = [name for name in self.adapters if name in adapters]
        if kept != self.adapters:
            # On the stacks' device: index_select wants its index where its input is (a GPU replica).
            slots = [BASE_SLOT] + [self.slots[name] for name in kept]
            index = torch.tensor(slots, device=self._stacks[0].a.device)
            self._stacks = [_Stack(s.a.index_select(0, index), s.b.index_select(0, index)) for s in self._stacks]
        added = [name for name in adapters if name not in kept]
        if added:
            self._stacks = [_append(layer, stack, added) for layer, stack in zip(self.layers, self._stacks)]
        self.adapters = kept + added
        self.slots = {name: i + 1 for i, name in enumerate(self.adapters)}

    def refresh(self, adapter: str) -> None:
        """Restack ``adapter`` in its slot after its weights and scalings were overwritten in place."""
        if self.reason is not None or adapter not in self.slots:
            return
        self._gathered_for = None
        slot = self.slots[adapter]
        for layer, stack in zip(self.layers, self._stacks):
            stack.a[slot].zero_()
            stack.b[slot].zero_()
            if adapter in layer.lora_A:
                a, b = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
                stack.a[slot, : a.shape[0]] = a.to(stack.a.dtype)
                stack.b[slot, :, : b.shape[1]] = b.to(stack.b.dtype) * layer.scaling[adapter]

    def slots_of(self, adapter_names: list[str]) -> torch.Tensor:
        """Each row's slot (0 for the base model and for adapters unknown to this stack)."""
        return torch.tensor([self.slots.get(name, BASE_SLOT) for name in adapter_names], dtype=torch.long)

    @contextmanager
    def applied(self, adapter_names: list[str]) -> Iterator[None]:
        """Within the block, forward passes apply each row's adapter by gathering (peft's own path is off)."""
        slots = self.slots_of(adapter_names)
        uniform = int(slots[0]) if bool((slots == slots[0]).all()) else None
        if uniform == BASE_SLOT:
            hook = None  # the base model alone: nothing to add
        elif uniform is not None:
            hook = _uniform_hook(uniform)
        else:
            hook = _gathered_delta
            self._gather(slots)
        handles, disabled = [], []
        try:
            for i, (layer, stack) in enumerate(zip(self.layers, self._stacks)):
                disabled.append((layer, adapters_disabled(layer)))
                set_adapters_disabled(layer, True)  # peft's forward: the base layer only
                if hook is not None:
                    weights = self._gathered[i] if hook is _gathered_delta else stack
                    handles.append(layer.register_forward_hook(_bound(hook, weights)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, flag in disabled:
                set_adapters_disabled(layer, flag)

    def _gather(self, slots: torch.Tensor) -> None:
        key = tuple(slots.tolist())
        if key == self._gathered_for:
            return
        index = slots.to(self._stacks[0].a.device)
        self._gathered = [
            (s.a.index_select(0, index).transpose(1, 2), s.b.index_select(0, index).transpose(1, 2))
            for s in self._stacks
        ]  # per layer: [rows, in, r], [rows, r, out]
        self._gathered_for = key


def _empty_slot(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot 0 (the base model: no delta) of a layer's stacks."""
    weight = layer.get_base_layer().weight
    out_features, in_features = weight.shape
    zeros = partial(torch.zeros, dtype=weight.dtype, device=weight.device)
    return zeros(1, 1, in_features), zeros(1, out_features, 1)


def _append(layer, stack: _Stack, names: list[str]) -> _Stack:
    """``stack`` with one slot more per name (zeros where the layer has no such adapter), padded to the new rank."""
    dtype = stack.a.dtype
    a_new, b_new = [], []
    for name in names:
        if name in layer.lora_A:
            a_new.append(layer.lora_A[name].weight.detach().to(dtype))
            b_new.append(layer.lora_B[name].weight.detach().to(dtype) * layer.scaling[name])
        else:
            a_new.append(stack.a.new_zeros(1, stack.a.shape[-1]))
            b_new.append(stack.b.new_zeros(stack.b.shape[1], 1))
    r_max = max(stack.a.shape[1], *(a.shape[0] for a in a_new))
    pad = torch.nn.functional.pad
    a = torch.cat([pad(stack.a, (0, 0, 0, r_max - stack.a.shape[1]))]
                  + [pad(x, (0, 0, 0, r_max - x.shape[0]))[None] for x in a_new])
    b = torch.cat([pad(stack.b, (0, r_max - stack.b.shape[2]))] + [pad(x, (0, r_max - x.shape[1]))[None] for x in b_new])
    return _Stack(a, b)


def _bound(hook, weights):
    def forward_hook(module, args, output):
        return output + hook(weights, args[0]).to(output.dtype)

    return forward_hook


def _uniform_hook(slot: int):
    def delta(stack: _Stack, x: torch.Tensor) -> torch.Tensor:
        x = x.to(stack.a.dtype)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, stack.a[slot]), stack.b[slot])

    return delta


def _gathered_delta(weights: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    a, b = weights  # [rows, in, r], [rows, r, out]
    flat = x.to(a.dtype).reshape(x.shape[0], -1, x.shape[-1])  # [rows, tokens, in]
    return torch.bmm(torch.bmm(flat, a), b).reshape(*x.shape[:-1], b.shape[-1])


def _unsupported(layers: list[torch.nn.Module], adapters: list[str]) -> str | None:
    """Why the loaded adapters cannot be gathered, or None when they can."""
    from peft.tuners.lora import Linear as LoraLinear

    for layer in layers:
        if not isinstance(layer, LoraLinear):
            return f"{type(layer).__name__} layer (only Linear LoRA layers are stacked)"
        if not isinstance(layer.get_base_layer(), torch.nn.Linear):
            return f"base layer {type(layer.get_base_layer()).__name__} (quantized or custom)"
        for name in adapters:
            if name in getattr(layer, "lora_variant", {}):
                return f"adapter {name!r} is a LoRA variant (e.g. DoRA)"
            if name in layer.lora_B and layer.lora_B[name].bias is not None:
                return f"adapter {name!r} has a LoRA bias"
    return None
