"""Exact resume after the driver restarts; a damaged latest checkpoint is skipped for the newest one that
verifies; a changed config is refused in the driver; corrupt checkpoints are rejected.

A worker killed mid-run is test_chaos_random's (at a random step, and with the newest checkpoint half
written) and a node killed mid-run test_chaos's; both compare with this module's uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import (
    curve,
    has_registered_checkpoint,
    train_worker_pids,
    uninterrupted_run,
    worker_output,
)
from safetensors.torch import load_file

from ftune.config import TrainJobConfig
from ftune.yaml_config import load_config
from tests.waiting import wait_for
from train.job import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny.yaml"
# Dropout on, so equality after a restart also proves the RNG state was restored.
EXACT = ["lora.dropout=0.1", "train.max_steps=60", "train.checkpoint_every=20", "train.eval_every=1000",
         "train.exact_match_examples=0", "data.max_validation_rows=32", "tracking.wandb=disabled"]


def job(storage: Path | str, *overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, TINY, [f"storage.path={storage}", *EXACT, *overrides])


def assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory):
    return uninterrupted_run(tmp_path_factory, TINY, EXACT)


def test_driver_restart_resumes_same_name(ray_local, baseline, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "train", "--config", str(TINY), "--name", "driver", f"storage.path={tmp_path}", *EXACT]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "driver"
    try:
        # A new driver restores what the run snapshot registers (a directory alone is not a committed checkpoint).
        wait_for(lambda: has_registered_checkpoint(run_dir), "a registered checkpoint", 240)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    wait_for(lambda: not train_worker_pids(), "the killed driver's workers to exit", 60)
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] >= 1, "the second driver started from scratch instead of resuming"
    assert_same_adapter(run_dir / "adapter", baseline / "adapter")


def test_damaged_latest_checkpoint_resumes_from_the_newest_that_verifies(ray_local, tmp_path):
    # Two workers, checkpoints at steps 2 and 4. The finished run's latest checkpoint (4) is damaged; a re-run
    # under the name (Ray restores its latest) continues from 2 and trains 3 and 4 again, exactly as before.
    short = ("train.max_steps=4", "train.checkpoint_every=2", "failure.max_failures=0")
    run_dir = tmp_path / "damaged"
    first = run_training(job(tmp_path, *short), name="damaged")
    assert (first["steps"], first["restarts"]) == (4, 0)
    shutil.copytree(run_dir / "adapter", tmp_path / "first-adapter")
    first_curve = curve(run_dir)
    state = run_dir / "checkpoint_step0000004" / "train_state.json"
    state.write_bytes(state.read_bytes()[:100])  # a truncated write
    again = run_training(job(tmp_path, *short), name="damaged")
    assert (again["steps"], again["restarts"]) == (4, 1), again
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 3, 4]
    for row in rows[-2:]:
        assert row["loss"] == pytest.approx(first_curve[row["step"]], abs=1e-6), row["step"]
    assert_same_adapter(run_dir / "adapter", tmp_path / "first-adapter")
    # The damaged directory Ray still tracks is not written over: the new checkpoint has a name of its own.
    assert (run_dir / "checkpoint_step0000004_r1" / "manifest_rank1.json").is_file()
    logs = worker_output()
    assert (f"checkpoint unusable, skipped: {run_dir}/checkpoint_step0000004: train_state.json is unreadable "
            "(JSONDecodeError") in logs
    assert f"resumed at step 2/4 from {run_dir}/checkpoint_step0000002 (the newest checkpoint that loads" in logs


def test_corrupt_latest_checkpoint_is_rejected(tmp_path):
    from train.checkpoint import CorruptCheckpoint, verify_checkpoint

    good = tmp_path / "ckpt"
    good.mkdir()
    counts = {"step": 0, "epoch": 0, "tokens_seen": 0, "world_size": 2, "gradient_accumulation_steps": 1, "total_steps": 0}
    (good / "train_state.json").write_text(json.dumps(
        {"train_state": counts, "optimizer_step": 0, "scheduler": {}, "global_steps": 0, "global_samples": 0}))
    (good / "manifest_rank0.json").write_text("{}")
    with pytest.raises(CorruptCheckpoint, match="rank 1 never finished"):
        verify_checkpoint(good)
    (good / "manifest_rank1.json").write_text('{"rng_rank1.json": "00"}')
    with pytest.raises(CorruptCheckpoint, match="rng_rank1.json is missing or does not match"):
        verify_checkpoint(good)
