"""A real local multi-node cluster: 3 nodes with the right resources, a killed worker is reported dead, down stops everything."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster.local import LocalCluster
from cluster.processes import MARKER_ENV

pytestmark = pytest.mark.integration


def marked_processes(cluster_id: str) -> list[int]:
    """pids of live, non-zombie processes started for this cluster (found by their env marker)."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER_ENV, "").startswith(cluster_id + "/") and proc.status() != "zombie":
                pids.append(proc.pid)
        except psutil.Error:
            pass
    return pids


def test_up_kill_down(tmp_path, monkeypatch):
    import ray

    state_path = tmp_path / "local.json"
    cluster = LocalCluster(state_path=state_path, dashboard=False)
    try:
        started = time.monotonic()
        cluster.up(workers=2)
        print(f"\nhead + 2 workers up in {time.monotonic() - started:.1f} s")
        assert state_path.exists()
        if ray.is_initialized():
            ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address=cluster.address, log_to_driver=False)

        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 3
        spot = sorted(n["NodeID"] for n in alive if n["Resources"].get("spot") == 1)
        assert spot == sorted(r.node_id for r in cluster.nodes if r.index is not None)
        (head,) = [n for n in alive if "head" in n["Resources"]]
        assert "GPU" not in head["Resources"] and "spot" not in head["Resources"]

        @ray.remote(num_cpus=1, resources={"spot": 1})
        def where() -> tuple[str, str]:
            return ray.get_runtime_context().get_node_id(), os.environ.get("FTUNE_MODEL_CACHE", "")

        node_id, cache = ray.get(where.remote(), timeout=60)
        assert node_id in spot, "spot work runs on a worker, never the head"
        (record,) = [r for r in cluster.nodes if r.node_id == node_id]
        assert cache == os.path.join(record.temp_dir, "model_cache"), "each node has its own model cache"

        victim = cluster.nodes[1]
        victim_pids = cluster.pids(0)
        assert victim_pids[0] == victim.pid and len(victim_pids) >= 3  # ray start, raylet, agents ...
        killed_at = time.monotonic()
        assert cluster.kill_worker(0) == victim.node_id
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in victim_pids)
        dead = cluster.wait_for_state(0, "DEAD", timeout_s=30)
        print(f"killed worker reported dead after {time.monotonic() - killed_at:.1f} s")
        assert dead.death_reason == "UNEXPECTED_TERMINATION"
        assert cluster.node(1).state == "ALIVE"
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2

        # A spot notice, then the cloud reclaims the node at the deadline. Work on the node keeps it
        # from exiting on its own once drained, so only the deadline kill can take it down.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0)
        class Busy:
            def ping(self) -> int:
                return 1

        pinned = NodeAffinitySchedulingStrategy(cluster.nodes[2].node_id, soft=False)
        busy = Busy.options(scheduling_strategy=pinned).remote()
        ray.get(busy.ping.remote(), timeout=60)
        cluster.drain_worker(1, deadline_s=3, kill_at_deadline=True)
        assert cluster.node(1).state == "DRAINING"
        reclaimed = cluster.wait_for_state(1, "DEAD", timeout_s=30)
        assert reclaimed.death_reason == "AUTOSCALER_DRAIN_PREEMPTED", "the GCS remembers why it went"
        assert cluster.pids(1) == []

        # A replacement whose raylet misses Ray's 30 s registration window (a busy machine) is relaunched.
        import cluster.local as local_module

        real_command, calls = local_module.worker_command, []

        def missed_window_once(*args, **kwargs):
            calls.append(args)
            if len(calls) > 1:
                return real_command(*args, **kwargs)
            message = f"Exception: {local_module.RAYLET_REGISTRATION_TIMEOUT}. This could happen because ..."
            return [sys.executable, "-c", f"import sys; print({message!r}); sys.exit(1)", "--resources", "{}"]

        monkeypatch.setattr(local_module, "worker_command", missed_window_once)
        replacement = cluster.add_worker()
        assert len(calls) == 2 and cluster.node(replacement.name).state == "ALIVE"
        assert replacement.name not in [r.name for r in cluster.nodes if r.removed]
        assert [r.name for r in cluster.nodes].count(replacement.name) == 1
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # What `ftune cluster local down` does: a fresh object from the state file.
        stopping = time.monotonic()
        if state_path.exists():
            LocalCluster.load(state_path).down()
        cluster.down()
        print(f"down in {time.monotonic() - stopping:.1f} s")
    assert marked_processes(cluster.cluster_id) == []
    assert not Path(cluster.base_dir).exists()
    assert not state_path.exists()
