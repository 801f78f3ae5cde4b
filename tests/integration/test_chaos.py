"""Chaos on a real multi-node Ray cluster on one machine (a head and two worker raylets).

Spot nodes are lost by SIGKILL (no notice) or drained with reason PREEMPTION and then killed at the
deadline (notice); the "autoscaler" brings a replacement node with add_worker().
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from faults import Background, curve, has_registered_checkpoint, last_step, uninterrupted_run
from test_fault_tolerance import EXACT, assert_same_adapter

from cluster.local import LocalCluster
from ftune.config import TrainJobConfig
from ftune.yaml_config import load_config
from tests.waiting import wait_for
from train.job import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny.yaml"
ON_SPOT = ["scaling.resources_per_worker={spot: 1}", "failure.max_failures=3", "failure.max_preemption_failures=3",
           "lora.dropout=0.1", "train.eval_every=1000", "train.exact_match_examples=0", "data.max_validation_rows=32",
           "tracking.wandb=disabled"]


@pytest.fixture(scope="module")
def cluster(ftune_home):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_AUTH_MODE"] = "token"
    with LocalCluster(head_cpus=1, cpus_per_worker=1).up(2) as c:
        env = {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5", "FTUNE_HOME": str(ftune_home), "WANDB_MODE": "offline"}
        ray.init(address=c.address, runtime_env={"env_vars": env}, log_to_driver=True)
        yield c
        ray.shutdown()


def job(storage: Path, *overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, TINY, [f"storage.path={storage}", *ON_SPOT, *overrides])


def alive_workers(cluster: LocalCluster) -> list[str]:
    return [n.name for n in cluster.list_nodes() if n.state != "DEAD" and n.name.startswith("worker")]


def restarts(run_dir: Path) -> list[tuple[int, int]]:
    """(last step reported before, step resumed from) for every restart in metrics.jsonl.

    A restart is where the rows' restart count changes, not where a step repeats: a just-in-time
    checkpoint of the very last step resumes with the next step and repeats none.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "restarts" in r]
    return [(rows[i - 1]["step"], rows[i]["step"] - 1) for i in range(1, len(rows))
            if rows[i]["restarts"] != rows[i - 1]["restarts"]]


def test_node_sigkill_mid_run_resumes_exactly(cluster, tmp_path, tmp_path_factory):
    # Compared with the uninterrupted run of the same settings (off spot), shared with test_fault_tolerance.
    baseline = uninterrupted_run(tmp_path_factory, TINY, EXACT)
    chaos = tmp_path / "chaos"
    background = Background(lambda: run_training(job(tmp_path, *EXACT), name="chaos"))
    wait_for(lambda: last_step(chaos) >= 25 and has_registered_checkpoint(chaos), "step 25 and a registered checkpoint", 300)
    cluster.kill_worker(alive_workers(cluster)[-1])
    cluster.add_worker()  # the spot fleet replaces the node
    summary = background.join(600)
    assert summary["restarts"] >= 1
    assert curve(chaos).keys() == curve(baseline).keys()
    assert_same_adapter(chaos / "adapter", baseline / "adapter")


def test_preemption_notice_jit_checkpoint_loses_at_most_one_step(cluster, tmp_path):
    run_dir = tmp_path / "spot"
    cfg = job(tmp_path, "train.max_steps=120", "train.checkpoint_every=1000")
    background = Background(lambda: run_training(cfg, name="spot"))
    wait_for(lambda: last_step(run_dir) >= 30, "step 30", 300)
    victim = alive_workers(cluster)[-1]
    cluster.drain_worker(victim, reason="PREEMPTION", deadline_s=8, kill_at_deadline=True)
    wait_for(lambda: any(run_dir.glob("checkpoint_*_jit")), "a just-in-time checkpoint", 60)
    cluster.wait_for_state(victim, "DEAD", timeout_s=60)
    cluster.add_worker()
    summary = background.join(600)
    assert summary["steps"] == 120 and summary["restarts"] >= 1
    gaps = restarts(run_dir)
    assert gaps, "the run never restarted"
    for before, resumed in gaps:
        assert before - resumed <= 1, f"lost {before - resumed} steps (ran to {before}, resumed from {resumed})"


def world_sizes(run_dir: Path) -> list[int]:
    """The worker counts the run has trained with, in order, repeats collapsed."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    sizes = [r["world_size"] for r in rows if "world_size" in r]
    return [size for i, size in enumerate(sizes) if i == 0 or size != sizes[i - 1]]


def worker_logs(cluster: LocalCluster) -> str:
    """What the cluster's Ray workers printed, from their log files on every node (streaming to the driver is lossy)."""
    return "".join(path.read_text(errors="replace") for path in Path(cluster.base_dir).rglob("worker-*.out"))


def test_elastic_job_shrinks_to_one_worker_and_grows_back_with_same_global_batch(cluster, tmp_path):
    from train.stop import create_stop_signal

    run_dir = tmp_path / "elastic"
    # max_steps is out of reach: once the job has grown back, the stop signal ends it (checkpoint + summary) there.
    # After the kill Ray first retries at two workers; it waits failure.worker_start_timeout_s for the lost node.
    cfg = job(tmp_path, "scaling.num_workers=[1, 2]", "scaling.elastic_resize_interval_s=2", "train.max_steps=5000",
              "train.checkpoint_every=25", "failure.worker_start_timeout_s=15")
    stop = create_stop_signal()
    background = Background(lambda: run_training(cfg, name="elastic", stop_signal=stop))
    # Kill only once a checkpoint is registered, or a fast run restarts from scratch.
    wait_for(lambda: has_registered_checkpoint(run_dir) and last_step(run_dir) >= 40, "step 40 and a registered checkpoint", 300)
    cluster.kill_worker(alive_workers(cluster)[-1])
    wait_for(lambda: world_sizes(run_dir) == [2, 1], "the job to continue on one worker", 300)
    cluster.add_worker()  # the spot fleet brings a node back; Ray sees it within its 20 s resource poll
    wait_for(lambda: world_sizes(run_dir) == [2, 1, 2] or background.done(), "the job to grow back", 300)
    grown_at = last_step(run_dir)
    wait_for(lambda: last_step(run_dir) >= grown_at + 5, "steps on two workers again", 120)
    stop.request.remote("grown back")
    summary = background.join(600)
    assert world_sizes(run_dir) == [2, 1, 2], "the job finished before it grew back to two workers"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in (r for r in rows if "world_size" in r):
        per_step = cfg.train.micro_batch_size * row["gradient_accumulation_steps"] * row["world_size"]
        assert per_step == cfg.train.global_batch_size, row
    assert summary["global_batch_size"] == cfg.train.global_batch_size and summary["world_size"] == 2
    assert summary["stop_reason"] == "grown back" and summary["steps"] == last_step(run_dir) < 5000
    logs = worker_logs(cluster)
    assert "workers 2 -> 1, gradient accumulation 1 -> 2, global batch 16 kept" in logs
    assert "workers 1 -> 2, gradient accumulation 2 -> 1, global batch 16 kept" in logs
