"""Fetching an s3:// base model into the node's model cache, against plain copies of the same objects.

A Llama-architecture model with random bf16 weights (save_pretrained, several safetensors shards) is
uploaded to an S3-compatible server (moto, in its own process on 127.0.0.1), then, in one run:

  a. plain copy   each object read start to end into a local file (pyarrow's input stream,
                  as ``Storage.download_file`` does), one after the other
  b. copy_files   pyarrow's ``copy_files`` of the prefix (its default threads; with --copy-files)
  c. cold fetch   ``ftune.model_cache.fetch_model`` into an empty cache (16 MB ranged reads, each file
                  fsynced before the copy is published; the plain copy does not fsync)
  d. warm resolve the same call again (list + HEADs, nothing fetched)
  e. resumed      a fetch in another process, SIGKILLed once half the bytes are on disk, then the
                  fetch again: what it re-reads and how long it takes

    python bench/model_fetch.py                    # 2048 hidden x 8 layers: ~1.1 GB
    python bench/model_fetch.py --layers 2 --no-record

Goal: cold-fetch bandwidth >= 0.8x the plain copy's. Temporary files (~4x the model) are deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import REPO, RESULTS, goal, machine_line, markdown_table, record_section  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "ftune-bench", "AWS_SECRET_ACCESS_KEY": "ftune-bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "ftune-bench-models"
PREFIX = "models/llama-random"
SERVER = """
import sys, threading
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

class Quiet(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):
        pass

server = make_server("127.0.0.1", 0, DomainDispatcherApplication(create_backend_app), threaded=True,
                     request_handler=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"""
FETCH = """
import sys
from pathlib import Path
from ftune.model_cache import fetch_model
fetch_model(sys.argv[1], endpoint_url=sys.argv[2], root=Path(sys.argv[3]))
"""


def build_model(out: Path, hidden: int, layers: int) -> int:
    """Save a random-weight Llama (bf16, 500 MB shards) to ``out``; returns its bytes on disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(out, max_shard_size="500MB")
    return sum(p.stat().st_size for p in out.iterdir())


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **CREDENTIALS})
    port = proc.stdout.readline().strip()
    return proc, f"http://127.0.0.1:{port}"


def upload(model_dir: Path, endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(model_dir.iterdir()):
        client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.name}")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_copy(storage, out: Path) -> None:
    """Each object read start to end into a file, one after the other (no cache, no lock, no checks)."""
    fs, _ = storage.filesystem()
    out.mkdir(parents=True)
    for name in storage.list_files():
        with fs.open_input_stream(storage.path(name)) as src, open(out / name, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 * 1024 * 1024)


