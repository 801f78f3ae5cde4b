"""cluster/kuberay/*.yaml: ray.io/v1 resources whose shape, spot placement, drain hook, auth, entrypoints
and referenced configs are right (read through Ray's own KubeRay autoscaler translation where it applies)."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _generate_available_node_types_from_ray_cr_spec

from cluster import spot_watcher
from ftune.yaml_config import parse_override

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
SPOT_KEYS = {"eks.amazonaws.com/capacityType", "karpenter.sh/capacity-type", "cloud.google.com/gke-spot"}


def load(name: str) -> dict:
    docs = list(yaml.safe_load_all((KUBERAY / name).read_text()))
    assert len(docs) == 1, f"{name}: one resource per file"
    return docs[0]


RAYCLUSTER = load("raycluster.yaml")
RAYSERVICE = load("rayservice.yaml")
RAYJOBS = {"rayjob-train.yaml": "train", "rayjob-sweep.yaml": "tune"}
CLUSTER_SPECS = {
    "raycluster.yaml": RAYCLUSTER["spec"],
    "rayservice.yaml": RAYSERVICE["spec"]["rayClusterConfig"],
}


@pytest.mark.parametrize(
    ("name", "kind"),
    [("raycluster.yaml", "RayCluster"), ("rayjob-train.yaml", "RayJob"), ("rayjob-sweep.yaml", "RayJob"),
     ("rayservice.yaml", "RayService")],
)  # fmt: skip
def test_api_version_kind_and_name(name, kind):
    resource = load(name)
    assert resource["apiVersion"] == "ray.io/v1"
    assert resource["kind"] == kind
    assert resource["metadata"]["name"]
    assert "disabled" not in (KUBERAY / name).read_text(), "token auth is never turned off"


@pytest.mark.parametrize("name", list(CLUSTER_SPECS))
def test_head_has_no_gpus_and_workers_are_gpu_or_spot_workers(name):
    spec = CLUSTER_SPECS[name]
    assert spec["rayVersion"].startswith("2.6")
    # What Ray's autoscaler makes of this spec (the same code runs in the KubeRay autoscaler sidecar).
    node_types = _generate_available_node_types_from_ray_cr_spec(spec)
    head = node_types.pop("headgroup")
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["head"] == 1
    assert node_types, "at least one worker group"
    for group, node_type in node_types.items():
        assert node_type["resources"]["spot"] == node_type["resources"].get("GPU", 1), group
        assert node_type["resources"]["worker"] == 1, group
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], group
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"


def node_terms(pod_spec: dict) -> list[list[dict]]:
    required = pod_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    return [term["matchExpressions"] for term in required["nodeSelectorTerms"]]


@pytest.mark.parametrize("name", list(CLUSTER_SPECS))
def test_head_on_demand_workers_on_spot(name):
    spec = CLUSTER_SPECS[name]
    (head_term,) = node_terms(spec["headGroupSpec"]["template"]["spec"])
    assert {e["key"] for e in head_term} == SPOT_KEYS
    assert all(e["operator"] in ("NotIn", "DoesNotExist") for e in head_term)
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        terms = node_terms(pod)
        assert all(len(t) == 1 and t[0]["operator"] == "In" for t in terms)
        assert {t[0]["key"] for t in terms} == SPOT_KEYS
        assert any(t["key"] == "cloud.google.com/gke-spot" for t in pod["tolerations"])


@pytest.mark.parametrize("name", list(CLUSTER_SPECS))
def test_termination_drains_with_preemption_within_the_grace_period(name):
    for group in CLUSTER_SPECS[name]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:3] == ["python", "-m", "cluster.spot_watcher"]
        args = spot_watcher._parser().parse_args(command[3:])
        assert args.drain_now and args.wait
        env = {e["name"]: e.get("value") for e in container["env"]}
        ray_sigterm_drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
        assert args.sigterm_deadline_s + ray_sigterm_drain <= pod["terminationGracePeriodSeconds"]


def all_containers(resource: dict) -> list[dict]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            found.extend(c for c in node.get("containers", []) if isinstance(c, dict))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(resource)
    return found


@pytest.mark.parametrize(
    "name", ["raycluster.yaml", "rayjob-train.yaml", "rayjob-sweep.yaml", "rayservice.yaml"]
)
def test_every_ray_container_uses_token_auth(name):
    resource = load(name)
    envs = [c["env"] for c in all_containers(resource)]
    spec = CLUSTER_SPECS.get(name)
    if spec is not None:
        envs.append(spec["autoscalerOptions"]["env"])
    assert envs
    for env in envs:
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        assert by_name["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "ftune-ray-auth",
            "key": "auth_token",
        }


@pytest.mark.parametrize(("name", "module"), list(RAYJOBS.items()))
def test_rayjob_entrypoint_runs_a_real_module_with_a_real_config(name, module):
    job = load(name)["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == RAYCLUSTER["metadata"]["name"]
    words = shlex.split(job["entrypoint"])
    assert words[:3] == ["python", "-m", module] and words[3] == "--config"
    assert (REPO / module / "__main__.py").is_file(), f"`python -m {module}` needs {module}/__main__.py"
    config = REPO / words[4]
    assert config.is_file(), f"{name} runs {words[4]}, which does not exist"
    for override in words[5:]:
        parse_override(override)
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"]


def test_train_job_overrides_are_valid_for_its_config():
    from ftune.config import TrainJobConfig
    from ftune.yaml_config import load_config

    words = shlex.split(load("rayjob-train.yaml")["spec"]["entrypoint"])
    config = load_config(TrainJobConfig, REPO / words[4], words[5:])
    assert config.storage.path.startswith("s3://"), "checkpoints must outlive spot nodes"


def test_rayservice_runs_the_serve_app_with_a_valid_serve_config():
    from serve.config import validate_serve_file

    serve_config = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
    parsed = validate_serve_file(serve_config, source="rayservice.yaml serveConfigV2")  # 0.0.0.0 needs a key
    tiny = yaml.safe_load((REPO / "configs" / "serve" / "tiny.yaml").read_text())
    assert [a["import_path"] for a in serve_config["applications"]] == [
        a["import_path"] for a in tiny["applications"]
    ]
    (app,) = parsed.applications
    module, _, attr = app.import_path.partition(":")
    source = REPO / Path(*module.split(".")).with_suffix(".py")
    functions = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert attr in functions, f"{app.import_path} does not exist"
    assert app.args.autoscaling.min_replicas >= 2, "replicas on spot: keep one while another is drained"
    assert parsed.http_options.host == "0.0.0.0"


def test_rayservice_reads_the_api_key_from_a_secret_on_every_ray_container():
    from serve.config import ServeFileConfig

    (app,) = ServeFileConfig.model_validate(yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])).applications
    assert app.args.api_key_env and not app.args.allow_unauthenticated
    assert app.args.api_key_env not in app.runtime_env.get("env_vars", {}), "a key in the file is no secret"
    containers = all_containers(RAYSERVICE)
    assert len(containers) == 2, "the head and the worker group: replicas may run on either"
    for container in containers:
        by_name = {e["name"]: e for e in container["env"]}
        key = by_name[app.args.api_key_env]
        assert "value" not in key, f"{container['name']}: the API key must come from a Secret, not the file"
        secret = key["valueFrom"]["secretKeyRef"]
        assert secret["name"] and secret["name"] != "ftune-ray-auth" and secret["key"]


def test_a_public_serve_config_without_a_key_is_refused():
    from ftune.errors import ConfigError
    from serve.config import validate_serve_file

    serve_config = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
    del serve_config["applications"][0]["args"]["api_key_env"]
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        validate_serve_file(serve_config, source="rayservice.yaml")
    serve_config["applications"][0]["args"]["allow_unauthenticated"] = True
    validate_serve_file(serve_config, source="rayservice.yaml")
