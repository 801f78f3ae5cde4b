"""Adapter registry (local and s3:// against a local moto server) and the sweep hand-off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ftune.errors import ConfigError, UserError
from serve.leaderboard_source import adapter_name, adapters_from_sweep
from serve.registry import AdapterRegistry, common_base_model


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    out = tmp_path_factory.mktemp("adapters")
    made = write_random_adapters(tiny_model_dir, out, {"a": 1, "b": 2})
    made.update(write_random_adapters(tiny_model_dir, out, {"dora": 3}, use_dora=True))
    return made


def registry(sources, tmp_path, endpoint=None):
    return AdapterRegistry(sources, cache_dir=tmp_path / "cache", endpoint_url=endpoint)


def test_local_adapters_are_checked_and_resolved(adapters, tmp_path, tiny_model_dir):
    reg = registry({"a": str(adapters["a"]), "b": str(adapters["b"])}, tmp_path)
    configs = reg.inspect()
    assert set(configs) == {"a", "b"}
    assert common_base_model(configs) == str(tiny_model_dir)
    assert reg.local_dir("a") == adapters["a"].resolve()
    assert "../etc" not in reg and "a" in reg
    with pytest.raises(KeyError):
        reg.local_dir("/etc/passwd")  # names are registry keys, never paths


def test_every_bad_adapter_is_reported_with_its_name(adapters, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["a"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    reg = registry(
        {"missing": str(tmp_path / "nope"), "pickled": str(pickled), "dora": str(adapters["dora"])}, tmp_path
    )
    with pytest.raises(ConfigError) as info:
        reg.inspect()
    message = str(info.value)
    assert message.startswith("3 adapter problems")
    assert "adapters.missing:" in message and "is not a directory" in message
    assert "adapters.pickled:" in message and "pickled weights are not loaded" in message
    assert "adapters.dora:" in message and "DoRA" in message


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch_module.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def upload(endpoint, directory: Path, bucket: str, prefix: str):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for path in directory.iterdir():
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_s3_adapter_is_downloaded_once_and_refetched_when_changed(adapters, tmp_path, s3):
    upload(s3, adapters["a"], "models", "adapters/a")
    reg = registry({"remote": "s3://models/adapters/a"}, tmp_path, endpoint=s3)
    assert reg.inspect()["remote"]["peft_type"] == "LORA"
    first = reg.local_dir("remote")
    assert (first / "adapter_model.safetensors").read_bytes() == (
        adapters["a"] / "adapter_model.safetensors"
    ).read_bytes()
    assert reg.local_dir("remote") == first  # cached
    upload(s3, adapters["b"], "models", "adapters/a")  # a new adapter under the same prefix
    second = reg.local_dir("remote")
    assert second != first
    assert (second / "adapter_model.safetensors").read_bytes() == (
        adapters["b"] / "adapter_model.safetensors"
    ).read_bytes()


def test_s3_endpoint_from_aws_endpoint_url(adapters, tmp_path, s3, monkeypatch):
    upload(s3, adapters["b"], "models", "adapters/b")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    assert registry({"b": "s3://models/adapters/b"}, tmp_path).local_dir("b").is_dir()


def test_incomplete_s3_adapter_fails_the_check(tmp_path, s3):
    with pytest.raises(ConfigError, match="lacks adapter_config.json, adapter_model.safetensors"):
        registry({"x": "s3://models/no/such/prefix"}, tmp_path, endpoint=s3).inspect()


# ---- sweep hand-off --------------------------------------------------------------------------------


def make_sweep(root: Path, adapters, rows):
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row.get("adapter_path") and not Path(row["adapter_path"]).is_absolute():
            shutil.copytree(adapters[row.pop("_from")], root / row["adapter_path"])
    (root / "leaderboard.json").write_text(json.dumps(rows))
    return root


def test_top_k_picks_the_best_servable_trials_in_order(adapters, tmp_path):
    sweep = make_sweep(
        tmp_path / "sweep",
        adapters,
        [
            {"trial": "t1", "eval_loss": 0.5, "status": "ERROR", "adapter_path": str(adapters["a"])},
            {
                "trial": "t2",
                "eval_loss": 0.6,
                "status": "TERMINATED",
                "adapter_path": "trials/t2/adapter",
                "_from": "a",
            },
            {"trial": "t3", "eval_loss": 0.7, "status": "TERMINATED", "adapter_path": None},
            {"trial": "t/4", "eval_loss": 0.8, "status": "pruned", "adapter_path": str(adapters["b"])},
        ],
    )
    assert adapters_from_sweep(sweep, top_k=2) == {
        "trial-t2": str(sweep / "trials/t2/adapter"),
        "trial-t-4": str(adapters["b"]),
    }
    with pytest.raises(UserError) as info:
        adapters_from_sweep(sweep, top_k=3)
    assert "only 2 trial(s)" in str(info.value)
    assert "trial t1: status 'ERROR'" in str(info.value) and "trial t3: no adapter_path" in str(info.value)


def test_top_1_serves_best_adapter_dir(adapters, tmp_path):
    sweep = make_sweep(
        tmp_path / "sweep",
        adapters,
        [{"trial": 7, "eval_loss": 0.1, "status": "TERMINATED", "adapter_path": str(adapters["a"])}],
    )
    shutil.copytree(adapters["b"], sweep / "best" / "adapter")
    assert adapters_from_sweep(sweep) == {"trial-7": str(sweep / "best" / "adapter")}


def test_not_a_sweep_directory(tmp_path):
    with pytest.raises(UserError, match="no leaderboard.json"):
        adapters_from_sweep(tmp_path)
    (tmp_path / "leaderboard.json").write_text('{"trial": 1}')
    with pytest.raises(UserError, match="must be a list of rows"):
        adapters_from_sweep(tmp_path)


def test_adapter_names_are_safe_model_ids():
    assert adapter_name("abc_00001") == "trial-abc_00001"
    assert adapter_name("../../etc") == "trial-etc"


def test_model_directories_without_safetensors_are_refused(tmp_path, tiny_model_dir):
    from serve.registry import require_safetensors

    require_safetensors(str(tiny_model_dir))
    require_safetensors("some-org/some-hub-model")  # not a local directory: from_pretrained decides
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(RuntimeError, match="only safetensors"):
        require_safetensors(str(tmp_path))


def test_s3_adapters_are_compared_with_the_base_model_from_their_header_alone(
    adapters, tmp_path, s3, tiny_model_dir
):
    from ftune.config import ModelConfig
    from serve.adapter_checks import base_model_layout
    from serve.registry import WEIGHTS_FILE

    layout = base_model_layout(ModelConfig(name_or_path=str(tiny_model_dir)))
    cut = shutil.copytree(adapters["a"], tmp_path / "cut")
    (cut / WEIGHTS_FILE).write_bytes((adapters["a"] / WEIGHTS_FILE).read_bytes()[:-64])
    upload(s3, adapters["b"], "checked", "good")
    upload(s3, cut, "checked", "cut")
    reg = registry({"good": "s3://checked/good", "cut": "s3://checked/cut"}, tmp_path, endpoint=s3)
    with pytest.raises(ConfigError) as info:
        reg.inspect(layout, max_rank=64)
    assert "adapters.cut: adapter_model.safetensors: its header describes" in str(info.value)
    assert "adapters.good" not in str(info.value)
    assert not (tmp_path / "cache").exists(), "checking an s3:// adapter downloads nothing"
