"""Runs on S3: an S3-compatible server (moto) on 127.0.0.1 holds checkpoints, metrics and the adapter.

A run whose local staging directory is gone resumes from the bucket alone, and a worker killed while
its checkpoint is being uploaded resumes from the previous checkpoint, never from the partial one. The
uninterrupted run they are compared with trains on a base model in the bucket, fetched once.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from pathlib import Path
from typing import NamedTuple

import pytest
from faults import Background, kill, train_worker_pids
from test_fault_tolerance import assert_same_adapter

from ftune.config import TrainJobConfig
from ftune.yaml_config import load_config
from tests.waiting import wait_for
from train.job import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny.yaml"
BUCKET = "ftune-runs"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ftune-test", "AWS_SECRET_ACCESS_KEY": "ftune-test",
               "AWS_DEFAULT_REGION": "us-east-1"}
# A constant learning rate makes "6 steps, then 6 more" the same run as "12 steps"; dropout on, so
# equality after a restart also proves the RNG state came back from the bucket.
SMALL = ["scaling.num_workers=1", "lora.dropout=0.1", "train.lr_schedule=constant", "train.warmup_ratio=0",
         "train.checkpoint_every=3", "train.eval_every=1000", "train.exact_match_examples=0",
         "data.max_rows=400", "data.max_validation_rows=16", "tracking.wandb=disabled"]


class StallingS3:
    """WSGI middleware in front of moto: logs every request and can stall the writes under a key prefix.

    A stalled write is how a checkpoint upload is caught in the middle, so its worker can be killed there.
    """

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, str]] = []  # (method, bucket/key)
        self.stall_prefix: str | None = None
        self.stalled_key: str | None = None
        self.stalling = threading.Event()
        self.released = threading.Event()

    def __call__(self, environ, start_response):
        method, key = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").lstrip("/")
        self.requests.append((method, key))
        if self.stall_prefix and method in ("PUT", "POST") and key.startswith(self.stall_prefix):
            self.stalled_key = self.stalled_key or key
            self.stalling.set()
            self.released.wait(300)
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"stalled"]
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def s3(ftune_home):
    """(endpoint, boto3 client, StallingS3) with an empty bucket, and a local Ray whose workers get the
    credentials through runtime_env."""
    import boto3
    import ray
    from tests.s3_server import start_s3_server

    server, endpoint = start_s3_server(StallingS3)
    faults = server.app
    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        env.delenv("RAY_ADDRESS", raising=False)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {**CREDENTIALS, "FTUNE_HOME": str(ftune_home)}})
        try:
            yield endpoint, client, faults
        finally:
            faults.released.set()
            ray.shutdown()
            server.shutdown()


def job(storage: str, endpoint: str | None, steps: int) -> TrainJobConfig:
    return load_config(TrainJobConfig, TINY, [f"storage.path={storage}", f"storage.endpoint_url={endpoint}",
                                              f"train.max_steps={steps}", *SMALL])


BASE_MODEL = f"models/{uuid.uuid4().hex[:8]}/tiny-llama"


class Uninterrupted(NamedTuple):
    losses: dict[int, float]
    """Loss per step."""
    adapter: Path
    requests: list[tuple[str, str]]
    """(method, key) of every request to the S3 server while the run trained."""


@pytest.fixture(scope="module")
def uninterrupted(s3, tiny_model_dir, tmp_path_factory) -> Uninterrupted:
    """The 12-step run, uninterrupted, on local storage.

    Its base model is the tiny model's files uploaded to the bucket (the same weights the other runs load
    from the local copy), for test_a_run_trains_on_a_base_model_in_the_bucket.
    """
    endpoint, client, faults = s3
    for path in tiny_model_dir.iterdir():
        client.upload_file(str(path), BUCKET, f"{BASE_MODEL}/{path.name}")
    requests_before = len(faults.requests)
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = job(str(root), None, 12)
    cfg.model.name_or_path, cfg.model.endpoint_url = f"s3://{BUCKET}/{BASE_MODEL}", endpoint
    assert run_training(cfg, name="baseline")["steps"] == 12
    rows = [json.loads(line) for line in (root / "baseline" / "metrics.jsonl").read_text().splitlines()]
    return Uninterrupted({r["step"]: r["loss"] for r in rows if "loss" in r}, root / "baseline" / "adapter",
                         faults.requests[requests_before:])


def keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


def snapshot(client, prefix: str) -> str:
    """Ray's record of the run's registered checkpoints ('' before the first)."""
    try:
        return client.get_object(Bucket=BUCKET, Key=f"{prefix}checkpoint_manager_snapshot.json")["Body"].read().decode()
    except client.exceptions.NoSuchKey:
        return ""


def loss_rows(client, prefix: str) -> list[dict]:
    body = client.get_object(Bucket=BUCKET, Key=f"{prefix}metrics.jsonl")["Body"].read().decode()
    return [row for row in map(json.loads, body.splitlines()) if "loss" in row]


def assert_same_run(client, prefix: str, uninterrupted: Uninterrupted, tmp_path: Path) -> None:
    """The run's loss curve and final adapter in the bucket equal the uninterrupted run's."""
    losses, adapter = uninterrupted.losses, uninterrupted.adapter
    rows = loss_rows(client, prefix)
    assert [r["step"] for r in rows] == sorted(losses), "metrics.jsonl in the bucket lost or repeated steps"
    for row in rows:
        assert row["loss"] == pytest.approx(losses[row["step"]], abs=1e-6), row["step"]
    (tmp_path / "from-s3").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        client.download_file(BUCKET, f"{prefix}adapter/{name}", str(tmp_path / "from-s3" / name))
    assert_same_adapter(tmp_path / "from-s3", adapter)


def test_run_resumes_from_bucket_after_local_state_is_deleted(s3, uninterrupted, ftune_home, tmp_path):
    endpoint, client, _ = s3
    name = f"s3-resume-{uuid.uuid4().hex[:8]}"
    prefix = f"runs/{name}/"

    first = run_training(job(f"s3://{BUCKET}/runs", endpoint, 6), name=name)
    assert first["run_dir"] == f"s3://{BUCKET}/{prefix}".rstrip("/") and (first["steps"], first["restarts"]) == (6, 0)
    assert first["adapter_path"] == f"s3://{BUCKET}/{prefix}adapter"
    stored = keys(client, prefix)
    for ckpt in ("checkpoint_step0000003", "checkpoint_step0000006"):
        assert {f"{ckpt}/manifest_rank0.json", f"{ckpt}/engine_state.safetensors", f"{ckpt}/train_state.json"} <= stored
    assert {"metrics.jsonl", "summary.json", "checkpoint_manager_snapshot.json",
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= stored, sorted(stored)
    assert json.loads(client.get_object(Bucket=BUCKET, Key=f"{prefix}summary.json")["Body"].read())["steps"] == 6

    staging = ftune_home / "staging" / name
    assert staging.is_dir(), "the job kept no local staging directory to delete"
    shutil.rmtree(staging)

    second = run_training(job(f"s3://{BUCKET}/runs", endpoint, 12), name=name)
    assert (second["steps"], second["restarts"]) == (12, 1), second
    assert "checkpoint_step0000012/manifest_rank0.json" in keys(client, prefix)
    resumed = [r["step"] for r in loss_rows(client, prefix) if r["total_steps"] == 12]
    assert resumed == list(range(7, 13)), "the re-run did not continue at the bucket's checkpoint step 6 + 1"
    assert_same_run(client, prefix, uninterrupted, tmp_path)


def test_worker_killed_while_uploading_a_checkpoint_resumes_from_the_previous_one(s3, uninterrupted, tmp_path):
    endpoint, client, faults = s3
    name = f"s3-kill-{uuid.uuid4().hex[:8]}"
    prefix = f"runs/{name}/"
    partial = f"{BUCKET}/{prefix}checkpoint_step0000009/"
    faults.stall_prefix = partial
    run = Background(lambda: run_training(job(f"s3://{BUCKET}/runs", endpoint, 12), name=name))
    try:
        assert faults.stalling.wait(300), "the checkpoint at step 9 was never uploaded"
        # Ray registers a reported checkpoint when its controller next polls the workers (every ~2 s);
        # wait for step 6's, so "the previous checkpoint" is step 6 whatever the machine's speed.
        wait_for(lambda: "checkpoint_step0000006" in snapshot(client, prefix), "checkpoint 6 to be registered", 60)
        victims = train_worker_pids()
        assert victims, "no Ray Train worker process found"
        for pid in victims:
            kill(pid)
        killed_at = len(faults.requests)
        assert faults.stalled_key.removeprefix(f"{BUCKET}/") not in keys(client, prefix), "the stalled write landed"
    finally:
        faults.stall_prefix = None
        faults.released.set()
    summary = run.join(400)
    assert (summary["steps"], summary["restarts"]) == (12, 1), summary
    # Object reads only: Ray lists old checkpoints (a GET on the bucket) to prune them.
    read = {key.split("checkpoint_step")[1][:7] for method, key in faults.requests[killed_at:]
            if method == "GET" and "/checkpoint_step" in key}
    assert read == {"0000006"}, f"the restarted run read checkpoint(s) {sorted(read)}, not the last complete one (6)"
    assert "checkpoint_step0000009/manifest_rank0.json" in keys(client, prefix)  # rewritten whole by the new attempt
    assert_same_run(client, prefix, uninterrupted, tmp_path)


def test_a_run_trains_on_a_base_model_in_the_bucket(uninterrupted, ftune_home):
    adapter = json.loads((uninterrupted.adapter / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == f"s3://{BUCKET}/{BASE_MODEL}", "the adapter names the bucket"
    weights = [key for method, key in uninterrupted.requests
               if method == "GET" and key == f"{BUCKET}/{BASE_MODEL}/model.safetensors"]
    assert len(weights) == 1, "the driver fetched no weights; the worker fetched them once"
    assert (ftune_home / "models" / "s3" / BUCKET).is_dir(), "the node's cache is under FTUNE_HOME"
