"""Nested mappings: config layers merged key by key."""

from __future__ import annotations

from typing import Any


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it, section by section; neither input is modified, though the
    result may share the sections ``override`` leaves untouched with ``base``.

    A mapping in ``override`` merges into the mapping at the same key of ``base``, so a layer sets only
    the keys it names (``{train: {lr: 1e-4}}`` keeps the rest of ``train``); any other value, a list
    included, replaces what was there.
    """
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
