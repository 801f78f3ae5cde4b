"""Run storage: atomic writes (a failed write leaves the old file), whole-row JSON Lines uploads, and the
S3 region (``?region=``, AWS_REGION, AWS_DEFAULT_REGION, the bucket's own) on a moto server on 127.0.0.1.

A write "fails midway" here the way a full disk makes it fail: RLIMIT_FSIZE caps the size of any file
the process writes, so the write stops with EFBIG after the first bytes.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ftune.config import StorageConfig
from ftune.errors import ConfigError
from ftune.storage import Storage, with_region

OLD = b'{"step": 1, "loss": 2.0}\n'
NEW = b'{"step": 2, "loss": 1.5}\n' * 4096  # 100 KiB: far past the cap below
CAP = 4096
"""Bytes a file may grow to while a write is made to fail."""


@contextlib.contextmanager
def disk_full_after(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG (OSError) while inside; nothing else may write then."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_write_cut_short_leaves_the_old_file(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_text(OLD.decode(), "run", "metrics.jsonl")
    with pytest.raises(OSError), disk_full_after(CAP):
        storage.write_text(NEW.decode(), "run", "metrics.jsonl")
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == OLD
    assert leftovers(tmp_path / "run") == [], "the temporary file is removed"


def test_an_upload_cut_short_leaves_the_stored_copy(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    storage.write_text(OLD.decode(), "run", "metrics.jsonl")
    local = tmp_path / "metrics.jsonl"
    local.write_bytes(NEW)
    with pytest.raises(OSError), disk_full_after(CAP):
        storage.upload_file(local, "run", "metrics.jsonl")
    assert storage.read_text("run", "metrics.jsonl") == OLD.decode()
    assert leftovers(tmp_path / "root" / "run") == []


def test_a_download_cut_short_leaves_the_local_copy(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    storage.write_text(NEW.decode(), "run", "metrics.jsonl")
    local = tmp_path / "staging" / "metrics.jsonl"
    local.parent.mkdir()
    local.write_bytes(OLD)
    with pytest.raises(OSError), disk_full_after(CAP):
        storage.download_file(local, "run", "metrics.jsonl")
    assert local.read_bytes() == OLD, "never a truncated copy that a later upload would put back"
    assert leftovers(local.parent) == []
    assert storage.download_file(local, "run", "metrics.jsonl") and local.read_bytes() == NEW


def test_a_jsonl_upload_leaves_out_the_row_being_appended(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    local = tmp_path / "metrics.jsonl"
    local.write_bytes(OLD + b'{"step": 2, "lo')  # the writer is mid-row
    storage.upload_file(local, "run", "metrics.jsonl")
    assert storage.read_text("run", "metrics.jsonl") == OLD.decode()
    local.write_bytes(OLD + b'{"step": 2, "loss": 1.5}\n')
    storage.upload_file(local, "run", "metrics.jsonl")
    assert storage.read_text("run", "metrics.jsonl").splitlines()[-1] == '{"step": 2, "loss": 1.5}'


def test_other_files_are_uploaded_whole(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    local = tmp_path / "summary.json"
    local.write_bytes(b'{"no": "newline"}')
    storage.upload_file(local, "run", "summary.json")
    assert storage.read_text("run", "summary.json") == '{"no": "newline"}'


@pytest.fixture
def no_region_env(monkeypatch):
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def bucket_regions(no_region_env):
    """Stands in for S3's bucket-region lookup: {bucket: region}; a bucket not in it fails the lookup."""
    regions: dict[str, str] = {}
    asked: list[str] = []

    def resolve(bucket: str) -> str:
        asked.append(bucket)
        if bucket not in regions:
            raise OSError(f"When resolving region for bucket '{bucket}': AWS Error NETWORK_CONNECTION")
        return regions[bucket]

    no_region_env.setattr(pafs, "resolve_s3_region", resolve)
    return regions, asked


def fresh_bucket() -> str:
    """A bucket name no earlier lookup in this process has seen (lookups are kept per process)."""
    return f"ftune-test-{uuid.uuid4().hex[:12]}"


