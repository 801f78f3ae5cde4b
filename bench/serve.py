"""Serving: Serve HTTP overhead over in-process decoding, mixed-adapter throughput, adapter cold load.

Measured in one run, on one machine, with one torch thread for the model everywhere:

  a. in-process   the replica's own decode path (AdapterPool + BatchDecoder), no Ray, no HTTP
  b. serve-http   the same requests through Ray Serve's proxy and the FastAPI ingress (requests.Session),
     serve-direct and straight to the replica's own port (Serve's direct ingress, on in this run), both
                  with the product's default batching
  c. mixed        8 concurrent clients, all on one adapter vs. round-robin over 8 adapters, in process
                  (one batch of 8) and through Serve (``@serve.batch``); in process also with peft's own
                  adapter_names loop, the baseline that serve/gathered_lora.py replaces
  d. cold load    loading an adapter into the replica's peft model: in process, and the extra latency
                  of the first request to an adapter over HTTP
  e. many         with ``--adapters N`` (S-LoRA's regime, e.g. 64): in process, a batch of N rows on one
                  adapter vs. on N distinct adapters; through Serve, 16 clients whose requests each pick one
                  of the N adapters at random vs. all on one adapter, on a replica that keeps all N loaded;
                  and the same random spread on a replica that keeps only ``--capacity`` loaded (LRU churn:
                  requests/s, latency, loads and unloads from the replica's /stats, milliseconds per load)

    python bench/serve.py                    # tiny model, 40 sequential requests, 16 tokens each
    python bench/serve.py --model 512x4      # a larger random Llama (HIDDENxLAYERS), same tokenizer
    python bench/serve.py --no-serve         # in-process rows only (no Ray)
    python bench/serve.py --no-serve --device cuda --model 2048x16   # the in-process rows on a GPU
    python bench/serve.py --adapters 64 --capacity 16 --requests 20  # also 64 adapters and LRU churn

Goals: Serve HTTP overhead <= 3 ms at p50 over in-process; 8 mixed adapters >= 0.9x the throughput of
one adapter; adapter cold load <= 50 ms (tiny model); N = 64 mixed adapters >= 0.8x the throughput of one
adapter, in process and through Serve. Results go to bench/RESULTS.md (section "serve").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import RESULTS, goal, machine_line, markdown_table, record_section

PROMPT = "Write one sentence about the sea."
ADAPTERS = [f"a{i}" for i in range(8)]
OVERHEAD_GOAL_MS, MIXED_GOAL, COLD_GOAL_MS = 3.0, 0.9, 50.0
ROUNDS = 2
"""Alternating rounds of the 1-adapter and 8-adapter concurrent runs."""
THROUGHPUT_WAIT_S = 0.03
"""batch_wait_timeout_s of the throughput app: about the spread of 8 clients' arrivals on 2 cores."""
LATENCY_APP, THROUGHPUT_APP = "latency", "throughput"
MANY_GOAL = 0.8
MANY_CLIENTS = 16
"""Concurrent clients of the many-adapter runs, and those apps' max_batch_size."""
MANY_APP, CHURN_APP = "many", "churn"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def build_model(spec: str, out_dir: Path) -> Path:
    """The tiny model, or a random Llama of shape HIDDENxLAYERS with the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ftune.builtin_assets import ensure_tiny_model

    tiny = ensure_tiny_model()
    if spec == "tiny":
        return tiny
    hidden, layers = (int(x) for x in spec.lower().split("x"))
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig.from_pretrained(tiny)
    config.update({"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "num_hidden_layers": layers})
    torch.manual_seed(0)
    path = out_dir / f"llama-{spec}"
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------ in process
class InProcess:
    """The replica's decode path without Serve: one AdapterPool, BatchDecoder steps run inline."""

    def __init__(
        self, model_dir: Path, adapters: dict[str, Path], gathered: bool = True, device: str = "cpu"
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from serve.adapter_pool import AdapterPool

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.pool = AdapterPool(model, gathered=gathered)
        self.adapters = adapters
        self.load_ms: list[float] = []  # all but the first, which also wraps the base model in peft
        for i, (name, path) in enumerate(adapters.items()):
            start = time.perf_counter()
            asyncio.run(self.pool.load(name, path))
            if i:
                self.load_ms.append(1000 * (time.perf_counter() - start))

    def swap_ms(self, count: int) -> list[float]:
        """Milliseconds of ``count`` loads that each follow an eviction (an LRU's load into a full pool):
        each evicts the first loaded adapter and loads it again, as the last."""
        times = []
        for name in list(self.adapters)[:count]:
            asyncio.run(self.pool.evict(name))
            start = time.perf_counter()
            asyncio.run(self.pool.load(name, self.adapters[name]))
            times.append(1000 * (time.perf_counter() - start))
        return times

    def generate(self, models: list[str | None], max_tokens: int) -> None:
        """Tokenize, decode ``len(models)`` requests in one batch, detokenize (as a replica does)."""
        from serve.generation import BatchDecoder, GenerationRequest, SamplingParams

        ids = tuple(self.tokenizer(PROMPT)["input_ids"])
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # the same work whatever the adapter
        requests = [GenerationRequest(ids, params, m) for m in models]
        decoder = BatchDecoder(
            requests,
            self.pool.forward,
            self.tokenizer,
            eos_token_ids=[self.tokenizer.eos_token_id],
            pad_token_id=self.tokenizer.pad_token_id,
            device=self.device,
        )
        while not decoder.done:
            decoder.step()


def lora_share(fn) -> float:
    """Fraction of ``fn()``'s time adding LoRA deltas (cProfile): peft's mixed-batch layer forward (its base
    matmul included) or the gathered path's forward hooks (deltas only)."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.runcall(fn)
    stats = pstats.Stats(profile)
    inside = sum(
        v[3]
        for k, v in stats.stats.items()
        if k[2] == "_mixed_batch_forward" or (k[0].endswith("gathered_lora.py") and k[2] == "forward_hook")
    )
    return inside / stats.total_tt


def time_calls(fn, n: int, warmup: int = 3) -> list[float]:
    """Latencies in ms of ``n`` sequential calls, after ``warmup`` untimed ones."""
    return time_interleaved([fn], n, warmup)[0]


def time_interleaved(fns, n: int, warmup: int = 3) -> list[list[float]]:
    """Latencies in ms of ``n`` rounds of calling each of ``fns`` in turn (so drift hits all alike)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, times in zip(fns, out):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
    return out


# ----------------------------------------------------------------------------------------- serve
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_apps(model_dir: Path, adapters: dict[str, Path], port: int) -> dict[str, str]:
    """Two applications on one Serve with direct ingress on: ``latency`` (the default batching) and
    ``throughput`` (a longer batch wait). Returns their proxy URLs, and ``direct``: the latency replica's own."""
    import ray
    from ray import serve

    from serve.deploy import DIRECT_INGRESS_ENV, DRAINING_ENV, replica_urls

    os.environ[DIRECT_INGRESS_ENV] = "1"  # read by Serve's controller and replicas, which inherit it
    os.environ[DRAINING_ENV] = "0"  # no load balancer to drain from: shut down at once
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for name, batching in ((LATENCY_APP, {}), (THROUGHPUT_APP, {"batch_wait_timeout_s": THROUGHPUT_WAIT_S})):
        batching = {"max_batch_size": 8, **batching}
        urls[name] = run_app(name, model_dir, adapters, port, len(adapters), batching)
    urls["direct"] = replica_urls(LATENCY_APP)[0].removesuffix("/v1")
    return urls


def run_app(
    name: str, model_dir: Path, adapters: dict[str, Path], port: int, capacity: int, batching: dict
) -> str:
    """Deploy one application (one replica of 0.5 CPU) keeping ``capacity`` adapters loaded; its URL."""
    from ray import serve

    from serve.app import build_application
    from serve.config import validate_serving_args

    config = validate_serving_args(
        {
            "model": {"name_or_path": str(model_dir)},
            "adapters": {k: str(v) for k, v in adapters.items()},
            "max_adapters_per_replica": capacity,
            "batching": batching,
            "limits": {
                "max_ongoing_requests": max(16, 2 * batching["max_batch_size"]),
                "max_queued_requests": -1,
                "max_tokens": 256,
            },
            "resources": {"num_cpus": 0.5, "torch_threads": 1},
        }
    )
    serve.run(build_application(config), name=name, route_prefix=f"/{name}", blocking=False)
    return f"http://127.0.0.1:{port}/{name}"


def http_call(session, url: str, model: str, max_tokens: int) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    response = session.post(url + "/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    assert response.json()["usage"]["completion_tokens"] == max_tokens


def concurrent_run(
    url: str, models: list[str], clients: int, per_client: int, max_tokens: int, seed: int | None = None
) -> dict:
    """``clients`` threads, each sending ``per_client`` requests cycling through ``models`` (with a ``seed``:
    each request picks one of ``models`` at random instead, the same picks for the same seed)."""
    import requests

    latencies: list[float] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        session = requests.Session()
        picks = random.Random(seed * 1000 + offset) if seed is not None else None
        for i in range(per_client):
            model = picks.choice(models) if picks else models[(offset + i) % len(models)]
            start = time.perf_counter()
            http_call(session, url, model, max_tokens)
            with lock:
                latencies.append(1000 * (time.perf_counter() - start))

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if len(latencies) != clients * per_client:
        raise RuntimeError(
            f"only {len(latencies)} of {clients * per_client} requests succeeded (see the errors above)"
        )
    return {
        "latencies": latencies,
        "rps": len(latencies) / elapsed,
        "tps": len(latencies) * max_tokens / elapsed,
    }


def replica_stats(url: str) -> dict:
    import requests

    return requests.get(url + "/stats", timeout=10).json()  # the bench deploys without an API key


def batching_stats(url: str) -> dict:
    return replica_stats(url)["batching"]


# ---------------------------------------------------------------------------------- many adapters
def many_in_process(model_dir: Path, adapters: dict[str, Path], tokens: int, rounds: int, device: str):
    """A batch of N rows all on one adapter vs. on N distinct adapters, with N loaded; and what one more
    load costs with few and with N - 1 adapters loaded. Returns (rows, ratio mixed/one)."""
    names = list(adapters)
    n = len(names)
    many = InProcess(model_dir, adapters, device=device)
    one, mix = time_interleaved(
        [lambda: many.generate(names[:1] * n, tokens), lambda: many.generate(names, tokens)], rounds
    )
    rows = [
        row(f"in-process batch of {n}, {label}", lat, n * 1000 / statistics.mean(lat),
            n * 1000 * tokens / statistics.mean(lat))
        for label, lat in (("1 adapter", one), (f"{n} adapters", mix))
    ]  # fmt: skip
    swaps = many.swap_ms(8)  # after the timed batches, which it reorders the slots of
    reuses = many.pool.counters.slot_reuses
    loads_ = (("1-8 loaded", many.load_ms[:8]), (f"{n - 9}-{n - 2} loaded", many.load_ms[-8:]),
              (f"{n - 1} loaded, after an eviction ({reuses} into the evicted slot)", swaps))
    for label, loads in loads_:
        rows.append(
            [f"adapter load with {label} (x{len(loads)})", f"{statistics.median(loads):.1f}",
             f"{max(loads):.1f}", "-", "-", "in process"]
        )  # fmt: skip
    return rows, statistics.mean(one) / statistics.mean(mix)


def deploy_many(model_dir: Path, adapters: dict[str, Path], port: int, capacity: int) -> dict[str, str]:
    """Two more applications on the running Serve: ``many`` keeps every adapter loaded, ``churn`` only
    ``capacity`` of them; both batch up to MANY_CLIENTS requests."""
    batching = {"max_batch_size": MANY_CLIENTS, "batch_wait_timeout_s": THROUGHPUT_WAIT_S}
    return {
        MANY_APP: run_app(MANY_APP, model_dir, adapters, port, len(adapters), batching),
        CHURN_APP: run_app(CHURN_APP, model_dir, adapters, port, capacity, batching),
    }


def many_through_serve(urls: dict[str, str], names: list[str], capacity: int, tokens: int, per_client: int):
    """MANY_CLIENTS clients: all on one adapter, spread at random over the N adapters (all loaded), and the
    same spread on the replica that keeps ``capacity`` loaded. Returns (rows, notes, runs by label)."""
    import requests

    session = requests.Session()
    for name in names:  # warm: all N loaded in ``many``; ``churn`` has evicted all but its last ``capacity``
        for app in (MANY_APP, CHURN_APP):
            http_call(session, urls[app], name, 1)
    n = len(names)
    plan = {
        "1 adapter": (MANY_APP, names[:1]),
        f"{n} adapters mixed": (MANY_APP, names),
        f"{n} adapters mixed, LRU of {capacity}": (CHURN_APP, names),
    }
    keys = ("batches", "requests", "loads", "unloads", "slot_reuses", "load_s", "unload_s")
    runs = {label: {"latencies": [], "seconds": 0.0, **dict.fromkeys(keys, 0)} for label in plan}
    for round_ in range(ROUNDS):  # alternate, so load drift on a shared machine hits all alike
        for label, (app, models) in plan.items():
            before = replica_stats(urls[app])
            result = concurrent_run(urls[app], models, MANY_CLIENTS, per_client, tokens, seed=round_)
            after = replica_stats(urls[app])
            total = runs[label]
            total["latencies"] += result["latencies"]
            total["seconds"] += len(result["latencies"]) / result["rps"]
            for key in keys:
                group = "batching" if key in ("batches", "requests") else "adapter_pool"
                total[key] += after[group][key] - before[group][key]
    rows = []
    for label, total in runs.items():
        rps = len(total["latencies"]) / total["seconds"]
        note = f"mean batch {total['requests'] / max(total['batches'], 1):.1f}"
        if total["loads"]:
            reused = total["slot_reuses"]
            note += f"; {total['loads']} loads ({reused} into a slot), {total['unloads']} unloads"
        name = f"serve-http, {MANY_CLIENTS} clients, {label}"
        rows.append(row(name, total["latencies"], rps, rps * tokens, note))
    return rows, churn_notes(runs, plan, capacity), runs


def churn_notes(runs: dict[str, dict], plan: dict, capacity: int) -> list[str]:
    """What LRU churn costs: loads per request, milliseconds per load and unload, throughput vs. no churn."""
    labels = list(plan)
    mixed, churn = runs[labels[1]], runs[labels[2]]
    requests_, spread = len(churn["latencies"]), len(plan[labels[2]][1])
    per_load = 1000 * churn["load_s"] / max(churn["loads"], 1)
    per_unload = 1000 * churn["unload_s"] / max(churn["unloads"], 1)
    busy = churn["load_s"] + churn["unload_s"]
    p50s = [percentile(run["latencies"], 50) for run in (churn, mixed)]
    p99s = [percentile(run["latencies"], 99) for run in (churn, mixed)]
    return [
        f"LRU churn ({labels[2]}): {churn['loads']} adapter loads ({churn['slot_reuses']} of them copied "
        f"into an evicted adapter's slot) and {churn['unloads']} unloads for "
        f"{requests_} requests ({churn['loads'] / max(requests_, 1):.0%} of requests loaded their adapter; "
        f"with {capacity} of {spread} slots a uniform spread misses about {1 - capacity / spread:.0%}), "
        f"{per_load:.1f} ms per load and {per_unload:.1f} ms per unload in the replica (from its /stats "
        f"adapter_pool counters), {busy:.1f} s of model-locked changes in {churn['seconds']:.1f} s of run: "
        f"{mixed['seconds'] / churn['seconds']:.2f}x the throughput of the same spread with all adapters "
        f"loaded (p50 {p50s[0]:.0f} vs {p50s[1]:.0f} ms, p99 {p99s[0]:.0f} vs {p99s[1]:.0f} ms). A "
        "request whose adapter is not loaded waits for its load, and loads run one at a time between decode "
        "steps, so under churn requests reach the batcher a few at a time (the mean batch above).",
    ]


# ---------------------------------------------------------------------------------------- report
def row(
    name: str,
    latencies: list[float] | None,
    rps: float | None = None,
    tps: float | None = None,
    note: str = "",
):
    p50 = f"{percentile(latencies, 50):.1f}" if latencies else "-"
    p99 = f"{percentile(latencies, 99):.1f}" if latencies else "-"
    return [name, p50, p99, f"{rps:.1f}" if rps else "-", f"{tps:.0f}" if tps else "-", note]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny or HIDDENxLAYERS (a random Llama)")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per latency row")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--per-client", type=int, default=8, help="requests per client in the mixed runs")
    parser.add_argument("--no-serve", action="store_true", help="skip the Ray Serve rows")
    parser.add_argument(
        "--adapters", type=int, default=0, help="also measure this many distinct adapters (e.g. 64); 0: off"
    )
    parser.add_argument(
        "--capacity", type=int, default=16, help="adapters the churn replica keeps loaded (with --adapters)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the in-process model runs (cuda: bf16)",
    )
    args = parser.parse_args(argv)
    if args.device != "cpu" and not args.no_serve:
        parser.error("--device cuda measures the in-process rows only: add --no-serve")
    if args.adapters and not len(ADAPTERS) < args.adapters <= 1000:
        parser.error(f"--adapters must be above {len(ADAPTERS)} (the mixed runs' own count) and at most 1000")
    if args.adapters and not 1 <= args.capacity < args.adapters:
        parser.error(f"--capacity must be at least 1 and below --adapters ({args.adapters}) to cause churn")

    import torch

    from serve.synthetic import write_random_adapters

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = build_model(args.model, work)
    names = [f"a{i}" for i in range(max(args.adapters, len(ADAPTERS)))]  # ADAPTERS first
    seeds = {name: i for i, name in enumerate(names)}
    all_adapters = write_random_adapters(model_dir, work / "adapters", seeds)
    adapters = {name: all_adapters[name] for name in ADAPTERS}
    n, tokens = args.requests, args.tokens

    local = InProcess(model_dir, adapters, device=args.device)
    # peft's own mixed batch: the baseline
    looped = InProcess(model_dir, adapters, gathered=False, device=args.device)
    rows, notes = [], []
    batch_one, batch_mix, loop_one, loop_mix = time_interleaved(
        [
            lambda: local.generate(["a0"] * 8, tokens),
            lambda: local.generate(ADAPTERS, tokens),
            lambda: looped.generate(["a0"] * 8, tokens),
            lambda: looped.generate(ADAPTERS, tokens),
        ],
        max(5, n // 4),
    )
    for label, lat in (
        ("1 adapter", batch_one),
        ("8 adapters", batch_mix),
        ("1 adapter, peft loop", loop_one),
        ("8 adapters, peft loop", loop_mix),
    ):
        mean = statistics.mean(lat)
        rows.append(row(f"in-process batch of 8, {label}", lat, 8000 / mean, 8000 * tokens / mean))
    local_ratio = statistics.mean(batch_one) / statistics.mean(batch_mix)
    loop_ratio = statistics.mean(loop_one) / statistics.mean(loop_mix)
    shares = {
        label: lora_share(lambda m=models, p=pool: p.generate(m, tokens))
        for label, models, pool in (
            ("1", ["a0"] * 8, local),
            ("8", ADAPTERS, local),
            ("1 loop", ["a0"] * 8, looped),
            ("8 loop", ADAPTERS, looped),
        )
    }
    notes.append(
        "Share of in-process decode time adding LoRA deltas (cProfile): gathered (serve/gathered_lora.py, two bmm "
        f"per layer over the stacked adapters; deltas only) {shares['1']:.0%} with 1 adapter, {shares['8']:.0%} with 8; "
        f"peft's adapter_names loop (base matmul included) {shares['1 loop']:.0%} and {shares['8 loop']:.0%} (per "
        "layer and adapter present: an index, two small matmuls and an index-add). 8 mixed vs 1 with peft's "
        f"loop: {loop_ratio:.2f}x; 8 mixed gathered vs 8 mixed peft loop: "
        f"{statistics.mean(loop_mix) / statistics.mean(batch_mix):.2f}x the throughput.",
    )
    cold_local = statistics.median(local.load_ms)
    rows.append(
        [
            f"adapter load into the peft model (x{len(local.load_ms)})",
            f"{cold_local:.1f}",
            f"{max(local.load_ms):.1f}",
            "-",
            "-",
            "in process",
        ]
    )

    many_ratio = many_serve_ratio = None
    if args.adapters:
        many_rows, many_ratio = many_in_process(model_dir, all_adapters, tokens, max(5, n // 4), args.device)
        rows += many_rows

    serve_ratio = cold_http = None
    overheads: dict[str, float] = {}
    if args.no_serve:
        seq1, seqn = time_interleaved(
            [lambda: local.generate(["a0"], 1), lambda: local.generate(["a0"], tokens)], n
        )
        rows.append(row("in-process, 1 token", seq1, 1000 / statistics.mean(seq1)))
        rows.append(
            row(
                f"in-process, {tokens} tokens",
                seqn,
                1000 / statistics.mean(seqn),
                1000 * tokens / statistics.mean(seqn),
            )
        )
    else:
        import requests

        port = free_port()
        urls = deploy_apps(model_dir, adapters, port)
        session = requests.Session()
        lat_url, direct_url = urls[LATENCY_APP], urls["direct"]
        http_call(session, lat_url, "a0", 1)  # load a0 before timing
        paths = {"serve-http": lat_url, "serve-direct": direct_url}
        calls = [lambda: local.generate(["a0"], 1), lambda: local.generate(["a0"], tokens)]
        for url in paths.values():
            calls += [
                lambda u=url: http_call(session, u, "a0", 1),
                lambda u=url: http_call(session, u, "a0", tokens),
                lambda u=url: session.get(u + "/healthz", timeout=10).raise_for_status(),
            ]
        seq1, seqn, *timed = time_interleaved(calls, n)
        latency = {"in-process": (seq1, seqn, None)}
        latency.update({where: tuple(timed[3 * i : 3 * i + 3]) for i, where in enumerate(paths)})
        for where, (one, many, health) in latency.items():
            rows.append(row(f"{where}, 1 token", one, 1000 / statistics.mean(one)))
            rows.append(
                row(
                    f"{where}, {tokens} tokens",
                    many,
                    1000 / statistics.mean(many),
                    1000 * tokens / statistics.mean(many),
                )
            )
            if health is not None:
                rows.append(
                    row(f"{where}, GET /healthz (no model work)", health, 1000 / statistics.mean(health))
                )
        for where, label in (
            ("serve-http", "through Serve's proxy"),
            ("serve-direct", "straight to the replica"),
        ):
            one, many, health = latency[where]
            overheads[where] = percentile(many, 50) - percentile(seqn, 50)
            overhead_1 = percentile(one, 50) - percentile(seq1, 50)
            transport = percentile(health, 50)
            per_step = (overheads[where] - overhead_1) / max(tokens - 1, 1)
            notes.append(
                f"HTTP overhead {label} ({where}) at p50: {overhead_1:.1f} ms for a 1-token request, "
                f"{overheads[where]:.1f} ms for {tokens} tokens. Of the 1-token overhead, {transport:.1f} ms is the "
                f"HTTP round trip to the replica and back (GET /healthz), {overhead_1 - transport:.1f} ms the "
                f"request's own handling in the replica (parsing, tokenizing, the @serve.batch queue); each further "
                f"token adds {per_step:.2f} ms."
            )

        cold = []
        for name in ADAPTERS[1:]:  # first request to each adapter loads it
            start = time.perf_counter()
            http_call(session, lat_url, name, 1)
            cold.append(1000 * (time.perf_counter() - start) - percentile(latency["serve-http"][0], 50))
        cold_http = statistics.median(cold)
        rows.append(
            [
                f"first request to an adapter, extra (x{len(cold)})",
                f"{cold_http:.1f}",
                f"{max(cold):.1f}",
                "-",
                "-",
                "serve-http",
            ]
        )

        thr_url = urls[THROUGHPUT_APP]
        for name in ADAPTERS:  # warm: every adapter loaded before timing
            http_call(session, thr_url, name, 1)
        runs = {
            label: {"latencies": [], "seconds": 0.0, "batches": 0, "requests": 0}
            for label in ("1 adapter", "8 adapters mixed")
        }
        for _ in range(ROUNDS):  # alternate, so load drift on a shared machine hits both alike
            for label, models in (("1 adapter", ["a0"]), ("8 adapters mixed", ADAPTERS)):
                before = batching_stats(thr_url)
                result = concurrent_run(
                    thr_url, models, clients=8, per_client=args.per_client, max_tokens=tokens
                )
                after = batching_stats(thr_url)
                total = runs[label]
                total["latencies"] += result["latencies"]
                total["seconds"] += len(result["latencies"]) / result["rps"]
                total["batches"] += after["batches"] - before["batches"]
                total["requests"] += after["requests"] - before["requests"]
        for label, total in runs.items():
            rps = len(total["latencies"]) / total["seconds"]
            note = f"mean batch {total['requests'] / max(total['batches'], 1):.1f}"
            rows.append(row(f"serve-http, 8 clients, {label}", total["latencies"], rps, rps * tokens, note))
        serve_ratio = runs["1 adapter"]["seconds"] / runs["8 adapters mixed"]["seconds"]
        if args.adapters:
            many_urls = deploy_many(model_dir, all_adapters, port, args.capacity)
            many_rows, many_notes, many_runs = many_through_serve(
                many_urls, names, args.capacity, tokens, args.per_client
            )
            rows += many_rows
            notes += many_notes
            mixed_s = many_runs[f"{len(names)} adapters mixed"]["seconds"]
            many_serve_ratio = many_runs["1 adapter"]["seconds"] / mixed_s
        from ray import serve

        serve.shutdown()

    table = markdown_table(["run", "p50 ms", "p99 ms", "req/s", "tok/s", "note"], rows)
    verdicts = []
    for where, label in (("serve-http", "through the proxy"), ("serve-direct", "direct ingress")):
        if where in overheads:
            verdicts.append(
                goal(
                    f"Serve HTTP overhead at p50, {label}",
                    f"{overheads[where]:.1f} ms",
                    f"<= {OVERHEAD_GOAL_MS:.0f} ms",
                    overheads[where] <= OVERHEAD_GOAL_MS,
                )
            )
    verdicts.append(
        goal(
            "8 mixed adapters vs 1, in process (batch of 8)",
            f"{local_ratio:.2f}x",
            f">= {MIXED_GOAL}x",
            local_ratio >= MIXED_GOAL,
        )
    )
    if serve_ratio is not None:
        verdicts.append(
            goal(
                "8 mixed adapters vs 1, through Serve",
                f"{serve_ratio:.2f}x",
                f">= {MIXED_GOAL}x",
                serve_ratio >= MIXED_GOAL,
            )
        )
    verdicts.append(
        goal(
            "adapter cold load (in process, p50)",
            f"{cold_local:.1f} ms",
            f"<= {COLD_GOAL_MS:.0f} ms",
            cold_local <= COLD_GOAL_MS,
        )
    )
    if cold_http is not None:
        verdicts.append(
            goal(
                "adapter cold load (first HTTP request, extra, p50)",
                f"{cold_http:.1f} ms",
                f"<= {COLD_GOAL_MS:.0f} ms",
                cold_http <= COLD_GOAL_MS,
            )
        )
    for where, ratio in (
        (f"in process (batch of {args.adapters})", many_ratio),
        (f"through Serve ({MANY_CLIENTS} clients)", many_serve_ratio),
    ):
        if ratio is not None:
            name = f"{args.adapters} mixed adapters vs 1, {where}"
            verdicts.append(goal(name, f"{ratio:.2f}x", f">= {MANY_GOAL}x", ratio >= MANY_GOAL))
    import peft

    try:
        import ray

        ray_version = f"ray {ray.__version__}, "
    except ImportError:  # the in-process rows need no Ray
        ray_version = ""
    on = "model on 1 torch thread"
    if args.device == "cuda":
        on = f"model on {torch.cuda.get_device_name(0)} (bf16)"
    header = (
        f"## serve (bench/serve.py --model {args.model} --requests {n} --tokens {tokens}"
        + ("" if args.device == "cpu" else f" --device {args.device}")
        + (f" --adapters {args.adapters} --capacity {args.capacity}" if args.adapters else "")
        + ")\n\n"
        f"{machine_line()}; {ray_version}torch {torch.__version__}, peft {peft.__version__}; "
        f"{on}, replica 0.5 CPU.\n"
    )
    report = "\n".join([header, table, "", *notes, "", "```", *verdicts, "```"])
    print(report)
    if args.out:
        args.out.write_text(report + "\n", encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    if not args.no_record:
        many = f" --adapters {args.adapters}" if args.adapters else ""
        record_section(f"bench/serve.py --model {args.model}{many}", report)
        print(f"\nrecorded in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
