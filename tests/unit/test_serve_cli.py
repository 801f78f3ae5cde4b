"""`ftune serve` argument handling (no Ray): config file, --adapter, --sweep, overrides, errors, and the
refusal to serve beyond loopback without an API key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftune.errors import ConfigError, UserError
from serve.cli import plan_from_args

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "serve" / "tiny.yaml")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    return write_random_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"), {"a": 1, "b": 2})


def test_config_file_plus_adapter_and_overrides(adapters):
    plan = plan_from_args(
        ["--config", TINY, "--adapter", f"mine={adapters['a']}", "--port", "8123", "limits.max_tokens=128"]
    )
    assert plan.config.adapters == {"mine": str(adapters["a"])}
    assert plan.config.limits.max_tokens == 128
    assert (plan.host, plan.port, plan.app_name, plan.route_prefix) == ("127.0.0.1", 8123, "ftune", "/")
    assert plan.config.model.name_or_path == "builtin:tiny-llama"


def test_adapters_alone_take_the_base_model_from_their_config(adapters, tiny_model_dir):
    plan = plan_from_args(["--adapter", f"a={adapters['a']}", "--adapter", f"b={adapters['b']}"])
    assert plan.config.model.name_or_path == str(tiny_model_dir)
    assert plan.config.model_ids == ["base", "a", "b"]


def test_sweep_top_k(adapters, tmp_path):
    rows = [
        {"trial": "x1", "eval_loss": 0.2, "status": "TERMINATED", "adapter_path": str(adapters["b"])},
        {"trial": "x2", "eval_loss": 0.3, "status": "TERMINATED", "adapter_path": str(adapters["a"])},
    ]
    (tmp_path / "leaderboard.json").write_text(json.dumps(rows))
    plan = plan_from_args(["--sweep", str(tmp_path), "--top-k", "2", "--api-key-env", "PATH"])
    assert list(plan.config.adapters) == ["trial-x1", "trial-x2"]
    assert plan.config.api_key_env == "PATH"


@pytest.mark.parametrize(
    "argv, error, fragment",
    [
        ([], UserError, "nothing to serve"),
        (["--adapter", "noequals"], UserError, "expected NAME=DIR"),
        (["--adapter", "a=/x", "--adapter", "a=/y"], UserError, "given twice"),
        (["--adapter", "a=/does/not/exist"], ConfigError, "adapters.a: /does/not/exist is not a directory"),
        (["--config", TINY, "--top-k", "2"], UserError, "--top-k only applies with --sweep"),
        (
            ["--config", TINY, "limits.max_tokenz=3"],
            ConfigError,
            "did you mean 'applications.0.args.limits.max_tokens'",
        ),
        (["--config", TINY, "--app", "other"], UserError, "no application named 'other'"),
        (["--config", "missing.yaml"], ConfigError, "config file not found"),
    ],
)
def test_mistakes_are_user_errors(argv, error, fragment):
    with pytest.raises(error) as info:
        plan_from_args(argv)
    assert fragment in str(info.value)


def test_api_key_variable_must_be_set(adapters, monkeypatch):
    monkeypatch.delenv("FTUNE_TEST_UNSET_KEY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match="FTUNE_TEST_UNSET_KEY"):
        plan_from_args(["--config", TINY, "--api-key-env", "FTUNE_TEST_UNSET_KEY"])


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "serve.example.com"])
def test_a_bind_beyond_loopback_without_a_key_is_refused_with_the_fix(adapters, host, monkeypatch):
    with pytest.raises(UserError) as info:
        plan_from_args(["--adapter", f"a={adapters['a']}", "--host", host])
    message = str(info.value)
    assert f"host {host} serves beyond this machine" in message
    assert "--api-key-env" in message and "--allow-unauthenticated" in message and "127.0.0.1" in message
    monkeypatch.setenv("FTUNE_TEST_SERVE_KEY", "k")
    argv = ["--adapter", f"a={adapters['a']}", "--host", host]
    assert plan_from_args([*argv, "--api-key-env", "FTUNE_TEST_SERVE_KEY"]).host == host
    on_purpose = plan_from_args([*argv, "--allow-unauthenticated"])
    assert on_purpose.config.allow_unauthenticated and on_purpose.config.api_key_env is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_key(adapters, host):
    assert plan_from_args(["--adapter", f"a={adapters['a']}", "--host", host]).host == host


def test_a_config_file_bind_is_checked_with_the_host_that_will_be_used(tmp_path):
    public = tmp_path / "public.yaml"
    public.write_text(Path(TINY).read_text().replace("host: 127.0.0.1", "host: 0.0.0.0"))
    with pytest.raises(ConfigError) as info:
        plan_from_args(["--config", str(public)])
    assert f"{public}:" in str(info.value) and "http_options.host" in str(info.value)
    assert plan_from_args(["--config", str(public), "--host", "127.0.0.1"]).host == "127.0.0.1"
    with pytest.raises(ConfigError, match="override '--host 0.0.0.0'"):
        plan_from_args(["--config", TINY, "--host", "0.0.0.0"])


def test_deploy_refuses_a_public_bind_without_a_key_before_starting_anything():
    import ray

    from serve.config import ServingConfig
    from serve.deploy import deploy

    with pytest.raises(UserError, match="serves beyond this machine"):
        deploy(ServingConfig(), host="0.0.0.0")
    assert not ray.is_initialized()
