"""The configuration reference is generated from the typed configs and the committed copy is current."""

from __future__ import annotations

import pydantic

from ftune_cli.config_reference import DOC_PATH, REGENERATE, documents, render, type_name


def test_committed_reference_is_current():
    assert DOC_PATH.is_file(), f"{DOC_PATH} is missing; generate it with `{REGENERATE}`"
    current = DOC_PATH.read_text(encoding="utf-8") == render()
    assert current, (
        f"{DOC_PATH} is stale (a config field, type, default or docstring changed); regenerate it with `{REGENERATE}`"
    )


def _fields(model: type[pydantic.BaseModel], prefix: str = ""):
    """Every (dotted key, field) of a config class and the classes it nests directly."""
    from ftune_cli.config_reference import item_model, nested_model

    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        yield key, field
        child, suffix = nested_model(field.annotation), ""
        if child is None and item_model(field.annotation):
            suffix, child = item_model(field.annotation)
        if child is not None and child not in {d.model for d in documents()}:
            yield from _fields(child, f"{key}{suffix}.")


def test_every_key_is_listed_with_its_docstring():
    text = render()
    undocumented = []
    for doc in documents():
        for key, field in _fields(doc.model):
            assert f"| `{key}` |" in text, f"{doc.title}: {key} is missing from the reference"
            if not (field.description or "").strip():
                undocumented.append(f"{doc.model.__name__}: {key}")
    assert not undocumented, f"fields without a docstring under them: {undocumented}"


def test_reference_shows_types_defaults_and_bounds():
    text = render()
    assert "| `lora.r` | int (>= 1, <= 1024) | `8` | LoRA rank" in text
    assert '| `model.bnb_4bit_quant_type` | "nf4" \\| "fp4" | `nf4` |' in text
    assert "| `space.<name>.loguniform` | tuple[float, float] \\| null | `null` |" in text
    assert "| `applications[].args` | [ServingConfig](#serving-application) |" in text
    assert "| `instance_types.<name>.on_demand` | float (> 0.0) | required |" in text


def test_type_names_read_like_yaml():
    from typing import Literal

    assert type_name(int | None) == "int | null"
    assert type_name(list[str] | Literal["all-linear"]) == 'list[str] | "all-linear"'
    assert type_name(dict[str, float]) == "dict[str, float]"
    assert type_name(tuple[int, int]) == "tuple[int, int]"
