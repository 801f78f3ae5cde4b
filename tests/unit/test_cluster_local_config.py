"""The local cluster's node commands, config checks, node lookup, state file and CLI errors (no Ray started)."""

from __future__ import annotations

import json

import pydantic
import pytest

from cluster import cli
from cluster.local import ClusterError, LocalCluster, NodeRecord
from cluster.local_config import LocalClusterConfig, head_command, worker_command


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_head_gets_no_gpus_a_head_resource_and_fast_failure_detection():
    config = LocalClusterConfig(head_cpus=2, health_check_period_ms=500, health_check_failure_threshold=4)
    ports = {"gcs": 6380, "dashboard": 8266, "client": 10002, "agent": 52366}
    command = head_command(config, ports, "/tmp/ftr-x/head")
    assert "--head" in command and "--block" in command
    assert flag(command, "--num-gpus") == "0"
    assert flag(command, "--num-cpus") == "2"
    assert json.loads(flag(command, "--resources")) == {"head": 1}
    assert flag(command, "--port") == "6380"
    assert flag(command, "--dashboard-host") == "127.0.0.1"
    assert flag(command, "--temp-dir") == "/tmp/ftr-x/head"
    assert json.loads(flag(command, "--system-config")) == {
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 4,
    }


def test_workers_are_spot_by_default_and_on_demand_with_zero():
    command = worker_command(
        LocalClusterConfig(cpus_per_worker=3), "127.0.0.1:6380", "worker-2", 1234, "/t/w2"
    )
    assert json.loads(flag(command, "--resources")) == {"worker": 1, "spot": 1.0}
    assert flag(command, "--address") == "127.0.0.1:6380"
    assert flag(command, "--node-name") == "worker-2"
    assert flag(command, "--num-cpus") == "3"
    assert flag(command, "--num-gpus") == "0"
    assert "--head" not in command and "--system-config" not in command
    on_demand = worker_command(LocalClusterConfig(spot_resource=0), "a:1", "worker-0", 1, "/t/w0")
    assert json.loads(flag(on_demand, "--resources")) == {"worker": 1}


def test_dashboard_can_be_left_out():
    ports = {"gcs": 1, "dashboard": 2, "client": 3, "agent": 4}
    assert (
        flag(head_command(LocalClusterConfig(dashboard=False), ports, "/t"), "--include-dashboard") == "false"
    )


@pytest.mark.parametrize("bad", [{"cpus_per_worker": 0}, {"object_store_mb": 10}, {"spot": 1}])
def test_config_rejects_bad_values_and_unknown_keys(bad):
    with pytest.raises(pydantic.ValidationError):
        LocalClusterConfig(**bad)


def fake_cluster(tmp_path) -> LocalCluster:
    cluster = LocalCluster(state_path=tmp_path / "local.json", cpus_per_worker=2)
    cluster.cluster_id, cluster.base_dir, cluster.port, cluster.dashboard_port = (
        "ftr-abc",
        "/tmp/ftr-abc",
        1,
        2,
    )
    cluster.nodes = [
        NodeRecord("head", None, 101, "/tmp/ftr-abc/head", "/tmp/ftr-abc/head.log", "aa" * 28),
        NodeRecord("worker-0", 0, 102, "/tmp/ftr-abc/worker-0", "/tmp/ftr-abc/worker-0.log", "bb" * 28),
        NodeRecord("worker-1", 1, 103, "/tmp/ftr-abc/worker-1", "/tmp/ftr-abc/worker-1.log", "cc" * 28),
    ]
    cluster._next_index = 2
    return cluster


def test_nodes_are_found_by_index_name_or_id_and_the_head_is_not_a_worker(tmp_path):
    cluster = fake_cluster(tmp_path)
    assert cluster._worker(1).name == "worker-1"
    assert cluster._worker("worker-0").index == 0
    assert cluster._worker("cc" * 28).name == "worker-1"
    with pytest.raises(ClusterError, match="head node"):
        cluster._worker("head")
    with pytest.raises(ClusterError, match="no node 7"):
        cluster._worker(7)


def test_state_file_round_trip(tmp_path):
    cluster = fake_cluster(tmp_path)
    cluster._save()
    loaded = LocalCluster.load(tmp_path / "local.json")
    assert loaded.address == "127.0.0.1:1"
    assert loaded.config.cpus_per_worker == 2
    assert [(n.name, n.pid, n.node_id) for n in loaded.nodes] == [
        (n.name, n.pid, n.node_id) for n in cluster.nodes
    ]
    assert loaded._next_index == 2


def test_no_state_file_says_how_to_start_one(tmp_path):
    with pytest.raises(ClusterError, match="ftune cluster local up"):
        LocalCluster.load(tmp_path / "missing.json")


def test_cli_status_without_a_cluster_exits_2(tmp_path, capsys):
    from ftune.entrypoint import run_job

    assert run_job(cli.main, ["local", "--state-file", str(tmp_path / "none.json"), "status"]) == 2
    assert "ftune cluster local up" in capsys.readouterr().err


def test_cli_up_requires_workers():
    with pytest.raises(SystemExit):
        cli.main(["local", "up"])