def copy_files(storage, out: Path) -> None:
    import pyarrow.fs as pafs

    fs, root = storage.filesystem()
    out.mkdir(parents=True)
    pafs.copy_files(root, str(out), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def interrupted(uri: str, endpoint: str, root: Path, total: int) -> tuple[int, float]:
    """Kill a fetch in another process once half the bytes are on disk, then fetch again in this one.

    Returns (bytes on disk when it was killed, seconds the fetch after the kill took).
    """
    from ftune.model_cache import fetch_model

    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", FETCH, uri, endpoint, str(root)], env=env)

    def on_disk() -> int:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    while on_disk() < total // 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = on_disk()
    return kept, timed(lambda: fetch_model(uri, endpoint_url=endpoint, root=root))


def measure(uri: str, endpoint: str, work: Path, repeats: int, with_copy_files: bool) -> dict[str, list]:
    from ftune.model_cache import fetch_model
    from ftune.storage import Storage

    storage = Storage(uri, endpoint)
    runs = [("plain copy", lambda out: plain_copy(storage, out)),
            ("cold fetch", lambda out: fetch_model(uri, endpoint_url=endpoint, root=out))]
    if with_copy_files:
        runs.insert(1, ("copy_files", lambda out: copy_files(storage, out)))
    times: dict[str, list[float]] = {label: [] for label, _ in runs}
    times["warm resolve"] = []
    for rep in range(repeats):  # interleaved, so load from elsewhere hits every row alike
        for label, run in runs:
            out = work / f"{label.replace(' ', '-')}-{rep}"
            times[label].append(timed(lambda: run(out)))
            print(f"repeat {rep + 1}: {label} {times[label][-1]:.2f} s", flush=True)
            if label == "cold fetch":
                times["warm resolve"].append(timed(lambda: fetch_model(uri, endpoint_url=endpoint, root=out)))
            shutil.rmtree(out)
    return times


def report(times: dict[str, list[float]], total: int, kept: int, resume_s: float) -> tuple[str, list[str]]:
    mb = total / 1e6
    best = {label: min(ts) for label, ts in times.items()}
    rows = [[label, f"{best[label]:.2f}", "/".join(f"{t:.2f}" for t in ts),
             f"{mb / best[label]:.0f}" if label != "warm resolve" else "-"] for label, ts in times.items()]
    left = (total - kept) / 1e6
    rows.append(["resumed (after SIGKILL at half)", f"{resume_s:.2f}", "-",
                 f"{left / resume_s:.0f} (of the {left:.0f} MB left)"])
    table = markdown_table(["run", "best s", "each s", "MB/s"], rows)
    ratio = best["plain copy"] / best["cold fetch"]
    goals = [
        goal("cold fetch / plain copy bandwidth", f"{ratio:.2f}x", ">= 0.80x", ratio >= 0.8),
        f"INFO  warm resolve: {best['warm resolve'] * 1e3:.0f} ms",
        f"INFO  killed with {kept / 1e6:.0f} of {mb:.0f} MB on disk; the fetch after it read the rest "
        f"in {resume_s:.2f} s ({resume_s / best['cold fetch']:.2f}x a cold fetch)",
    ]
    if "copy_files" in best:
        ratio_copy_files = best["copy_files"] / best["cold fetch"]
        goals.insert(1, f"INFO  cold fetch / copy_files bandwidth: {ratio_copy_files:.2f}x")
    return table, goals


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8: ~1.1 GB in bf16)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of a-d (default 2)")
    parser.add_argument("--copy-files", action="store_true",
                        help="also time pyarrow's copy_files (slow: 1 MB reads; ~7x slower here)")
    parser.add_argument("--no-record", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    machine = machine_line()
    print(f"machine: {machine}")
    work = Path(tempfile.mkdtemp(prefix="ftune-bench-fetch-"))
    server, endpoint = None, ""
    try:
        total = build_model(work / "model", args.hidden, args.layers)
        files = sorted(p.name for p in (work / "model").iterdir())
        server, endpoint = start_server()
        os.environ.update(CREDENTIALS)
        upload(work / "model", endpoint)
        shutil.rmtree(work / "model")
        uri = f"s3://{BUCKET}/{PREFIX}"
        print(f"model: {total / 1e6:.0f} MB in {len(files)} files at {uri} ({endpoint})", flush=True)
        times = measure(uri, endpoint, work, args.repeats, args.copy_files)
        kept, resume_s = interrupted(uri, endpoint, work / "interrupted", total)
        table, goals = report(times, total, kept, resume_s)
        load_end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        text = "\n".join([
            f"{machine} (at the start; at the end {load_end})", "",
            f"`python bench/model_fetch.py {' '.join(argv)}`: random-weight Llama "
            f"{args.hidden}x{args.layers} "
            f"in bf16, {total / 1e6:.0f} MB in {len(files)} files, on a moto server in its own process on "
            f"127.0.0.1; best of {args.repeats} interleaved repeat(s). The cold fetch fsyncs what it wrote, "
            "the plain copy leaves it in the page cache.",
            "", table, "", "```", *goals, "```",
        ])
        print("\n" + text)
        if not args.no_record:
            title = "## Fetching an s3:// base model into the node cache"
            record_section("bench/model_fetch.py", f"{title}\n\n{text}")
            print(f"\nrecorded in {RESULTS}")
        return 0 if all(not g.startswith("FAIL") for g in goals) else 1
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
