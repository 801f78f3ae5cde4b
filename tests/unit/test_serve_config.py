"""ServingConfig and Serve config files: typos and contradictions fail with the key, line and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftune.errors import ConfigError
from serve.config import (
    ServeFileConfig,
    ServingConfig,
    deployment_options,
    read_yaml_with_lines,
    validate_serve_file,
    validate_serving_args,
)

TINY = Path(__file__).resolve().parents[2] / "configs" / "serve" / "tiny.yaml"


def test_shipped_tiny_config_is_a_valid_serve_config_and_serving_config():
    from ray.serve.schema import ServeDeploySchema

    data, lines = read_yaml_with_lines(TINY)
    ServeDeploySchema.model_validate(data)  # what `serve run` / `serve deploy` accept
    config = validate_serve_file(data, source=str(TINY), lines=lines)
    app = config.applications[0]
    assert app.import_path == "serve.app:build_app"
    assert app.args.resources.num_cpus <= 0.5
    assert config.http_options.host == "127.0.0.1"


def edited_file_error(tmp_path, old: str, new: str) -> tuple[str, str]:
    """Validate the shipped tiny Serve file with ``old`` replaced by ``new``: ("file:line" of ``new``, message)."""
    text = TINY.read_text().replace(old, new)
    path = tmp_path / "edited.yaml"
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if new in row)
    data, lines = read_yaml_with_lines(path)
    with pytest.raises(ConfigError) as info:
        validate_serve_file(data, source=str(path), lines=lines)
    return f"{path}:{line}", str(info.value)


def test_typo_in_args_names_file_line_and_suggestion(tmp_path):
    where, message = edited_file_error(tmp_path, "max_batch_size: 8", "max_batch_sise: 8")
    assert where in message
    assert "did you mean 'applications.0.args.batching.max_batch_size'" in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        validate_serving_args(
            {
                "adapters": {"base": "/x", "bad name!": "/y", "__base__": "/z"},
                "limits": {"max_tokens": 8, "default_max_tokens": 16, "max_ongoing_requests": 2},
                "autoscaling": {"min_replicas": 3, "max_replicas": 2},
            }
        )
    message = str(info.value)
    assert message.startswith("6 problems")
    for fragment in (
        "adapters.base: clashes with base_model_id",
        "adapters.bad name!: adapter names are OpenAI model ids",
        "adapters.__base__: adapter names",
        "limits.default_max_tokens: 16 is above limits.max_tokens (8)",
        "limits.max_ongoing_requests: 2 cannot fill a batch",
        "autoscaling.min_replicas: 3 is above autoscaling.max_replicas (2)",
    ):
        assert fragment in message


def test_wrong_type_and_overrides_are_named():
    with pytest.raises(ConfigError) as info:
        validate_serving_args({"limits": {"max_tokens": "lots"}}, overrides=["batching.max_batch_size=0"])
    message = str(info.value)
    assert "limits.max_tokens: 'lots' is invalid" in message
    assert "override 'batching.max_batch_size=0'" in message


def test_deployments_section_is_rejected_with_the_fix():
    data = yaml.safe_load(TINY.read_text())
    data["applications"][0]["deployments"] = [{"name": "LoraServer", "num_replicas": 3}]
    with pytest.raises(ConfigError, match="under args"):
        validate_serve_file(data, source="x.yaml")


def test_other_import_paths_are_rejected():
    data = yaml.safe_load(TINY.read_text())
    data["applications"][0]["import_path"] = "my.module:app"
    with pytest.raises(ConfigError, match="import_path"):
        validate_serve_file(data, source="x.yaml")


def test_deployment_options_are_accepted_by_serve():
    from ray.serve.config import AutoscalingConfig

    config = ServingConfig(
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 1,
        },
        limits={"max_queued_requests": 5, "max_ongoing_requests": 8},
    )
    options = deployment_options(config)
    scaling = AutoscalingConfig(**options["autoscaling_config"])  # unknown keys would raise here
    assert (scaling.min_replicas, scaling.max_replicas, scaling.upscale_delay_s) == (1, 3, 1.0)
    assert scaling.target_ongoing_requests == 2
    assert options["ray_actor_options"]["num_cpus"] == 0.5


def test_a_queue_limit_is_kept_by_the_replica_and_serve_hands_it_the_excess():
    from serve.config import SPARE_REQUESTS, admitted_requests

    config = ServingConfig(limits={"max_queued_requests": 5, "max_ongoing_requests": 8})
    assert admitted_requests(config.limits) == 13
    options = deployment_options(config)
    # Serve gives the replica more than it admits, so the replica answers the excess itself (an OpenAI
    # 503); Serve's own queue (a plain-text 503) is only the backstop.
    assert options["max_ongoing_requests"] == 13 + SPARE_REQUESTS
    assert options["max_queued_requests"] == 13
    unbounded = ServingConfig(limits={"max_queued_requests": -1, "max_ongoing_requests": 8})
    assert admitted_requests(unbounded.limits) is None
    options = deployment_options(unbounded)
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (8, -1)


def test_build_app_fails_on_a_typo_before_any_replica_starts():
    from serve.app import build_app

    with pytest.raises(ConfigError, match="did you mean 'max_adapters_per_replica'"):
        build_app({"max_adapters_per_replicas": 2})


def test_serve_file_config_loads_through_load_config():
    from ftune.yaml_config import load_config

    config = load_config(ServeFileConfig, TINY, [])
    assert config.application()[1].args.base_model_id == "base"


def test_only_loopback_hosts_serve_without_a_key():
    from serve.config import exposure_problem, is_loopback

    assert [is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "localhost", "LOCALHOST")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "my-host", "")] == [False] * 5
    open_config = ServingConfig()
    assert exposure_problem("127.0.0.1", open_config) is None
    assert "allow_unauthenticated: true" in exposure_problem("0.0.0.0", open_config)
    assert exposure_problem("0.0.0.0", ServingConfig(api_key_env="KEY")) is None
    assert exposure_problem("0.0.0.0", ServingConfig(allow_unauthenticated=True)) is None


def test_a_public_serve_file_without_a_key_names_the_host_line(tmp_path):
    where, message = edited_file_error(tmp_path, "host: 127.0.0.1", "host: 0.0.0.0")
    assert where in message and "api_key_env" in message
