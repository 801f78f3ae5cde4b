"""PEFT internals ftune relies on, each wrapped once (tested in test_compat)."""

from __future__ import annotations

from typing import Any


def adapters_disabled(layer: Any) -> bool:
    """Whether a PEFT LoRA layer's forward skips its adapters (``BaseTunerLayer.disable_adapters``)."""
    return bool(layer.disable_adapters)


def set_adapters_disabled(layer: Any, disabled: bool) -> None:
    """Make a PEFT LoRA layer's forward run the base layer alone (``disabled``) or apply its adapters.

    Sets ``BaseTunerLayer._disable_adapters``: the public ``enable_adapters`` also flips ``requires_grad``
    of every adapter weight, which a server toggling it around each forward pass must not do.
    """
    layer._disable_adapters = disabled
