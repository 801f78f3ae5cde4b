"""Start-up: a training job's seconds from launch to its first optimizer step, in the ways a job starts.

Three kinds of start, each a fresh process, interleaved over the repeats (plain, own-ray, cluster, plain, ...):

  plain     the floor, measured in the same run: one Python process with no Ray and no DeepSpeed that
            imports the same stack, tokenizes the same data, loads the same model, adds the same LoRA
            adapter and takes one AdamW step (bench/train_overhead.py's plain loop, one step)
  own-ray   ``python -m train --config configs/train/tiny.yaml`` starting its own local Ray (the README's path)
  cluster   the same command with RAY_ADDRESS set to a running local cluster (a head and two 1-CPU worker
            nodes with token auth, cluster/local.py): what ``ray job submit`` runs on the head, minus the
            job API's own hop
  ray-own / ray-cluster
            Ray's own floor for each of the two: a process that starts (or joins) Ray and fits a bare
            TorchTrainer with the same workers, CPUs, gloo backend and Ray Train settings (the controller's
            poll interval), whose workers import torch and report one step; what is left of ftune's time
            above it is ftune's own

Milestones come from the job's own output lines, time-stamped as they arrive: data prepared, Ray up
(own-ray), engines built (rank 0's "[ftune] N worker(s)" line) and the first step (from metrics.jsonl).
A sweep of ``--sweep-trials`` trials of ``--sweep-steps`` steps, one at a time (``python -m tune``, its own
local Ray), gives the trial turnaround (a trial's last metrics row -> the next trial's first step) and the
share of each trial's time spent before its first step; it runs twice, with trial processes reused (the
default, ``search.reuse_trial_processes``) and with a fresh process per trial (the baseline), then Ray's
own floor for it in the same run: a Tune sweep (its own local Ray, trial actors reused) of the same number of
trials, each fitting a bare one-worker TorchTrainer with ftune's Ray Train settings, whose worker imports torch
and "trains" (sleeps) as long as ftune's reused trials trained. ``--demo`` also times one ``ftune demo`` with its
defaults, warm (the built-in model, data and DeepSpeed's CPU op already built, as on a second run). A last
table times, in fresh processes, the imports a Train worker does, with and without bitsandbytes
(``ftune.lean_imports``: a worker that loads no 4-bit model skips it).

    python bench/startup.py                 # 3 repeats, 2 workers, recorded in bench/RESULTS.md
    python bench/startup.py --repeats 1 --no-record

Goals (issue 14): first step <= 8 s when submitted to a running cluster, <= 15 s with its own local Ray;
trial turnaround <= 5 s; start-up share of a 300-step trial <= 15 %; ``ftune demo`` warm <= 3 min.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import REPO, goal, machine_line, markdown_table, record_section  # noqa: E402

TINY_CONFIG = REPO / "configs" / "train" / "tiny.yaml"
TINY_SWEEP = REPO / "configs" / "sweep" / "tiny.yaml"
CLUSTER_GOAL_S, OWN_RAY_GOAL_S, TURNAROUND_GOAL_S, STARTUP_SHARE_GOAL, DEMO_GOAL_S = 8.0, 15.0, 5.0, 0.15, 180.0
KINDS = ("plain", "ray-own", "own-ray", "ray-cluster", "cluster")
FLOOR_OF = {"own-ray": "ray-own", "cluster": "ray-cluster"}
MILESTONES = (
    ("data", "[ftune] data:"),
    ("ray_up", "[ftune] Ray's own logs:"),
    ("engines", " worker(s), global batch"),
)
WORKER_IMPORTS = """
import sys, time
{skip}
t0 = time.process_time()
import torch, deepspeed, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
import peft
print(time.process_time() - t0, "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None)
"""


def overrides(steps: int, workers: int, storage: Path) -> list[str]:
    """tiny.yaml cut to the start-up: a few steps, evaluation and checkpoint only at the end."""
    return [f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
            "train.exact_match_examples=0", "data.max_validation_rows=16", f"scaling.num_workers={workers}",
            "failure.max_failures=0", f"storage.path={storage}", "tracking.wandb=disabled"]


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of the run's metrics.jsonl (none if it has none)."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def first_step_time(run_dir: Path) -> float | None:
    """Unix time of the first step row in the run's metrics.jsonl."""
    times = [r["time"] for r in metrics_rows(run_dir) if r.get("step", 0) >= 1 and "loss" in r and "time" in r]
    return min(times) if times else None


def timed_process(command: list[str], env: dict[str, str]) -> tuple[float, dict[str, float], str]:
    """Run ``command``; its start time and the first time each milestone line appeared."""
    seen: dict[str, float] = {}
    lines: list[str] = []
    started = time.time()
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        for line in proc.stdout:
            lines.append(line)
            for key, marker in MILESTONES:
                if marker in line and key not in seen:
                    seen[key] = time.time()
        if proc.wait() != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(lines[-40:])}")
    return started, seen, "".join(lines)


