"""DeepSpeed config generation, the world-size-independent batch plan and the LR schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ftune.config import TrainJobConfig
from ftune.errors import ConfigError
from ftune.yaml_config import load_config
from train.batching import BatchPlan
from train.deepspeed_config import build_deepspeed_config, gradient_accumulation_steps, load_user_config
from train.schedule import lr_multiplier, warmup_steps


def job(*overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, list(overrides))


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_global_batch_is_kept_by_accumulation(world, accum):
    cfg = job("train.global_batch_size=16", "train.micro_batch_size=4")
    ds = build_deepspeed_config(cfg, world, torch.float32, user={})
    assert ds["gradient_accumulation_steps"] == accum == gradient_accumulation_steps(cfg.train, world)
    assert ds["train_micro_batch_size_per_gpu"] * accum * world == ds["train_batch_size"] == 16
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_bf16_and_offload_flags():
    cfg = job("deepspeed.offload_optimizer=true", "train.max_grad_norm=0.5")
    ds = build_deepspeed_config(cfg, 1, torch.bfloat16, user={})
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5


def test_user_file_merged_and_contradictions_rejected(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 2, "round_robin_gradients": True}}))
    cfg = job(f"deepspeed.config_file={good}")
    ds = build_deepspeed_config(cfg, 2, torch.float32)
    assert ds["zero_optimization"]["round_robin_gradients"] is True
    assert ds["train_batch_size"] == cfg.train.global_batch_size

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"bad.json: train_batch_size=999 contradicts"):
        build_deepspeed_config(job(f"deepspeed.config_file={bad}"), 1, torch.float32)

    with_optimizer = tmp_path / "opt.json"
    with_optimizer.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        load_user_config(str(with_optimizer))

    broken = tmp_path / "broken.json"
    broken.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ConfigError, match=r"broken.json:2: not valid JSON"):
        load_user_config(str(broken))


def test_batch_plan_same_gradient_set_for_any_world_size():
    plan = BatchPlan(num_examples=100, global_batch_size=16, micro_batch_size=4, seed=3)
    for step in (0, 5, 7):  # step 6+ is the second epoch
        one = np.concatenate(plan.micro_batches(step, 0, 1))
        two = np.concatenate([np.concatenate(plan.micro_batches(step, r, 2)) for r in range(2)])
        four = np.concatenate([np.concatenate(plan.micro_batches(step, r, 4)) for r in range(4)])
        assert one.tolist() == two.tolist() == four.tolist()
        assert len(set(one.tolist())) == 16


def test_batch_plan_epochs_are_permutations_and_seeded():
    plan = BatchPlan(num_examples=64, global_batch_size=16, micro_batch_size=8, seed=0)
    assert plan.steps_per_epoch == 4
    epoch0 = np.concatenate([plan.global_batch(s) for s in range(4)])
    epoch1 = np.concatenate([plan.global_batch(s) for s in range(4, 8)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(64))
    assert epoch0.tolist() != epoch1.tolist()
    other = BatchPlan(num_examples=64, global_batch_size=16, micro_batch_size=8, seed=1)
    assert other.global_batch(0).tolist() != plan.global_batch(0).tolist()
    assert BatchPlan(64, 16, 8, 0).global_batch(2).tolist() == plan.global_batch(2).tolist()


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    total, warm = 100, warmup_steps(100, 0.1)
    f = lr_multiplier(kind, total, warm)
    assert warm == 10
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    if kind == "constant":
        assert f(99) == 1.0
    else:
        assert f(50) < 1.0 and f(100) == pytest.approx(0.0, abs=1e-9)
        assert all(f(s) >= f(s + 1) for s in range(10, 100))
