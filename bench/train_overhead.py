"""Training overhead: ftune (Ray Train V2 + DeepSpeed ZeRO-2 + peft) against a plain PEFT loop on CPU.

For each model size, three runs on the same tokenized data, BatchPlan order, global batch, AdamW,
LR schedule, gradient clipping, fp32 and one torch thread per process:

  a. plain   one Python process: peft model, torch AdamW, clip_grad_norm_, no Ray, no DeepSpeed
  b. ftune-1 ``train.job.run_training`` with scaling.num_workers=1
  c. ftune-2 the same with 2 workers (each does half of every global batch)

Each run is a fresh Python process, so start-up counts imports, ``ray.init`` and the workers' own
start. Evaluation and checkpointing happen only after the last step, so the steps in between are
the steady state the goals are about; the plain loop evaluates before and after exactly as ftune does.

    python bench/train_overhead.py                            # tiny model and 256x4, 150 steps
    python bench/train_overhead.py --model 256x4 --steps 200  # one size (HIDDENxLAYERS or tiny)
    python bench/train_overhead.py --profile                  # + where a step's time goes (py-spy)
    python bench/train_overhead.py --model 1024x9 --steps 25 --repeats 5 --workers 1   # 106M, plain vs ftune-1

Goals: steady step time of ftune-1 <= 1.10x plain (<= 1.05x from 100M parameters, counted from the
safetensors); start-up (before ``run_training`` -> first step finished) <= 20 s; final train and eval
losses within 2 % of plain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import REPO, RESULTS, goal, machine_line, markdown_table, record_section  # noqa: E402

TINY_CONFIG = REPO / "configs" / "train" / "tiny.yaml"
STEP_TIME_GOAL = 1.10
LARGE_MODEL_PARAMS, LARGE_STEP_TIME_GOAL = 100e6, 1.05
"""From this many parameters the step ratio's goal is tighter: a larger step leaves less room to hide in."""
STARTUP_GOAL_S = 20.0
LOSS_GOAL = 0.02
FINAL_LOSS_STEPS = 10


# --------------------------------------------------------------------------------------------- setup
def snapshot_builtins(out_dir: Path) -> tuple[Path, Path]:
    """Private copies of the built-in tiny model and sample data, so every run uses the same files.

    A rebuild of the shared ``builtin:`` cache (a new tiny-model format) then cannot happen inside a
    timed run, nor change the model between the runs being compared.
    """
    from ftune.builtin_assets import ensure_sample_dataset, ensure_tiny_model

    model, data = out_dir / "tiny-llama", out_dir / "sample-instructions.jsonl"
    if not model.exists():
        shutil.copytree(ensure_tiny_model(), model)
    if not data.exists():
        shutil.copy(ensure_sample_dataset(), data)
    return model, data


def build_llama(spec: str, out_dir: Path, tokenizer_dir: Path) -> Path:
    """A random Llama of shape ``HIDDENxLAYERS`` (e.g. 256x4) with the tiny model's tokenizer (HF format)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hidden, layers = (int(x) for x in spec.lower().split("x"))
    path = out_dir / f"llama-{hidden}x{layers}"
    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=16 * round(hidden * 8 / 3 / 16),  # Llama's SwiGLU ratio
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        rope_theta=500000.0,
        initializer_range=hidden**-0.5,  # as the tiny model: frozen 0.02 weights leave LoRA little to learn
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def job_config(
    model: Path, data: Path, steps: int, workers: int, storage: Path, wandb: str, extra: list[str] = ()
):
    """tiny.yaml with this benchmark's model, steps and workers; evaluation/checkpoint only at the end."""
    from ftune.config import TrainJobConfig
    from ftune.yaml_config import load_config

    return load_config(
        TrainJobConfig,
        TINY_CONFIG,
        [
            f"model.name_or_path={model}",
            f"data.path={data}",
            f"train.max_steps={steps}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            "train.exact_match_examples=0",
            "failure.max_failures=0",  # a failed run should stop the benchmark, not resume from a checkpoint
            f"scaling.num_workers={workers}",
            "scaling.cpus_per_worker=1",
            "scaling.torch_threads=1",
            f"storage.path={storage}",
            f"tracking.wandb={wandb}",
            *extra,
        ],
    )


