"""Every YAML under configs/ loads through its typed config (GPU examples included)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftune.config import TrainJobConfig
from ftune.yaml_config import load_config
from train.deepspeed_config import build_deepspeed_config, load_user_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def job_class(path: Path):
    """The typed config a configs/<job>/ file is read with."""
    kind = path.relative_to(CONFIGS).parts[0]
    if kind == "train":
        return TrainJobConfig
    if kind == "sweep":
        from tune.config import SweepConfig

        return SweepConfig
    if kind == "serve":
        from serve.config import ServeFileConfig

        return ServeFileConfig
    if kind == "pricing":
        from tune.pricing import PricingTable

        return PricingTable
    raise AssertionError(f"no typed config for {path}")


ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def test_configs_exist():
    names = {p.relative_to(CONFIGS).as_posix() for p in ALL_YAML}
    assert "train/tiny.yaml" in names
    assert {"train/llama3-8b-qlora.yaml", "train/llama3-8b-lora-zero2-multinode.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_shipped_yaml_validates(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    cfg = load_config(job_class(path), path, [])
    if isinstance(cfg, TrainJobConfig):
        user = load_user_config(cfg.deepspeed.config_file)
        import torch

        for world in {cfg.scaling.min_workers, cfg.scaling.max_workers}:
            ds = build_deepspeed_config(cfg, world, torch.bfloat16, user=user)
            assert ds["train_batch_size"] == cfg.train.global_batch_size


def test_launch_command_in_header():
    for path in ALL_YAML:
        head = path.read_text().splitlines()[:6]
        assert any(line.startswith("#") and ("python -m" in line or "serve run" in line or "ftune" in line) for line in head) or (
            path.parent.name == "pricing"
        ), f"{path} has no launch command in its header comment"
