"""s3:// base models through the node-local cache, against a moto server on 127.0.0.1 that logs every GET.

The tiny model is uploaded under a fresh prefix per test. Fetchers run as separate processes where the
test is about processes: several starting together, or one killed with SIGKILL while a GET of the
weights hangs (a middleware holds that GET until released) or at a random moment.
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ftune.config import ModelConfig
from ftune.errors import UserError
from ftune.model_cache import RemoteFile
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
BUCKET = "ftune-models"
WEIGHTS = "model.safetensors"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ftune-test", "AWS_SECRET_ACCESS_KEY": "ftune-test",
               "AWS_DEFAULT_REGION": "us-east-1"}
SMALL_CHUNK = 64 * 1024
"""Ranged-read size for the kill tests: the tiny weights (~0.9 MB) take a dozen GETs."""

FETCH = """
import sys
from pathlib import Path
import ftune.model_cache as cache
cache.CHUNK = int(sys.argv[3])
print(cache.fetch_model(sys.argv[1], endpoint_url=sys.argv[2], root=Path(sys.argv[4])), flush=True)
"""


class RecordingS3:
    """WSGI middleware in front of moto: records each object GET as (key, first byte, last byte) and can
    hold one GET (the n-th of a key) until released, so its client can be killed mid-file."""

    def __init__(self, app):
        self.app = app
        self.gets: list[tuple[str, int, int | None]] = []
        self.hold: tuple[str, int] | None = None
        self.holding = threading.Event()
        self.released = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        bucket, _, key = environ.get("PATH_INFO", "").lstrip("/").partition("/")
        if environ["REQUEST_METHOD"] == "GET" and key:
            first, _, last = environ.get("HTTP_RANGE", "bytes=0-").removeprefix("bytes=").partition("-")
            with self._lock:
                self.gets.append((key, int(first), int(last) if last else None))
                nth = sum(1 for g in self.gets if g[0] == key)
            if self.hold == (key, nth):
                self.holding.set()
                self.released.wait(60)
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"held"]
        return self.app(environ, start_response)

    def reset(self) -> None:
        self.gets.clear()
        self.hold = None
        self.holding.clear()
        self.released.clear()

    def keys_fetched(self, prefix: str) -> collections.Counter:
        return collections.Counter(k[len(prefix) + 1:] for k, _, _ in self.gets if k.startswith(prefix + "/"))


@pytest.fixture(scope="module")
def s3():
    """(endpoint, boto3 client, RecordingS3) with the bucket made and test credentials in the environment."""
    import boto3
    from tests.s3_server import start_s3_server

    server, endpoint = start_s3_server(RecordingS3)
    recorder = server.app
    with pytest.MonkeyPatch.context() as env:
        for key, value in CREDENTIALS.items():
            env.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_REGION", "FTUNE_MODEL_CACHE"):
            env.delenv(key, raising=False)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        try:
            yield endpoint, client, recorder
        finally:
            recorder.released.set()
            server.shutdown()


@pytest.fixture
def model(s3, tiny_model_dir, tmp_path):
    """(s3:// URI, prefix) of a fresh copy of the tiny model, and a pickled decoy that is never fetched."""
    _, client, recorder = s3
    prefix = f"models/{uuid.uuid4().hex[:8]}/tiny-llama"
    for path in sorted(tiny_model_dir.iterdir()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/pytorch_model.bin", Body=b"not to be unpickled")
    recorder.reset()
    return f"s3://{BUCKET}/{prefix}", prefix


def fetch(uri: str, endpoint: str, root: Path, chunk: int | None = None) -> Path:
    from ftune import model_cache

    if chunk is None:
        return model_cache.fetch_model(uri, endpoint_url=endpoint, root=root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_cache, "CHUNK", chunk)
        return model_cache.fetch_model(uri, endpoint_url=endpoint, root=root)


def start_fetcher(uri: str, endpoint: str, root: Path, chunk: int) -> subprocess.Popen:
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", FETCH, uri, endpoint, str(chunk), str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same_files(cached: Path, local: Path) -> None:
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in local.iterdir())
    for path in local.iterdir():
        assert (cached / path.name).read_bytes() == path.read_bytes(), path.name


def partials(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/.partial/*"))


def test_an_s3_model_loads_like_its_local_copy_and_a_second_resolve_fetches_nothing(
    s3, model, tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch
):
    import torch
    from transformers import AutoModelForCausalLM

    from ftune.model import load_base_model, load_tokenizer, resolve_model_path

    endpoint, _, recorder = s3
    uri, prefix = model
    monkeypatch.setenv("FTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    cfg = ModelConfig(name_or_path=uri, endpoint_url=endpoint)
    tokenizer = load_tokenizer(cfg)
    assert WEIGHTS not in recorder.keys_fetched(prefix), "the tokenizer alone needs no weights"
    text = "### Instruction:\nWhat is the capital of Veloria?\n\n### Response:\n"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    loaded = load_base_model(cfg, dtype=torch.float32)
    local = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pairs = zip(loaded.state_dict().values(), local.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert loaded.name_or_path == loaded.config.name_or_path == uri, "adapters name the S3 model, not a cache"
    fetched = recorder.keys_fetched(prefix)
    assert fetched == {p.name: 1 for p in tiny_model_dir.iterdir()}, "each object once; never the .bin"
    path = Path(resolve_model_path(cfg))
    assert path.name == "tiny-llama" and str(path).startswith(str(tmp_path / "cache"))
    assert_same_files(path, tiny_model_dir)
    recorder.gets.clear()
    assert resolve_model_path(cfg) == str(path) and resolve_model_path(cfg, weights=False) == str(path)
    assert recorder.gets == [], "a warm resolve lists and HEADs, it GETs nothing"


def test_processes_starting_together_fetch_each_object_once(s3, model, tiny_model_dir, tmp_path):
    endpoint, _, recorder = s3
    uri, prefix = model
    procs = [start_fetcher(uri, endpoint, tmp_path / "cache", 16 * 1024 * 1024) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1, paths
    assert recorder.keys_fetched(prefix) == {p.name: 1 for p in tiny_model_dir.iterdir()}
    assert_same_files(Path(paths.pop()), tiny_model_dir)


def kill_while_holding(s3, uri: str, prefix: str, root: Path, nth: int) -> None:
    """Start a fetcher, hold its ``nth`` GET of the weights, SIGKILL it there, release the server."""
    endpoint, _, recorder = s3
    recorder.hold = (f"{prefix}/{WEIGHTS}", nth)
    proc = start_fetcher(uri, endpoint, root, SMALL_CHUNK)
    try:
        assert recorder.holding.wait(60), proc.communicate(timeout=5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        recorder.released.set()
    recorder.hold = None


def test_a_fetch_killed_mid_file_resumes_from_its_partial(s3, model, tiny_model_dir, tmp_path):
    endpoint, _, recorder = s3
    uri, prefix = model
    root = tmp_path / "cache"
    kill_while_holding(s3, uri, prefix, root, nth=4)
    [part] = [p for p in partials(root) if p.name.startswith(WEIGHTS)]
    assert part.stat().st_size == 3 * SMALL_CHUNK, "the three chunks fetched before the kill are kept"
    from ftune.model_cache import fetch_model

    small = fetch_model(uri, endpoint_url=endpoint, root=root, weights=False)  # e.g. the driver's tokenizer
    assert not (small / WEIGHTS).exists() and part.stat().st_size == 3 * SMALL_CHUNK, "the partial is kept"
    recorder.gets.clear()
    path = fetch(uri, endpoint, root, SMALL_CHUNK)
    resumed = [(first, last) for key, first, last in recorder.gets if key.endswith(WEIGHTS)]
    assert resumed[0] == (3 * SMALL_CHUNK, 4 * SMALL_CHUNK - 1), "continued with a ranged GET, not from 0"
    assert_same_files(path, tiny_model_dir)
    assert recorder.keys_fetched(prefix).keys() == {WEIGHTS}, "the small files came from the first copy"
    assert partials(root) == []


def blocked_on_a_lock(pid: int) -> bool:
    """Whether ``pid`` waits for a file lock (Linux lists waiters in /proc/locks as ``N: -> FLOCK ...``)."""
    waiters = [line.split() for line in Path("/proc/locks").read_text().splitlines() if "->" in line]
    return any(fields[5] == str(pid) for fields in waiters)


def test_a_fetcher_killed_holding_the_lock_lets_the_waiting_one_resume(s3, model, tiny_model_dir, tmp_path):
    endpoint, _, recorder = s3
    uri, prefix = model
    root = tmp_path / "cache"
    recorder.hold = (f"{prefix}/{WEIGHTS}", 3)
    first = start_fetcher(uri, endpoint, root, SMALL_CHUNK)
    try:
        assert recorder.holding.wait(60), first.communicate(timeout=5)
        waiting = start_fetcher(uri, endpoint, root, SMALL_CHUNK)
        wait_for(lambda: blocked_on_a_lock(waiting.pid) or waiting.poll() is not None, "the second to wait")
        assert waiting.poll() is None, waiting.communicate()
        fetched = len(recorder.gets)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        recorder.hold = None
        recorder.released.set()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    after = [first for key, first, _ in recorder.gets[fetched:] if key.endswith(WEIGHTS)]
    assert after[0] == 2 * SMALL_CHUNK, "the waiting fetcher continued the killed one's partial"
    assert_same_files(Path(out.strip()), tiny_model_dir)


def test_a_partial_of_a_replaced_object_is_not_resumed(s3, model, tiny_model_dir, tmp_path):
    endpoint, client, recorder = s3
    uri, prefix = model
    root = tmp_path / "cache"
    kill_while_holding(s3, uri, prefix, root, nth=3)
    new_weights = (tiny_model_dir / WEIGHTS).read_bytes()[::-1]  # same size, other bytes
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{WEIGHTS}", Body=new_weights)
    recorder.gets.clear()
    path = fetch(uri, endpoint, root, SMALL_CHUNK)
    assert [first for key, first, _ in recorder.gets if key.endswith(WEIGHTS)][0] == 0
    assert (path / WEIGHTS).read_bytes() == new_weights


def test_fetches_killed_at_random_moments_lose_at_most_a_chunk_each(s3, model, tiny_model_dir, tmp_path):
    endpoint, _, recorder = s3
    uri, prefix = model
    root, rng, chunk = tmp_path / "cache", random.Random(14), 16 * 1024
    original = (tiny_model_dir / WEIGHTS).read_bytes()
    size = len(original)
    for _ in range(3):
        before = len(recorder.gets)
        proc = start_fetcher(uri, endpoint, root, chunk)
        wait_for(lambda: len(recorder.gets) > before or proc.poll() is not None, "the fetcher's first GET")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        for part in (p for p in partials(root) if p.name.startswith(WEIGHTS)):
            assert original.startswith(part.read_bytes()), "a partial holds a prefix of the object, only"
    path = fetch(uri, endpoint, root, chunk)
    assert_same_files(path, tiny_model_dir)
    fetched = sum((last + 1 if last is not None else size) - first
                  for key, first, last in recorder.gets if key.endswith(WEIGHTS))
    assert fetched <= size + 3 * chunk, "each kill costs at most the chunk in flight"


def test_a_truncated_or_missing_cached_file_is_fetched_again(s3, model, tiny_model_dir, tmp_path):
    endpoint, _, recorder = s3
    uri, prefix = model
    root = tmp_path / "cache"
    path = fetch(uri, endpoint, root)
    with open(path / WEIGHTS, "r+b") as f:
        f.truncate(1000)
    (path / "tokenizer.json").unlink()
    recorder.gets.clear()
    assert fetch(uri, endpoint, root) == path
    assert recorder.keys_fetched(prefix) == {WEIGHTS: 1, "tokenizer.json": 1}, "the intact files stay"
    assert_same_files(path, tiny_model_dir)


def test_a_changed_remote_model_is_fetched_again_and_the_old_copy_dropped(s3, model, tiny_model_dir,
                                                                           tmp_path):
    endpoint, client, recorder = s3
    uri, prefix = model
    root = tmp_path / "cache"
    old = fetch(uri, endpoint, root)
    config = (tiny_model_dir / "config.json").read_text().replace("{", '{\n  "ftune_note": "v2",', 1)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=config.encode())
    recorder.gets.clear()
    new = fetch(uri, endpoint, root)
    assert new != old and not old.exists()
    assert (new / "config.json").read_text() == config
    assert recorder.keys_fetched(prefix) == {"config.json": 1}, "unchanged objects are not fetched again"


def test_a_partial_longer_than_its_object_is_started_over(s3, model, tiny_model_dir, tmp_path):
    from ftune.storage import Storage

    endpoint, _, recorder = s3
    uri, prefix = model
    root = tmp_path / "cache"
    storage = Storage(uri, endpoint)
    size = (tiny_model_dir / WEIGHTS).stat().st_size
    remote = RemoteFile(WEIGHTS, size, storage.version(WEIGHTS))
    fetch(uri, endpoint, root)
    [home] = root.glob("*/*")
    for entry in [d for d in home.iterdir() if not d.name.startswith(".")]:
        shutil.rmtree(entry)
    (home / ".partial" / remote.partial_name).write_bytes(b"x" * (size + 10))
    recorder.gets.clear()
    path = fetch(uri, endpoint, root)
    assert [first for key, first, _ in recorder.gets if key.endswith(WEIGHTS)] == [0]
    assert_same_files(path, tiny_model_dir)


def test_what_a_publish_killed_midway_left_is_reused_or_cleared(s3, model, tiny_model_dir, tmp_path):
    endpoint, _, recorder = s3
    uri, prefix = model
    root = tmp_path / "cache"
    path = fetch(uri, endpoint, root)
    home = path.parents[1]
    os.rename(path.parent, home / f".{path.parent.name}.building-x")  # built, never renamed into place
    junk = home / ".0123456789abcdef.building-y" / "tiny-llama"  # killed before its manifest
    junk.mkdir(parents=True)
    (junk / WEIGHTS).write_bytes(b"half")
    recorder.gets.clear()
    assert fetch(uri, endpoint, root) == path
    assert recorder.gets == [], "the files of the unfinished publish were taken up, not fetched again"
    assert_same_files(path, tiny_model_dir)
    assert sorted(p.name for p in home.iterdir()) == sorted([".lock", ".partial", path.parent.name])


def test_a_prefix_that_holds_no_model_says_what_is_wrong(s3, model, tmp_path):
    endpoint, client, _ = s3
    uri, prefix = model
    with pytest.raises(UserError, match=r"model.name_or_path: .*the only query an s3:// path takes is one"):
        fetch(f"{uri}?versionId=3", endpoint, tmp_path)
    with pytest.raises(UserError, match=r"model.name_or_path=.*no files under s3://ftune-models/nowhere/"):
        fetch(f"s3://{BUCKET}/nowhere", endpoint, tmp_path)
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/config.json")
    with pytest.raises(UserError, match=r"config.json is missing .*save_pretrained"):
        fetch(uri, endpoint, tmp_path)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/config.json", Body=b"{}")
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{WEIGHTS}")
    with pytest.raises(UserError, match=r"no \*.safetensors weights .*pickled weights are never loaded"):
        fetch(uri, endpoint, tmp_path)


def test_an_unreachable_endpoint_names_the_fix(s3, model, tmp_path):
    uri, _ = model
    with pytest.raises(UserError, match=r"model.name_or_path=.*cannot list the model at http://127.0.0.1:9 .*"
                                        r"credentials.*model.endpoint_url or AWS_ENDPOINT_URL"):
        fetch(uri, "http://127.0.0.1:9", tmp_path)


def test_a_serve_replica_loads_its_base_model_from_the_bucket(s3, model, tiny_model_dir, tmp_path,
                                                              monkeypatch):
    from serve.app import LoraServer

    endpoint, _, recorder = s3
    uri, prefix = model
    monkeypatch.setenv("FTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    server = LoraServer({"model": {"name_or_path": uri, "endpoint_url": endpoint},
                         "allow_unauthenticated": True})
    assert Path(server.layout.name).parent.parent.parent == tmp_path / "cache" / BUCKET
    assert recorder.keys_fetched(prefix) == {p.name: 1 for p in tiny_model_dir.iterdir()}
