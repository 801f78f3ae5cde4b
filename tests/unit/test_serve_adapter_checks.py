"""Adapters are compared with the base model before they are served: layers, shapes, rank, whole files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftune.config import ModelConfig
from ftune.errors import ConfigError
from serve.adapter_checks import (
    BaseModelLayout,
    adapter_problems,
    base_model_layout,
    local_safetensors_header,
    other_base_model,
    weights_problems,
)
from serve.registry import CONFIG_FILE, WEIGHTS_FILE, AdapterRegistry, check_local_adapter


@pytest.fixture(scope="module")
def layout(tiny_model_dir) -> BaseModelLayout:
    return base_model_layout(ModelConfig(name_or_path=str(tiny_model_dir)))


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    root = tmp_path_factory.mktemp("adapters")
    rank_16 = write_random_adapters(tiny_model_dir, root, {"r16": 9}, r=16)
    return {**write_random_adapters(tiny_model_dir, root, {"a": 8}), **rank_16}


@pytest.fixture(scope="module")
def other_model_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """An adapter trained for a model of the same family but another width (what a mix-up looks like)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from serve.synthetic import write_random_adapters

    root = tmp_path_factory.mktemp("other")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 96
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    return write_random_adapters(root / "model", root, {"other": 3})["other"]


def problems_of(path: Path, layout: BaseModelLayout, max_rank: int = 64) -> list[str]:
    config = json.loads((path / CONFIG_FILE).read_text())
    return adapter_problems(config, local_safetensors_header(path / WEIGHTS_FILE), layout, max_rank)


def test_the_layout_from_the_config_alone_is_the_loaded_model_s(layout, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    loaded = BaseModelLayout.of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), layout.name)
    assert loaded == layout  # deploy-time checks (meta device) and a replica's (loaded model) agree
    assert layout.linears["model.layers.0.mlp.down_proj"] == (192, 64)


def test_an_adapter_made_for_the_base_model_fits(layout, adapters):
    assert problems_of(adapters["a"], layout) == []
    assert weights_problems(adapters["a"] / WEIGHTS_FILE) == []
    assert other_base_model(json.loads((adapters["a"] / CONFIG_FILE).read_text()), layout) is None


def test_an_adapter_for_another_model_is_refused_with_the_layers_that_do_not_fit(layout, other_model_adapter):
    (problem,) = problems_of(other_model_adapter, layout)
    assert "do not fit 14 layers" in problem and "for a layer of 192 -> 64" in problem


def test_rank_above_the_limit_is_refused_with_the_fix(layout, adapters):
    (problem,) = problems_of(adapters["r16"], layout, max_rank=8)
    assert "rank 16" in problem and "max_adapter_rank (8)" in problem


def test_target_modules_the_base_model_lacks_are_refused(layout, adapters, tmp_path):
    moved = shutil.copytree(adapters["a"], tmp_path / "moved")
    config = json.loads((moved / CONFIG_FILE).read_text())
    (moved / CONFIG_FILE).write_text(json.dumps({**config, "target_modules": ["query_key_value"]}))
    assert "match no layer" in problems_of(moved, layout)[0]
    extra = [*config["target_modules"], "lm_head"]  # targeted, but the file has no weights for it
    (moved / CONFIG_FILE).write_text(json.dumps({**config, "target_modules": extra}))
    assert problems_of(moved, layout) == ["has no weights for 1 targeted layers (lm_head)"]


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda b: b[:-100], "truncated"),
        (lambda b: b + b"\0" * 8, "the file has"),
        (lambda b: b[:4], "too short"),
        (lambda b: b"\xff" * 16 + b[16:], "claims"),
        (lambda b: b[:8] + b"{not json" + b[17:], "not valid JSON"),
    ],
)
def test_a_damaged_weights_file_is_found_from_its_header(adapters, tmp_path, damage, fragment):
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(damage((adapters["a"] / WEIGHTS_FILE).read_bytes()))
    with pytest.raises(ValueError, match=fragment):
        local_safetensors_header(path)


def test_non_finite_weights_are_refused(adapters, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapters["a"] / WEIGHTS_FILE))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))
    (problem,) = weights_problems(tmp_path / WEIGHTS_FILE)
    assert "NaN or infinite values in 1 weights" in problem
    assert name.removeprefix("base_model.model.") in problem
    assert torch.isfinite(load_file(str(adapters["a"] / WEIGHTS_FILE))[name]).all()


def test_the_registry_reports_every_misfit_with_its_name(layout, adapters, other_model_adapter, tmp_path):
    truncated = shutil.copytree(adapters["a"], tmp_path / "truncated")
    (truncated / WEIGHTS_FILE).write_bytes((adapters["a"] / WEIGHTS_FILE).read_bytes()[:-10])
    sources = {"good": str(adapters["a"]), "other": str(other_model_adapter), "cut": str(truncated)}
    registry = AdapterRegistry(sources, cache_dir=tmp_path / "cache")
    registry.inspect()  # the files alone are complete LoRA adapters
    with pytest.raises(ConfigError) as info:
        registry.inspect(layout, max_rank=64)
    message = str(info.value)
    assert message.startswith("2 adapter problems")
    assert "adapters.other: has weights that do not fit" in message
    assert f"adapters.cut: {WEIGHTS_FILE}: its header describes" in message
    assert "adapters.good" not in message


def test_a_replica_reads_the_weights_too(layout, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(adapters["a"], tmp_path / "nan")
    tensors = load_file(str(copy / WEIGHTS_FILE))
    tensors[sorted(tensors)[0]].fill_(float("inf"))
    save_file(tensors, str(copy / WEIGHTS_FILE))
    assert check_local_adapter(copy, layout, 64) == ([], json.loads((copy / CONFIG_FILE).read_text()))
    problems, _ = check_local_adapter(copy, layout, 64, read_weights=True)
    assert "NaN or infinite" in problems[0]


def test_build_app_refuses_an_adapter_for_another_model_before_any_replica_starts(
    tiny_model_dir, other_model_adapter
):
    from serve.app import build_app

    args = {"model": {"name_or_path": str(tiny_model_dir)}, "adapters": {"mixup": str(other_model_adapter)}}
    with pytest.raises(ConfigError, match="adapters.mixup: has weights that do not fit"):
        build_app(args)
