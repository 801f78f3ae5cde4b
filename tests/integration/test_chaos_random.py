"""Chaos at random times on a local Ray (two CPU workers): a worker killed at a random step (checkpoint windows
included), and one killed while the newest checkpoint is half written. Both end with the uninterrupted run's
adapter and loss curve.

The kill step comes from a seed printed with the test (``FTUNE_CHAOS_SEED=<seed>`` repeats a run).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from faults import Background, curve, kill, last_step, train_worker_pids, uninterrupted_run, worker_output
from test_fault_tolerance import EXACT, assert_same_adapter

from ftune.config import TrainJobConfig
from ftune.yaml_config import load_config
from tests.waiting import wait_for
from train.job import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny.yaml"
# test_fault_tolerance's settings (dropout on, so equality after a restart also proves the RNG state was
# restored): its uninterrupted run, trained once per test session, is the one these runs must equal.
STEPS = 60
assert f"train.max_steps={STEPS}" in EXACT and "train.checkpoint_every=20" in EXACT
SEED = int(os.environ.get("FTUNE_CHAOS_SEED") or random.SystemRandom().randrange(2**31))


def job(storage: Path) -> TrainJobConfig:
    return load_config(TrainJobConfig, TINY, [f"storage.path={storage}", *EXACT, "failure.max_failures=3"])


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, TINY, EXACT)


def assert_same_run(run_dir: Path, baseline: Path, seed_note: str) -> None:
    resumed, expected = curve(run_dir), curve(baseline)
    assert resumed.keys() == expected.keys(), seed_note
    for step in resumed:
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), f"step {step}; {seed_note}"
    assert_same_adapter(run_dir / "adapter", baseline / "adapter")


def registered(run_dir: Path, name: str) -> bool:
    """Whether Ray's controller has registered the checkpoint directory ``name`` of the run."""
    try:
        return name in (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return False


def test_worker_killed_at_a_random_step_resumes_exactly(uninterrupted, tmp_path):
    rng = random.Random(SEED)
    kill_at = rng.randint(1, STEPS - 1)
    note = f"FTUNE_CHAOS_SEED={SEED}: a worker killed at step {kill_at}"
    print(f"[chaos] {note}", flush=True)
    run_dir = tmp_path / "random"
    run = Background(lambda: run_training(job(tmp_path), name="random"))
    wait_for(lambda: last_step(run_dir) >= kill_at or run.done(), f"step {kill_at} ({note})", 240)
    assert not run.done(), f"the run ended before the kill; {note}"
    victims = train_worker_pids()
    assert victims, f"no Ray Train worker process found; {note}"
    kill(rng.choice(victims))
    summary = run.join(300)
    assert summary["steps"] == STEPS, note
    assert_same_run(run_dir, uninterrupted, note)


def test_worker_killed_while_the_newest_checkpoint_is_half_written(uninterrupted, tmp_path):
    # Checkpoint 40 is Ray's latest; one of its files is cut short (a write the kill interrupted), then a
    # worker dies. The restarted run must skip 40, resume from 20 and still end where the uninterrupted run did.
    run_dir = tmp_path / "half"
    run = Background(lambda: run_training(job(tmp_path), name="half"))
    wait_for(lambda: registered(run_dir, "checkpoint_step0000040") or run.done(), "checkpoint 40 registered", 240)
    assert not run.done(), "the run ended before the kill"
    weights = run_dir / "checkpoint_step0000040" / "engine_state.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    victims = train_worker_pids()
    assert victims, "no Ray Train worker process found"
    kill(victims[0])
    summary = run.join(300)
    assert summary["steps"] == STEPS and summary["restarts"] >= 1, summary
    assert_same_run(run_dir, uninterrupted, "half-written checkpoint 40")
    logs = worker_output()
    assert (f"checkpoint unusable, skipped: {run_dir}/checkpoint_step0000040: engine_state.safetensors is missing "
            "or does not match its checksum") in logs
    assert f"from {run_dir}/checkpoint_step0000020 (the newest checkpoint that loads" in logs