# ------------------------------------------------------------------------------- child: plain loop
def run_plain(cfg) -> dict[str, Any]:
    """The baseline: a single-process peft loop doing what one ftune worker does, minus the framework."""
    import torch

    from ftune.adapters import add_adapter
    from ftune.data import Collator, pad_token_id, prepare_data
    from ftune.model import load_base_model, load_tokenizer
    from train.batching import BatchPlan
    from train.evaluation import evaluate_loss
    from train.schedule import lr_multiplier, warmup_steps

    t_setup = time.time()
    torch.set_num_threads(1)
    t = cfg.train
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer)
    plan = BatchPlan(len(data.train), t.global_batch_size, t.micro_batch_size, t.seed)
    collate = Collator(pad_id=pad_token_id(tokenizer))
    torch.manual_seed(t.seed)  # the seed build_engine uses before the adapter is initialised
    model = add_adapter(load_base_model(cfg.model, dtype=torch.float32), cfg.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(t.lr_schedule, t.max_steps, warmup_steps(t.max_steps, t.warmup_ratio))
    )
    val = data.validation
    val_batches = [collate(val[i : i + t.micro_batch_size]) for i in range(0, len(val), t.micro_batch_size)]
    val_batches = val_batches[: t.eval_batches] if t.eval_batches else val_batches
    device = torch.device("cpu")
    eval_before = evaluate_loss(model, val_batches, device)["eval_loss"]
    torch.manual_seed(t.seed)  # ftune reseeds rank 0 with seed + 1000 * rank
    model.train()
    rows = []
    for step in range(t.max_steps):
        t0 = time.perf_counter()
        micro_batches = plan.micro_batches(step, 0, 1)
        loss_sum, tokens = 0.0, 0
        for micro in micro_batches:
            batch = collate([data.train[i] for i in micro])
            loss = model(**batch).loss
            (loss / len(micro_batches)).backward()  # what engine.backward does with gradient accumulation
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_time = time.perf_counter() - t0
        rows.append(
            {
                "step": step + 1,
                "loss": loss_sum / len(micro_batches),
                "step_time_s": step_time,
                "tokens": tokens,
                "time": time.time(),
            }
        )
    eval_after = evaluate_loss(model, val_batches, device)["eval_loss"]
    return {"t_setup": t_setup, "rows": rows, "eval_loss_before": eval_before, "eval_loss_after": eval_after}


# ------------------------------------------------------------------------------------ child: ftune
class ProfilePhases:
    """A ``train.phases.PhaseTimer`` that times each part of a worker's run and samples it with py-spy.

    Given to ``run_training`` by ``--profile`` (pickled by value to the workers). Each rank writes
    ``worker<rank>.timers.json`` (calls, seconds and first-call time stamps per phase and per library
    call, and when the worker process started) and ``worker<rank>.pyspy.txt`` (collapsed stacks).
    """

    def __init__(self, profile_dir: str):
        self.profile_dir = profile_dir
        self.totals: dict[str, dict[str, float]] = {}
        self.spy: subprocess.Popen | None = None
        self.entered = 0.0

    @contextlib.contextmanager
    def phase(self, name: str, **fields: Any):
        if name == "worker":
            self._start_worker()
            try:
                yield
            finally:
                self._end_worker()
            return
        t0 = time.perf_counter()
        entry = self._entry(name)
        try:
            yield
        finally:
            self._count(entry, t0)

    def _entry(self, label: str) -> dict[str, float]:
        entry = self.totals.setdefault(label, {"calls": 0, "seconds": 0.0})
        if not entry["calls"]:
            entry["first_start"] = time.time()
        return entry

    @staticmethod
    def _count(entry: dict[str, float], t0: float) -> None:
        entry["calls"] += 1
        entry["seconds"] += time.perf_counter() - t0
        entry.setdefault("first_end", time.time())

    def _timed(self, owner, attr: str, label: str) -> None:
        """Library calls have no phase of their own: wrap them in this worker process."""
        inner = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            t0, entry = time.perf_counter(), self._entry(label)
            try:
                return inner(*args, **kwargs)
            finally:
                self._count(entry, t0)

        setattr(owner, attr, wrapper)

    def _start_worker(self) -> None:
        self.entered = time.time()
        import deepspeed.runtime.engine
        import ray.train
        import torch.distributed

        engine = deepspeed.runtime.engine.DeepSpeedEngine
        for attr in ("forward", "backward", "step"):
            self._timed(engine, attr, f"engine.{attr}")
        for collective in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "barrier"):
            self._timed(torch.distributed, collective, f"torch.distributed.{collective}")
        self._timed(ray.train, "report", "ray.train.report")
        self._timed(ray.train, "get_preemption_info", "ray.train.get_preemption_info")
        self.rank = ray.train.get_context().get_world_rank()
        if shutil.which("py-spy"):
            # The train function runs in a thread that blocks SIGINT, and py-spy would inherit the mask.
            mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            try:
                self.spy = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "250",
                     "--nonblocking", "-o", f"{self.profile_dir}/worker{self.rank}.pyspy.txt"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _end_worker(self) -> None:
        import psutil

        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
            try:
                self.spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
        timeline = {"process_started": psutil.Process().create_time(), "loop_entered": self.entered}
        Path(self.profile_dir, f"worker{self.rank}.timers.json").write_text(
            json.dumps({"timeline": timeline, "timers": self.totals}, indent=1)
        )


