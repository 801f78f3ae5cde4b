"""cluster/aws-spot.yaml passes Ray's own cluster-config validation (no AWS calls) and keeps our invariants."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from cluster import spot_watcher

REPO = Path(__file__).resolve().parents[2]
CONFIG_PATH = REPO / "cluster" / "aws-spot.yaml"
GPUS = {"m6i.2xlarge": 0, "g5.xlarge": 1, "g5.2xlarge": 1, "g6.xlarge": 1, "g5.12xlarge": 4, "p5.48xlarge": 8}
"""GPUs per instance type (AWS docs), for the types this config may use."""


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text())


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def test_raw_file_matches_rays_schema(config):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_ray_up_validation_passes_without_aws(config):
    # What `ray up` does before it touches AWS: merge aws/defaults.yaml, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["available_node_types"][config["head_node_type"]]["max_workers"] == 0


def test_head_is_on_demand_without_gpus(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"
    assert GPUS[head["node_config"]["InstanceType"]] == 0
    assert head["resources"]["head"] == 1 and head["resources"]["GPU"] == 0
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in start and "--num-gpus=0" in start


def test_gpu_workers_are_spot_interchangeable_types(config):
    workers = worker_types(config)
    one_gpu = {n for n, t in workers.items() if GPUS[t["node_config"]["InstanceType"]] == 1}
    four_gpu = {n for n, t in workers.items() if GPUS[t["node_config"]["InstanceType"]] == 4}
    assert len(one_gpu) >= 3 and len(four_gpu) >= 1
    for name, node_type in workers.items():
        assert GPUS[node_type["node_config"]["InstanceType"]] > 0, name
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        gpus = GPUS[node_type["node_config"]["InstanceType"]]
        assert node_type["resources"]["spot"] == gpus, f"{name}: one unit of spot per GPU"
        assert node_type["resources"]["worker"] == 1, name
        assert 0 == node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
    assert len({workers[n]["priority"] for n in one_gpu}) == len(one_gpu), "a clear order of preference"


def test_every_node_can_reach_s3(config):
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert "s3://" in CONFIG_PATH.read_text()


def test_repo_and_auth_token_are_mounted_and_installed(config):
    assert config["file_mounts"]["~/ftune"] == "."
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("cd ~/ftune && bash install.sh" in c for c in config["setup_commands"])
    assert (REPO / "install.sh").is_file()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("export RAY_AUTH_MODE=token" in c for c in starts), key
    assert not any("RAY_AUTH_MODE=disabled" in c for c in CONFIG_PATH.read_text().splitlines())


def test_spot_watcher_starts_after_ray_on_every_worker(config):
    commands = config["worker_start_ray_commands"]
    ray_start = next(i for i, c in enumerate(commands) if "ray start --address" in c)
    watcher = next(i for i, c in enumerate(commands) if "python -m cluster.spot_watcher" in c)
    assert watcher > ray_start
    command = commands[watcher]
    assert "nohup python -m cluster.spot_watcher" in command and "& echo $!" in command, (
        "runs in the background"
    )
    # The flags it is started with are ones the watcher accepts.
    words = shlex.split(command.split("python -m cluster.spot_watcher", 1)[1].split(">", 1)[0])
    args = spot_watcher._parser().parse_args(words)
    assert args.sigterm_deadline_s < 120, "drain deadline within the 2-minute spot warning"