def test_the_bucket_region_is_looked_up_once_when_nothing_sets_it(bucket_regions):
    regions, asked = bucket_regions
    bucket = fresh_bucket()
    regions[bucket] = "ap-southeast-2"
    storage = Storage(f"s3://{bucket}/runs")
    assert storage.filesystem()[0].region == "ap-southeast-2"
    assert storage.filesystem()[0].region == "ap-southeast-2"
    assert asked == [bucket]


def test_an_explicit_region_wins_over_the_environment_and_the_bucket(bucket_regions):
    regions, asked = bucket_regions
    bucket = fresh_bucket()
    regions[bucket] = "ap-southeast-2"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_REGION", "us-west-2")
        storage = Storage.from_config(StorageConfig(path=f"s3://{bucket}/runs?region=eu-west-3"))
        assert storage.region == "eu-west-3"
        assert storage.filesystem()[0].region == "eu-west-3"
    assert asked == []


def test_aws_region_comes_before_aws_default_region(bucket_regions, no_region_env):
    regions, asked = bucket_regions
    no_region_env.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert Storage(f"s3://{fresh_bucket()}/p").filesystem()[0].region == "eu-central-1"
    no_region_env.setenv("AWS_REGION", "us-west-2")
    assert Storage(f"s3://{fresh_bucket()}/p").filesystem()[0].region == "us-west-2"
    assert asked == [], "a configured region needs no lookup"


def test_a_failed_lookup_leaves_the_region_to_the_sdk_and_says_how_to_set_it(bucket_regions, caplog):
    _, asked = bucket_regions
    bucket = fresh_bucket()
    with caplog.at_level(logging.WARNING, logger="ftune.storage"):
        fs, _ = Storage(f"s3://{bucket}/p").filesystem()
    assert fs.region == pafs.S3FileSystem().region
    assert asked == [bucket]
    assert "AWS_REGION" in caplog.text and f"s3://{bucket}/...?region=NAME" in caplog.text


def test_an_s3_compatible_endpoint_is_not_looked_up_on_aws(bucket_regions):
    _, asked = bucket_regions
    fs, _ = Storage(f"s3://{fresh_bucket()}/p", endpoint_url="http://127.0.0.1:9").filesystem()
    assert asked == [] and fs.region == pafs.S3FileSystem().region


def test_the_region_stays_out_of_paths_and_user_facing_uris():
    storage = Storage("s3://bucket/runs?region=eu-west-3")
    assert storage.path("demo", "metrics.jsonl") == "bucket/runs/demo/metrics.jsonl"
    assert storage.uri_of("demo", "adapter") == "s3://bucket/runs/demo/adapter"
    assert Storage("/data/what?/runs").uri_of("x") == "/data/what?/runs/x", "a local path is taken as is"


@pytest.mark.parametrize("query", ["?regoin=eu-west-1", "?region=", "?region=a&region=b"])
def test_a_bad_query_on_an_s3_path_is_a_config_error(query):
    with pytest.raises(ConfigError, match=r"storage.path: .*\?region=NAME"):
        Storage.from_config(StorageConfig(path=f"s3://bucket/runs{query}"))


@pytest.fixture(scope="module")
def moto_endpoint():
    from tests.s3_server import start_s3_server

    server, endpoint = start_s3_server()
    yield endpoint
    server.shutdown()


def test_s3_round_trip_with_a_region_in_the_uri(moto_endpoint, no_region_env, tmp_path):
    import boto3

    no_region_env.setenv("AWS_ACCESS_KEY_ID", "ftune-test")
    no_region_env.setenv("AWS_SECRET_ACCESS_KEY", "ftune-test")
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="eu-west-3")
    bucket = fresh_bucket()
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    storage = Storage(f"s3://{bucket}/runs?region=eu-west-3", endpoint_url=moto_endpoint)
    local = tmp_path / "metrics.jsonl"
    local.write_bytes(OLD + b'{"step": 2')
    storage.upload_file(local, "demo", "metrics.jsonl")
    storage.write_text("{}", "demo", "summary.json")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert [k for k in keys if not k.endswith("/")] == ["runs/demo/metrics.jsonl", "runs/demo/summary.json"]
    assert storage.read_text("demo", "metrics.jsonl") == OLD.decode(), "the row being written stayed out"
    assert storage.download_file(tmp_path / "back.jsonl", "demo", "metrics.jsonl")
    assert (tmp_path / "back.jsonl").read_bytes() == OLD
    assert not storage.download_file(tmp_path / "none.jsonl", "demo", "missing.jsonl")