def _time_stamped(fn, label: str, marks: dict[str, float]):
    """``fn`` recording when it started and returned into ``marks`` (driver-side start-up breakdown)."""

    def wrapper(*args, **kwargs):
        marks[f"{label}_start"] = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            marks[f"{label}_end"] = time.time()

    return wrapper


def run_ftune(cfg, name: str, profile: bool) -> dict[str, Any]:
    """``run_training`` in a fresh local Ray; returns the summary and rank 0's metrics.jsonl rows."""
    import ray

    import train.job

    phase_timer = ProfilePhases(os.environ["FTUNE_BENCH_PROFILE_DIR"]) if profile else None
    marks: dict[str, float] = {}
    for step in ("prepare", "build_trainer"):  # run_training looks both up at call time
        setattr(train.job, step, _time_stamped(getattr(train.job, step), step, marks))
    os.environ.pop("RAY_ADDRESS", None)  # never join another engineer's cluster
    t_setup = time.time()
    ray.init(
        address="local",
        num_cpus=cfg.scaling.max_workers + 2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
    )
    t_ray = time.time()
    try:
        summary = train.job.run_training(cfg, name=name, phase_timer=phase_timer)
    finally:
        ray.shutdown()
    lines = (Path(cfg.storage.path).expanduser() / name / "metrics.jsonl").read_text().splitlines()
    rows, eval_row_time = [], None
    for row in map(json.loads, lines):
        if row["step"] == 0:
            eval_row_time = row["time"]
        elif "loss" in row:
            row["tokens"] = round(row["tokens_per_s"] * row["step_time_s"])
            rows.append(row)
    return {
        "t_setup": t_setup,
        "t_ray_ready": t_ray,
        "t_eval_before_done": eval_row_time,
        **{f"t_{k}": v for k, v in marks.items()},
        "rows": rows,
        "eval_loss_before": summary["eval_loss_before"],
        "eval_loss_after": summary["eval_loss_after"],
    }