def start_job(kind: str, work: Path, name: str, workers: int, env: dict[str, str]) -> dict[str, Any]:
    """One start of ``kind``; seconds from launch to each milestone and to the first step."""
    storage = work / "runs"
    if kind == "plain":
        command = [sys.executable, __file__, "--plain-child", str(storage / name), "--workers", str(workers)]
    elif kind.startswith("ray-"):
        command = [sys.executable, __file__, "--ray-floor-child", str(storage / name), "--workers", str(workers)]
    else:
        command = [sys.executable, "-m", "train", "--config", str(TINY_CONFIG), "--name", name,
                   *overrides(3, workers, storage)]
    started, seen, _ = timed_process(command, env)
    first = first_step_time(storage / name)
    if first is None:
        raise RuntimeError(f"{kind} run {name}: no step in {storage / name}/metrics.jsonl")
    return {"kind": kind, "first_step_s": first - started, **{k: t - started for k, t in seen.items()}}


def plain_child(run_dir: Path, workers: int) -> None:
    """The floor: bench/train_overhead.py's plain loop for one step; writes the step row where ftune would."""
    from bench.train_overhead import run_plain
    from ftune.config import TrainJobConfig
    from ftune.yaml_config import load_config

    cfg = load_config(TrainJobConfig, TINY_CONFIG, overrides(1, workers, run_dir.parent))
    print(f"[ftune] data: {cfg.data.path}", flush=True)
    result = run_plain(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["rows"]))


def use_ftunes_ray_settings() -> None:
    """Give a floor child the Ray Train settings a tiny ftune run sets (its controller's poll interval, ...)."""
    from ftune.config import TrainJobConfig
    from ftune.yaml_config import load_config
    from train.ray_settings import ray_train_env

    os.environ.update(ray_train_env(load_config(TrainJobConfig, TINY_CONFIG, [])))