def test_a_child_keeps_the_region_and_the_endpoint():
    root = Storage("s3://bucket/runs?region=eu-west-3", endpoint_url="http://127.0.0.1:9")
    child = root.child("sweeps", "s1")
    assert child == Storage("s3://bucket/runs/sweeps/s1?region=eu-west-3", endpoint_url="http://127.0.0.1:9")
    assert child.region == "eu-west-3" and child.path("trials") == "bucket/runs/sweeps/s1/trials"
    assert Storage("s3://bucket/runs").child("x").uri == "s3://bucket/runs/x"
    assert Storage("/data/runs").child("a", "b") == Storage("/data/runs/a/b")


def test_with_region_sets_or_keeps_the_query():
    assert with_region("s3://bucket/p", "eu-west-3") == "s3://bucket/p?region=eu-west-3"
    assert with_region("s3://bucket/p?region=us-east-1", "eu-west-3") == "s3://bucket/p?region=eu-west-3"
    assert with_region("s3://bucket/p?region=us-east-1", None) == "s3://bucket/p?region=us-east-1"


def test_storage_region_is_a_typed_setting_that_agrees_with_the_path(bucket_regions):
    _, asked = bucket_regions
    bucket = fresh_bucket()
    storage = Storage.from_config(StorageConfig(path=f"s3://{bucket}/runs", region="eu-west-3"))
    assert storage.region == "eu-west-3" and storage.filesystem()[0].region == "eu-west-3"
    assert storage.uri_of("demo") == f"s3://{bucket}/runs/demo"
    same = Storage.from_config(StorageConfig(path=f"s3://{bucket}/runs?region=eu-west-3", region="eu-west-3"))
    assert same == storage
    with pytest.raises(ConfigError, match=r"storage.region is 'eu-west-3' but storage.path says \?region=us-east-1"):
        Storage.from_config(StorageConfig(path=f"s3://{bucket}/runs?region=us-east-1", region="eu-west-3"))
    assert asked == []


def test_directory_uploads_run_on_one_thread(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pafs, "copy_files", lambda *args, **kwargs: calls.append(kwargs))
    (tmp_path / "adapter").mkdir()
    Storage(str(tmp_path / "root")).upload_dir(tmp_path / "adapter", "run", "adapter")
    assert [c.get("use_threads") for c in calls] == [False]


def test_files_are_listed_read_by_range_and_versioned_locally(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_text("0123456789", "adapter", "weights")
    storage.write_text("{}", "adapter", "config.json")
    (tmp_path / "adapter" / "nested").mkdir()
    assert storage.list_files("adapter") == {"weights": 10, "config.json": 2}
    assert storage.list_files("absent") == {}
    assert storage.read_bytes("adapter", "config.json") == b"{}"
    with storage.open_file("adapter", "weights") as f:
        assert (f.read_at(3, 4), f.size()) == (b"456", 10)
    before = storage.version("adapter", "weights")
    assert storage.version("adapter", "weights") == before
    storage.write_text("01234567890", "adapter", "weights")
    assert storage.version("adapter", "weights") != before
    with pytest.raises(FileNotFoundError):
        storage.version("adapter", "missing")


def test_s3_files_are_listed_read_by_range_and_versioned(moto_endpoint, no_region_env):
    import boto3

    no_region_env.setenv("AWS_ACCESS_KEY_ID", "ftune-test")
    no_region_env.setenv("AWS_SECRET_ACCESS_KEY", "ftune-test")
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = fresh_bucket()
    client.create_bucket(Bucket=bucket)
    storage = Storage(f"s3://{bucket}/adapters/a?region=us-east-1", endpoint_url=moto_endpoint)
    storage.write_text("0123456789", "weights")
    storage.write_text("{}", "nested", "config.json")
    assert storage.list_files() == {"weights": 10}, "files directly under the prefix, not in sub-folders"
    assert storage.child("nowhere").list_files() == {}
    with storage.open_file("weights") as f:
        assert (f.read_at(3, 4), f.size()) == (b"456", 10)
    etag = client.head_object(Bucket=bucket, Key="adapters/a/weights")["ETag"]
    assert storage.version("weights") == etag
    storage.write_text("9876543210", "weights")
    assert storage.version("weights") not in ("", etag)