def child_main(args: argparse.Namespace) -> None:
    from ftune.config import TrainJobConfig

    cfg = TrainJobConfig.model_validate(json.loads(Path(args.child_job).read_text()))
    if args.child == "plain":
        result = run_plain(cfg)
    else:
        result = run_ftune(
            cfg, name=Path(args.child_result).stem, profile=bool(os.environ.get("FTUNE_BENCH_PROFILE_DIR"))
        )
    result["t_spawn"] = args.spawned_at
    Path(args.child_result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------- parent: stats
def steady_stats(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Start-up, steady step time (median step_time_s; mean wall per step from time stamps), tokens/s, losses.

    The steady window is steps warmup+1 .. last-1: the last step's row is written after the final evaluation.
    """
    rows = sorted(result["rows"], key=lambda r: r["step"])
    last = rows[-1]["step"]
    stamp = {r["step"]: r["time"] for r in rows}
    window = [r for r in rows if warmup < r["step"] < last]
    if not window:
        raise SystemExit(f"--steps must exceed --warmup + 1 (got {last} steps, warm-up {warmup})")
    gaps = [stamp[r["step"]] - stamp[r["step"] - 1] for r in window]
    return {
        "startup_s": stamp[1] - result["t_setup"],
        "startup_from_spawn_s": stamp[1] - result["t_spawn"],
        "ray_init_s": result["t_ray_ready"] - result["t_setup"] if "t_ray_ready" in result else 0.0,
        "step_s": statistics.median(r["step_time_s"] for r in window),
        "wall_step_s": statistics.fmean(gaps),
        "tokens_per_s": sum(r["tokens"] for r in window) / sum(gaps),
        "final_loss": statistics.fmean(r["loss"] for r in rows[-FINAL_LOSS_STEPS:]),
        "eval_loss_before": result["eval_loss_before"],
        "eval_loss_after": result["eval_loss_after"],
        "load_avg": result["load_avg"],
    }


def best_of(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Each time at its lowest over the repeats (the run least disturbed by other load, as timeit does)."""
    best = dict(repeats[0])
    for key in ("startup_s", "startup_from_spawn_s", "step_s", "wall_step_s"):
        best[key] = min(r[key] for r in repeats)
    best["ray_init_s"] = min(repeats, key=lambda r: r["startup_s"])["ray_init_s"]
    best["tokens_per_s"] = max(r["tokens_per_s"] for r in repeats)
    best["step_s_each"] = [r["step_s"] for r in repeats]
    best["load_avg"] = [r["load_avg"] for r in repeats]
    return best


def run_child(kind: str, cfg, name: str, work: Path, profile_dir: Path | None) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its output goes to ``work/<name>.log``."""
    job = work / f"{name}.job.json"
    job.write_text(cfg.model_dump_json())
    result, log = work / f"{name}.json", work / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FTUNE_BENCH_PROFILE_DIR", None)
    cmd = [sys.executable, __file__, "--child", kind, "--child-job", str(job), "--child-result", str(result)]
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        env["FTUNE_BENCH_PROFILE_DIR"] = str(profile_dir)
        if kind == "plain" and shutil.which("py-spy"):
            spy = [
                "py-spy",
                "record",
                "--format",
                "raw",
                "--rate",
                "250",
                "--nonblocking",
                "-o",
                str(profile_dir / "plain.pyspy.txt"),
            ]
            cmd = [*spy, "--", *cmd]
    load = os.getloadavg()[0]
    print(f"  {name} (load {load:.1f}) ...", end="", flush=True)
    with log.open("w") as out:
        spawned = time.time()
        proc = subprocess.run(
            [*cmd, "--spawned-at", repr(spawned)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            check=False,
            # Its own session, hence its own scheduler autogroup, as Ray gives its workers: otherwise
            # on a busy machine the plain loop and the Ray workers get different CPU shares.
            start_new_session=True,
        )
    print(f" {time.time() - spawned:.0f} s", flush=True)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"{name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return {**json.loads(result.read_text()), "load_avg": load}


def warm_imports() -> None:
    """Import the heavy packages once, so the first measured process does not pay a cold disk cache."""
    subprocess.run(
        [sys.executable, "-c", "import torch, transformers, peft, deepspeed, ray.train, train.job"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )


def parameter_count(model: Path) -> int:
    """Parameters in a model directory's safetensors files (from their headers; nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in model.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def report(results: dict[str, dict[str, dict[str, Any]]], params: dict[str, int]) -> tuple[str, list[str]]:
    """The markdown table (ratios against the plain loop of the same model) and the goal verdicts."""
    headers = [
        "model",
        "run",
        "load",
        "start-up s",
        "of it ray.init s",
        "step ms (median)",
        "x plain",
        "wall/step ms (mean)",
        "x plain",
        "tokens/s",
        "x plain",
        "final loss",
        "eval loss after",
    ]
    rows, goals = [], []
    for model, runs in results.items():
        base = runs["plain"]
        for label, s in runs.items():
            rows.append(
                [
                    model,
                    label,
                    "/".join(f"{x:.1f}" for x in s["load_avg"]),
                    f"{s['startup_s']:.1f}",
                    f"{s['ray_init_s']:.1f}" if s["ray_init_s"] else "-",
                    f"{s['step_s'] * 1e3:.1f}",
                    f"{s['step_s'] / base['step_s']:.2f}x",
                    f"{s['wall_step_s'] * 1e3:.1f}",
                    f"{s['wall_step_s'] / base['wall_step_s']:.2f}x",
                    f"{s['tokens_per_s']:,.0f}",
                    f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x",
                    f"{s['final_loss']:.4f}",
                    f"{s['eval_loss_after']:.4f}",
                ]
            )
        one = runs["ftune-1"]
        limit = LARGE_STEP_TIME_GOAL if params[model] >= LARGE_MODEL_PARAMS else STEP_TIME_GOAL
        for key, what in (
            ("step_s", "step time (median step_time_s)"),
            ("wall_step_s", "wall per step (time stamps)"),
        ):
            r = one[key] / base[key]
            goals.append(
                goal(
                    f"{model} ({params[model] / 1e6:.0f}M params): ftune-1 / plain {what}",
                    f"{r:.2f}x",
                    f"<= {limit:.2f}x",
                    r <= limit,
                )
            )
        for label, s in runs.items():
            if label == "plain":
                continue
            ok = s["startup_s"] <= STARTUP_GOAL_S
            goals.append(
                goal(
                    f"{model}: {label} start-up to first step",
                    f"{s['startup_s']:.1f} s",
                    f"<= {STARTUP_GOAL_S:.0f} s",
                    ok,
                )
            )
            for key, what in (("final_loss", "final train loss"), ("eval_loss_after", "eval loss after")):
                d = abs(s[key] / base[key] - 1)
                goals.append(
                    goal(
                        f"{model}: {label} {what} vs plain",
                        f"{d:.2%} off",
                        f"<= {LOSS_GOAL:.0%}",
                        d <= LOSS_GOAL,
                    )
                )
    return markdown_table(headers, rows), goals


def startup_breakdown(name: str, r: dict[str, Any], profile_dir: Path | None) -> str:
    """Where one ftune run's seconds before the first step went (time stamps from the driver and rank 0)."""
    first = min(row["time"] for row in r["rows"] if row["step"] == 1)
    marks = [
        ("ray.init", r["t_setup"], r["t_ray_ready"]),
        ("prepare (driver: DeepSpeed config, model config, data)", r["t_prepare_start"], r["t_prepare_end"]),
        ("build_trainer (ray.put data)", r["t_build_trainer_start"], r["t_build_trainer_end"]),
    ]
    timers = profile_dir / "worker0.timers.json" if profile_dir else None
    if timers and timers.exists():
        w = json.loads(timers.read_text())
        line, t = w["timeline"], w["timers"]
        marks += [
            ("fit -> rank-0 worker process started", r["t_build_trainer_end"], line["process_started"]),
            (
                "worker process -> loop entered (actor + process group set up, train.loop imported)",
                line["process_started"],
                line["loop_entered"],
            ),
            (
                "loop entered -> build_engine (ray.get data, load_tokenizer)",
                line["loop_entered"],
                t["build_engine"]["first_start"],
            ),
            (
                "build_engine (model, peft, deepspeed import + initialize)",
                t["build_engine"]["first_start"],
                t["build_engine"]["first_end"],
            ),
            (
                "evaluation before training",
                t["evaluate_loss"]["first_start"],
                t["evaluate_loss"]["first_end"],
            ),
            ("first step", t["evaluate_loss"]["first_end"], first),
        ]
    else:
        marks += [
            (
                "fit -> evaluation before training done (workers start, import, build engine, evaluate)",
                r["t_build_trainer_end"],
                r["t_eval_before_done"],
            ),
            ("first step", r["t_eval_before_done"], first),
        ]
    parts = [f"{label} {end - start:.1f} s" for label, start, end in marks]
    return f"{name}: {first - r['t_setup']:.1f} s = " + " | ".join(parts)


# Which part of a step a source line of the step loop is, by the text of the line (first match wins).
STEP_PARTS = (
    ("collate(", "collate"),
    ("engine(**batch)", "forward"),
    ("model(**batch)", "forward"),
    ("engine.backward", "backward"),
    (".backward()", "backward"),
    ("engine.step", "engine.step (ZeRO: grad norm + clip, AdamW, copy back)"),
    ("clip_grad_norm_", "optimizer: clip_grad_norm_"),
    ("optimizer.step", "optimizer: AdamW step"),
    ("scheduler.step", "optimizer: LR schedule"),
    ("zero_grad", "optimizer: zero_grad"),
    ("dist.all_reduce", "per-step all_reduce (loss, tokens, clock)"),
    ("get_preemption_info", "ray.train.get_preemption_info"),
    ("preemption_notice(", "ray.train.get_preemption_info"),
    ("ray.train.report", "ray.train.report"),
    ("send_report(", "ray.train.report"),
    ("recorder.log", "RunRecorder.log (metrics.jsonl)"),
    ("float(loss.detach())", "loss.item()"),
)


def _step_loop_lines(fn, first: str, last: str) -> tuple[str, dict[int, str], range]:
    """(``fn``'s file, {line: source}, the lines of its step loop from ``first`` up to ``last``)."""
    import inspect

    lines, start = inspect.getsourcelines(fn)
    src = {start + i: text.strip() for i, text in enumerate(lines)}
    begin = next(n for n, t in src.items() if t.startswith(first))
    end = next(n for n, t in src.items() if n > begin and t.startswith(last))
    return str(Path(inspect.getsourcefile(fn)).resolve()), src, range(begin, end)


def step_profile(spy_file: Path, regions: list[tuple[Any, str, str]]) -> dict[str, float]:
    """Share of a step loop's py-spy samples per part of the step (STEP_PARTS), from collapsed stacks.

    ``regions`` are (function, first line, last line) of the step loop's code: a sample counts at
    the deepest frame inside one of them. py-spy names frames ``function (path:line)`` with the path
    relative to its sys.path entry.
    """
    found = []
    for fn, first, last in regions:
        file, src, loop_lines = _step_loop_lines(fn, first, last)
        found.append((f"{fn.__name__} (", file, src, loop_lines))
    counts: dict[str, int] = {}
    for raw_line in spy_file.read_text().splitlines():
        stack, _, n = raw_line.rpartition(" ")
        frames = stack.split(";")
        hits = [
            (i, region)
            for i, f in enumerate(frames)
            for region in found
            if f.startswith(region[0]) and region[1].endswith(f[len(region[0]) :].rpartition(":")[0])
        ]
        if not hits:
            continue
        at, (_, _, src, loop_lines) = hits[-1]
        line = int(frames[at].rpartition(":")[2].rstrip(")"))
        if line not in loop_lines:
            continue
        text, inner = src.get(line, ""), ";".join(frames[at + 1 :])
        if "report_with_checkpoint" in inner or "evaluate()" in text:
            continue  # the final evaluation and checkpoint are not part of the steady state
        part = next(
            (label for key, label in STEP_PARTS if key in text), "other loop code (metrics, clocks, plan)"
        )
        if part == "backward" and "deepspeed/runtime/zero" in inner:
            part = "backward: ZeRO gradient reduction (hooks, bucket copy, all-reduce)"
        counts[part] = counts.get(part, 0) + int(n)
    total = sum(counts.values()) or 1
    return {part: c / total for part, c in sorted(counts.items(), key=lambda kv: -kv[1])}


def summarize_profiles(folders: dict[str, dict[str, tuple[Path, float]]]) -> str:
    """Per model: ms per steady step in each part, plain loop against rank 0 of each ftune run.

    ``folders[model][run]`` is (profile folder, that run's mean wall per step in seconds).
    """
    import train.loop

    out = []
    for spec, runs in folders.items():
        shares: dict[str, dict[str, float]] = {}
        for label, (folder, wall_step_s) in runs.items():
            if label == "plain" and (folder / "plain.pyspy.txt").exists():
                share = step_profile(
                    folder / "plain.pyspy.txt", [(run_plain, "for step in range", "eval_after =")]
                )
            elif (folder / "worker0.pyspy.txt").exists():
                share = step_profile(
                    folder / "worker0.pyspy.txt",
                    [
                        (train.loop.train, "while state.step", "return outcome"),
                        (train.loop.train_step, "t0 = time.perf_counter()", "return metrics"),
                    ],
                )
            else:
                continue
            shares[label] = {part: f * wall_step_s * 1e3 for part, f in share.items()}
        parts = list(dict.fromkeys(p for s in shares.values() for p in s))
        rows = [[part, *(f"{shares[label].get(part, 0.0):.1f}" for label in shares)] for part in parts]
        rows.append(
            ["total (mean wall per step)", *(f"{sum(shares[label].values()):.1f}" for label in shares)]
        )
        out.append(
            f"{spec}: ms per steady step by part "
            "(share of py-spy samples x mean wall per step; rank 0 for ftune)\n"
            + markdown_table(["part", *shares], rows)
        )
    return "\n\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", help="tiny or HIDDENxLAYERS (repeatable; default: tiny and 256x4)"
    )
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    parser.add_argument(
        "--workers", type=int, action="append", help="ftune runs' worker counts (repeatable; default 1 and 2; 1 always)"
    )
    parser.add_argument(
        "--warmup", type=int, default=5, help="first steps left out of the steady state (default 5)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="interleaved repeats; each time is the best of them (default 1)",
    )
    parser.add_argument(
        "--wandb", default="disabled", choices=["disabled", "offline"], help="ftune's tracking.wandb"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run, e.g. deepspeed.overlap_comm=false",
    )
    parser.add_argument(
        "--profile", action="store_true", help="time each part of a worker step and sample it with py-spy"
    )
    parser.add_argument(
        "--out", type=Path, help="keep logs, metrics and results here (default: a temp dir, deleted)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--child", choices=["plain", "ftune"], help=argparse.SUPPRESS)
    parser.add_argument("--child-job", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    models = args.model or ["tiny", "256x4"]
    work = Path(args.out or tempfile.mkdtemp(prefix="ftune-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_line()
    print(f"machine: {machine}")
    print(f"command: python bench/train_overhead.py {' '.join(argv)}")
    print(
        f"{args.steps} steps (warm-up {args.warmup} and the last step left out), "
        f"{args.repeats} repeat(s), work dir {work}"
    )
    tiny, data = snapshot_builtins(work / "models")  # built before anything is timed
    warm_imports()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    params: dict[str, int] = {}
    kinds = [("plain", 1), *(("ftune", w) for w in sorted({1, *(args.workers or [1, 2])}))]
    breakdowns, profiles = [], {}
    try:
        for spec in models:
            model = tiny if spec == "tiny" else build_llama(spec, work / "models", tiny)
            params[spec] = parameter_count(model)
            runs: dict[str, list[tuple[str, dict[str, Any], dict[str, Any]]]] = {}
            for rep in range(args.repeats):
                for kind, workers in kinds:
                    label = "plain" if kind == "plain" else f"ftune-{workers}"
                    name = f"{spec}-{label}-r{rep}"
                    cfg = job_config(model, data, args.steps, workers, work / "runs", args.wandb, args.set)
                    # A run name that exists would resume.
                    shutil.rmtree(work / "runs" / name, ignore_errors=True)
                    profile_dir = work / "profile" / name if args.profile else None
                    raw = run_child(kind, cfg, name, work, profile_dir)
                    runs.setdefault(label, []).append((name, raw, steady_stats(raw, args.warmup)))
            results[spec] = {label: best_of([stats for _, _, stats in reps]) for label, reps in runs.items()}
            for label, reps in runs.items():
                name, raw, _ = min(reps, key=lambda rep: rep[2]["startup_s"])
                if label != "plain":
                    breakdowns.append(
                        startup_breakdown(name, raw, work / "profile" / name if args.profile else None)
                    )
                if args.profile:
                    profiles.setdefault(spec, {})[label] = (
                        work / "profile" / reps[0][0],
                        reps[0][2]["wall_step_s"],
                    )
        table, goals = report(results, params)
        load_end = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        out = [
            f"{machine} (at the start; at the end {load_end}; 1-min load avg before each run in the table)",
            "",
            f"`python bench/train_overhead.py {' '.join(argv)}`: {args.steps} steps, steady state = steps "
            f"{args.warmup + 1}..{args.steps - 1}; best of {args.repeats} interleaved repeat(s); "
            "1 torch thread per process, fp32, global batch 16 (micro 8).",
            "",
            table,
            "",
            "Start-up breakdown (fastest repeat):",
            "",
            *(f"- {line}" for line in breakdowns),
        ]
        if args.repeats > 1:
            out += ["", "Median step ms of each repeat:", ""]
            for spec, runs_ in results.items():
                each = "; ".join(
                    f"{label} " + "/".join(f"{x * 1e3:.0f}" for x in s["step_s_each"])
                    for label, s in runs_.items()
                )
                out.append(f"- {spec}: {each}")
        out += ["", "```", *goals, "```"]
        if args.profile:
            out += ["", summarize_profiles(profiles)]
        text = "\n".join(out)
        print("\n" + text)
        (work / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
        if not args.no_record:
            key = "bench/train_overhead.py" + (" --profile" if args.profile else "")
            title = "## Training overhead" + (
                ": where a step's time goes (py-spy; perturbs timings)" if args.profile else ""
            )
            record_section(key, f"{title}\n\n{text}")
            print(f"\nrecorded in {RESULTS}")
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(g.startswith("PASS") for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