def bare_loop(config: dict[str, Any]) -> None:
    """Ray's floor's train function: import torch, check the process group, "train" (sleep) ``train_s``; rank 0
    writes a first-step row and a last row to ``run_dir``/metrics.jsonl, as ftune's runs do."""
    import ray.train
    import torch  # noqa: F401 - a worker of any torch job imports it
    import torch.distributed as dist

    dist.barrier()  # the process group works on every rank
    first = time.time()
    time.sleep(config["train_s"])
    if ray.train.get_context().get_world_rank() == 0:
        run_dir = Path(config["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"step": 1, "loss": 0.0, "time": first}, {"step": 1, "time": time.time()}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ray.train.report({"step": 1})


def fit_bare_trainer(run_dir: Path, workers: int, train_s: float = 0.0) -> None:
    """A bare TorchTrainer shaped like the tiny job (workers of 1 CPU, gloo) running ``bare_loop``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    TorchTrainer(bare_loop, train_loop_config={"run_dir": str(run_dir), "train_s": train_s},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent / "ray"))).fit()


def ray_floor_child(run_dir: Path, workers: int) -> None:
    """Ray's floor: a bare TorchTrainer shaped like the tiny job whose workers import torch and report one step."""
    import ray

    ray.init(log_to_driver=False)
    fit_bare_trainer(run_dir, workers)


def step_times(run_dir: Path) -> dict[str, float]:
    """Unix times of a run's first step row and of its last row (its metrics.jsonl)."""
    first = first_step_time(run_dir)
    if first is None:
        raise RuntimeError(f"no step in {run_dir}/metrics.jsonl")
    return {"first_step": first, "last_row": max(r["time"] for r in metrics_rows(run_dir))}


def sweep_trials(work: Path, trials: int, steps: int, env: dict[str, str], *, reuse: bool) -> list[dict[str, float]]:
    """Run a sweep of ``trials`` trials one at a time; per trial: wall s, first step and last row (unix s)."""
    storage = work / "sweep"
    name = f"turnaround-{'reuse' if reuse else 'fresh'}"
    command = [sys.executable, "-m", "tune", "--config", str(TINY_SWEEP), "--name", name,
               f"job.storage.path={storage}", "search.algorithm=random", f"search.num_samples={trials}",
               "search.max_concurrent_trials=1", "search.asha.enabled=false", "budget.usd=null",
               f"search.reuse_trial_processes={str(reuse).lower()}",
               f"job.train.max_steps={steps}", f"job.train.eval_every={steps}", f"job.train.checkpoint_every={steps}",
               "job.tracking.wandb=disabled"]
    timed_process(command, env)
    sweep_dir = storage / "sweeps" / name
    ledger = json.loads((sweep_dir / "spend.json").read_text())
    found = [{"wall_s": trial["wall_s"], **step_times(sweep_dir / "trials" / trial["trial_id"])}
             for trial in ledger["trials"]]
    return sorted(found, key=lambda t: t["first_step"])


def ray_sweep_floor_child(work: Path, trials: int, train_s: float) -> None:
    """Ray's floor for a trial turnaround: bare TorchTrainer trials, one at a time, actors reused, as ftune's sweep."""
    import ray
    import ray.tune

    def trial(config: dict[str, Any]) -> None:
        started = time.time()
        run_dir = Path(config["dir"]) / ray.tune.get_context().get_trial_id()
        fit_bare_trainer(run_dir, 1, config["train_s"])
        (run_dir / "wall.json").write_text(json.dumps({"wall_s": time.time() - started}))
        ray.tune.report({"done": 1})

    ray.init(log_to_driver=False)
    ray.tune.Tuner(ray.tune.with_resources(trial, {"CPU": 0.5}),
                   param_space={"dir": str(work / "floor"), "train_s": train_s},
                   tune_config=ray.tune.TuneConfig(num_samples=trials, max_concurrent_trials=1, reuse_actors=True),
                   run_config=ray.tune.RunConfig(storage_path=str(work / "floor-tune"), verbose=0)).fit()


def ray_sweep_floor(work: Path, trials: int, train_s: float, env: dict[str, str]) -> list[dict[str, float]]:
    """Run Ray's floor sweep in its own process; per trial: wall s, first step and last row (unix s)."""
    timed_process([sys.executable, __file__, "--ray-sweep-floor-child", str(work), "--sweep-trials", str(trials),
                   "--floor-train-s", f"{train_s:.3f}"], env)
    found = [{**json.loads((wall.parent / "wall.json").read_text()), **step_times(wall.parent)}
             for wall in (work / "floor").glob("*/wall.json")]
    if len(found) != trials:
        raise RuntimeError(f"Ray's floor sweep wrote {len(found)} of {trials} trials")
    return sorted(found, key=lambda t: t["first_step"])


def turnarounds(trials: list[dict[str, float]]) -> tuple[list[float], list[float]]:
    """Each trial's end -> the next trial's first step, and each trial's share of wall time outside training."""
    gaps = [b["first_step"] - a["last_row"] for a, b in zip(trials, trials[1:])]
    shares = [1 - (t["last_row"] - t["first_step"]) / t["wall_s"] for t in trials]
    return gaps, shares


def sweep_lines(sweeps: dict[str, list[dict[str, float]]], steps: int) -> tuple[list[str], list[str]]:
    """Report lines and goal verdicts of the sweeps' trials (``sweeps``: "reused", "fresh", "ray" (the floor))."""
    rows, medians = [], {}
    for kind, trials in sweeps.items():
        gaps, shares = turnarounds(trials)
        medians[kind] = gap, share = statistics.median(gaps), statistics.median(shares)
        rows.append([kind, f"{gap:.1f}", "/".join(f"{g:.1f}" for g in gaps), f"{share:.0%}",
                     "/".join(f"{x:.0%}" for x in shares)])
    gap, share = medians["reused"]
    for row, kind in zip(rows, sweeps):
        row.append(f"{medians[kind][0] / medians['fresh'][0]:.2f}x" if "fresh" in medians else "-")
        row.append(f"+{medians[kind][0] - medians['ray'][0]:.1f}" if "ray" in medians and kind != "ray" else "-")
    rows = [[{"ray": "Ray's floor (bare TorchTrainer trials, reused)"}.get(r[0], r[0]), *r[1:]] for r in rows]
    lines = [f"Sweeps of {len(sweeps['reused'])} trials of {steps} steps one at a time (`python -m tune`, its own "
             "local Ray), with trial processes reused (`search.reuse_trial_processes`, the default) and with a "
             "fresh process per trial, and Ray's floor in the same run (a Tune sweep of bare one-worker TorchTrainer "
             "trials, actors reused, each training (sleeping) as long as ftune's reused trials trained); turnaround "
             "= a trial's last metrics row -> the next trial's first step; outside training = wall - first step to "
             "last row, as a share of a trial's wall time:", "",
             markdown_table(["trial processes", "turnaround s (median)", "each", "outside training (median)",
                             "each", "turnaround x fresh", "s above Ray's floor"], rows), ""]
    verdicts = [
        goal("sweep: one trial's end -> the next trial's first step", f"{gap:.1f} s", f"<= {TURNAROUND_GOAL_S:.0f} s",
             gap <= TURNAROUND_GOAL_S),
        goal(f"sweep: start-up share of a {steps}-step trial", f"{share:.0%}", f"<= {STARTUP_SHARE_GOAL:.0%}",
             share <= STARTUP_SHARE_GOAL),
    ]
    if "ray" in medians:
        floor_gap, floor_share = medians["ray"]
        verdicts += [f"INFO  Ray's floor in the same run: turnaround {floor_gap:.1f} s, start-up share {floor_share:.0%}"]
    return lines, verdicts


def warm_demo(work: Path, env: dict[str, str]) -> float:
    """Seconds of one ``ftune demo`` with its defaults, after the built-in assets and the op are built."""
    from ftune.builtin_assets import ensure_sample_dataset, ensure_tiny_model
    from ftune.deepspeed_ops import ensure_built

    ensure_tiny_model()
    ensure_sample_dataset()
    ensure_built(announce=lambda line: None)
    started = time.time()
    timed_process([sys.executable, "-m", "ftune", "demo", "--workdir", str(work / "demo"), "--port", "0"], env)
    return time.time() - started


def worker_imports(skip: bool) -> float:
    """CPU seconds a fresh process spends importing what a Train worker imports."""
    code = WORKER_IMPORTS.format(
        skip="from ftune.lean_imports import skip_bitsandbytes; skip_bitsandbytes(quantized=False)" if skip else "")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    seconds, loaded = done.stdout.splitlines()[-1].split()  # deepspeed prints its own lines first
    if (loaded == "True") == skip:
        raise RuntimeError(f"bitsandbytes loaded={loaded} with skip={skip}")
    return float(seconds)


def measure(args: argparse.Namespace, work: Path):
    """Every start and every import timing, interleaved."""
    from cluster.local import LocalCluster

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    env.pop("RAY_ADDRESS", None)
    starts: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    imports: dict[str, list[float]] = {"with bitsandbytes": [], "bitsandbytes skipped": []}
    with LocalCluster(cpus_per_worker=1, state_path=work / "cluster.json").up(workers=2) as cluster:
        cluster_env = {**env, **{k: v for k, v in os.environ.items() if k.startswith("RAY_AUTH")},
                       "RAY_ADDRESS": cluster.address}
        for repeat in range(args.repeats):
            for kind in KINDS:
                run_env = cluster_env if kind.endswith("cluster") else env
                starts[kind].append(start_job(kind, work, f"{kind}-{repeat}", args.workers, run_env))
                print(f"[bench] {kind} #{repeat}: {starts[kind][-1]}", flush=True)
            imports["with bitsandbytes"].append(worker_imports(skip=False))
            imports["bitsandbytes skipped"].append(worker_imports(skip=True))
    trials = {}
    if args.sweep_trials > 1:
        trials["reused"] = sweep_trials(work, args.sweep_trials, args.sweep_steps, env, reuse=True)
        trials["fresh"] = sweep_trials(work, args.sweep_trials, args.sweep_steps, env, reuse=False)
        train_s = statistics.median(t["last_row"] - t["first_step"] for t in trials["reused"])
        trials["ray"] = ray_sweep_floor(work, args.sweep_trials, train_s, env)
    demo_s = warm_demo(work, env) if args.demo else None
    return starts, imports, trials, demo_s


def report(args: argparse.Namespace, starts, imports, trials, demo_s: float | None, load_before: str) -> str:
    """The section for bench/RESULTS.md."""
    def med(kind: str, key: str) -> str:
        values = [s[key] for s in starts[kind] if key in s]
        return f"{statistics.median(values):.1f}" if values else "-"

    def first(kind: str) -> float:
        return statistics.median(s["first_step_s"] for s in starts[kind])

    floor = first("plain")
    rows = []
    for kind in KINDS:
        every = "/".join(f"{s['first_step_s']:.1f}" for s in starts[kind])
        above = f"+{first(kind) - first(FLOOR_OF[kind]):.1f}" if kind in FLOOR_OF else "-"
        rows.append([kind, med(kind, "data"), med(kind, "ray_up"), med(kind, "engines"), f"{first(kind):.1f}",
                     f"{first(kind) / floor:.2f}x", above, every])
    table = markdown_table(["start", "data prepared s", "Ray up s", "engines built s", "first step s (median)",
                            "x plain", "s above Ray's floor", "each repeat"], rows)
    import_rows = [[k, f"{statistics.median(v):.2f}", "/".join(f"{x:.2f}" for x in v)] for k, v in imports.items()]
    saved = statistics.median(imports["with bitsandbytes"]) - statistics.median(imports["bitsandbytes skipped"])
    cluster, own = first("cluster"), first("own-ray")
    verdicts = [
        goal("first step, submitted to a running cluster", f"{cluster:.1f} s", f"<= {CLUSTER_GOAL_S:.0f} s",
             cluster <= CLUSTER_GOAL_S),
        goal("first step, python -m train with its own Ray", f"{own:.1f} s", f"<= {OWN_RAY_GOAL_S:.0f} s",
             own <= OWN_RAY_GOAL_S),
    ]
    sweep_text: list[str] = []
    if trials:
        sweep_text, sweep_verdicts = sweep_lines(trials, args.sweep_steps)
        verdicts += sweep_verdicts
    if demo_s is not None:
        sweep_text += [f"`ftune demo` with its defaults, warm: {demo_s:.0f} s.", ""]
        verdicts.append(goal("ftune demo, warm", f"{demo_s / 60:.1f} min", f"<= {DEMO_GOAL_S / 60:.0f} min",
                             demo_s <= DEMO_GOAL_S))
    return "\n".join([
        f"## Start-up (`python bench/startup.py --repeats {args.repeats} --workers {args.workers}"
        f"{' --demo' if args.demo else ''}`)", "",
        f"{machine_line()}; load avg before {load_before}. Tiny config, {args.workers} workers, 3 steps, "
        "seconds from the process's launch; median of the repeats.", "",
        table, "", *sweep_text,
        "CPU seconds a fresh process spends importing a Train worker's stack (torch, deepspeed, transformers, "
        "peft):", "",
        markdown_table(["imports", "CPU s (median)", "each repeat"], import_rows), "",
        f"Skipping bitsandbytes saves {saved:.2f} CPU s per worker or replica start.", "",
        "```", *verdicts, "```",
    ])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sweep-trials", type=int, default=3, help="trials of the turnaround sweep (0: none)")
    parser.add_argument("--sweep-steps", type=int, default=300, help="steps of each of its trials")
    parser.add_argument("--demo", action="store_true", help="also time one warm `ftune demo` (about 5 min)")
    parser.add_argument("--no-record", action="store_true", help="print the section only")
    parser.add_argument("--plain-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ray-floor-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ray-sweep-floor-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor-train-s", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.plain_child:
        plain_child(args.plain_child, args.workers)
        return 0
    if args.ray_floor_child or args.ray_sweep_floor_child:
        use_ftunes_ray_settings()
    if args.ray_floor_child:
        ray_floor_child(args.ray_floor_child, args.workers)
        return 0
    if args.ray_sweep_floor_child:
        ray_sweep_floor_child(args.ray_sweep_floor_child, args.sweep_trials, args.floor_train_s)
        return 0
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="ftune-startup-") as tmp:
        starts, imports, trials, demo_s = measure(args, Path(tmp))
    section = report(args, starts, imports, trials, demo_s, load_before)
    print(section)
    if not args.no_record:
        record_section("bench/startup.py", section)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
