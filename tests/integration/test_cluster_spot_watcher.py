"""The spot watcher against a fake IMDS and a real local cluster: a notice (or SIGTERM) drains its node.

Checks what Ray Train relies on: the drained node appears in the GCS's draining nodes with the
notice's deadline (what ``ray.train.get_preemption_info()`` is built from), and dies with reason
AUTOSCALER_DRAIN_PREEMPTED once idle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.fake_imds import FakeInstanceMetadata
from cluster.local import LocalCluster
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    """Head + 3 spot workers (one per test: a drained node is gone); this process is a driver of it."""
    import ray

    local = LocalCluster(dashboard=False)
    try:
        local.up(workers=3)
        if ray.is_initialized():
            ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address=local.address, log_to_driver=False)
        yield local
    finally:
        ray.shutdown()
        local.down()


def pin_busy_actor(node_id: str):
    """An actor on ``node_id``: a drained node with work on it stays DRAINING (an idle one exits at once)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class Busy:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    actor = Busy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    assert ray.get(actor.node.remote(), timeout=60) == node_id
    return actor


def start_watcher(url: str, cluster: LocalCluster, node_id: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "cluster.spot_watcher", "--url", url, "--interval", "0.2"]
    command += ["--address", cluster.address, "--node-id", node_id, *extra]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def stop(watcher: subprocess.Popen) -> str:
    if watcher.poll() is None:
        watcher.kill()
    return watcher.communicate(timeout=10)[0] or ""


def test_notice_drains_the_node_with_the_notice_deadline(cluster):
    import ray
    from ray.train.v2._internal.execution.preemption import PreemptionWatcher

    node_id, other_id = cluster.nodes[1].node_id, cluster.nodes[2].node_id
    actor = pin_busy_actor(node_id)
    with FakeInstanceMetadata(require_token=True) as imds:
        watcher = start_watcher(imds.url, cluster, node_id)
        try:
            wait_for(lambda: len(imds.notice_gets()) >= 5, "the watcher to poll", 60)
            assert all(r.status == 404 for r in imds.notice_gets()), "IMDSv2 token sent on every poll"
            assert cluster.node(node_id).state == "ALIVE"
            assert ray._private.state.state.get_draining_nodes() == {}

            when = imds.set_notice(deadline_s=90)
            view = cluster.wait_for_state(node_id, "DRAINING", timeout_s=60)
            polls = len(imds.notice_gets())  # the last one read the notice: none may follow
            assert abs(view.draining_deadline_ms / 1000 - when.timestamp()) < 2
            # Ray Train's PreemptionWatcher polls exactly this, then get_preemption_info() returns it.
            assert ray._private.state.state.get_draining_nodes() == {node_id: view.draining_deadline_ms}
            train_watcher = PreemptionWatcher({node_id: [0, 1], other_id: [2]}, poll_interval_s=0.1)
            try:
                info = wait_for(train_watcher.get_latest_preemption_info, "Ray Train to see the drain", 30)
            finally:
                train_watcher._stop_event.set()
            assert info.preempted_ranks == [0, 1] and info.deadline_ms == view.draining_deadline_ms
            assert cluster.node(other_id).state == "ALIVE", "the other spot worker is untouched"

            ray.kill(actor)
            dead = cluster.wait_for_state(node_id, "DEAD", timeout_s=30)
            assert dead.death_reason == "AUTOSCALER_DRAIN_PREEMPTED"
            assert "spot interruption notice: terminate at" in dead.death_message
            # Ray Train's poll and the node's exit took many 0.2 s intervals since the drain.
            assert len(imds.notice_gets()) == polls, "quiet after draining once"
            assert watcher.poll() is None, "keeps running after the drain (no --exit-after-drain)"

            watcher.send_signal(signal.SIGTERM)
            assert watcher.wait(timeout=30) == 0
        finally:
            output = stop(watcher)
    assert "drained node" in output, output


def test_sigterm_drains_the_node_with_the_grace_period(cluster):
    import ray

    node_id = cluster.nodes[2].node_id
    actor = pin_busy_actor(node_id)
    with FakeInstanceMetadata() as imds:
        watcher = start_watcher(imds.url, cluster, node_id, "--sigterm-deadline-s", "45")
        try:
            wait_for(lambda: len(imds.notice_gets()) >= 2, "the watcher to poll", 60)
            assert cluster.node(node_id).state == "ALIVE"
            signalled = time.time()
            watcher.send_signal(signal.SIGTERM)
            assert watcher.wait(timeout=30) == 0
            exited = time.time()
            view = cluster.wait_for_state(node_id, "DRAINING", timeout_s=30)
            # The deadline is 45 s after the watcher handled the signal, which it did between these two times
            # (however busy the machine); 1 s either side for the millisecond rounding and clock reads.
            assert signalled + 45 - 1 <= view.draining_deadline_ms / 1000 <= exited + 45 + 1
            ray.kill(actor)
            dead = cluster.wait_for_state(node_id, "DEAD", timeout_s=30)
            assert dead.death_reason == "AUTOSCALER_DRAIN_PREEMPTED"
            assert dead.death_message.startswith("SIGTERM")
        finally:
            output = stop(watcher)
    assert "drained node" in output, output


def test_prestop_drain_waits_until_the_node_is_gone(cluster, tmp_path):
    """The KubeRay preStop hook: drain now, return only once the node's work has left."""
    import ray

    node_id = cluster.nodes[3].node_id
    actor = pin_busy_actor(node_id)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(REPO)
    command = [
        sys.executable,
        "-m",
        "cluster.spot_watcher",
        "--drain-now",
        "--wait",
        "--sigterm-deadline-s",
        "60",
    ]
    command += ["--address", cluster.address, "--node-id", node_id]
    log = tmp_path / "hook.log"
    with log.open("w") as out:
        hook = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        cluster.wait_for_state(node_id, "DRAINING", timeout_s=30)
        wait_for(lambda: "is still alive; waiting" in log.read_text(), "the hook to see the node alive", 30)
        assert hook.poll() is None, "the hook holds the pod while the node still has work"
        ray.kill(actor)
        assert hook.wait(timeout=30) == 0
        assert cluster.node(node_id).state == "DEAD"
    finally:
        stop(hook)
    assert "drained node" in log.read_text(), log.read_text()
