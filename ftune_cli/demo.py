"""`ftune demo`: the whole product on a laptop -- train, sweep under a dollar budget, serve the winner.

A single-node Ray started in-process, the built-in tiny Llama and sample data, local storage under
--workdir, wandb offline, the endpoint on 127.0.0.1. Each stage prints a header and its own progress;
the end prints a summary (also written to <workdir>/summary.json) and tears down what the demo started.

    ftune demo                                   # about 10 minutes on 2 CPU cores
    ftune demo --steps 60 --trials 2             # smaller
    ftune demo --keep-serving                    # leave the endpoint up until Ctrl-C
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ftune.errors import JobFailed, UserError
from ftune.sweep_result import SweepResult

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_CONFIG = REPO_CONFIGS / "train" / "tiny.yaml"
SWEEP_CONFIG = REPO_CONFIGS / "sweep" / "tiny.yaml"
PRICING = REPO_CONFIGS / "pricing" / "local-cpu.yaml"
SUMMARY_FILE = "summary.json"
STAGES = 5


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments of the demo."""
    parser = argparse.ArgumentParser(
        prog="ftune demo", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workdir", type=Path, default=Path("~/ftune_demo"),
                        help="where runs, sweeps and the summary go")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the training run and of each trial")
    parser.add_argument("--trials", type=int, default=4, help="trials of the sweep (TPE + ASHA)")
    parser.add_argument("--budget-usd", type=float, default=0.01,
                        help="dollar budget of the sweep, at the notional CPU price of configs/pricing/local-cpu.yaml")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of the training run")
    parser.add_argument("--validation-rows", type=int, default=128,
                        help="held-out questions every evaluation uses (the built-in set has 87)")
    parser.add_argument("--requests", type=int, default=3, help="sample answers to show (all held-out questions are asked)")
    parser.add_argument("--cpus", type=int, default=None,
                        help="logical CPUs of the local Ray; None: max(4, cores), so two trials run at once")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint (0: any free port)")
    parser.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    parser.add_argument("--verbose", action="store_true", help="also print Ray's own log lines (they go to Ray's log files)")
    args = parser.parse_args(argv)
    problems = [f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}"
                for name, low in (("steps", 2), ("trials", 1), ("workers", 1), ("validation_rows", 1), ("requests", 1))
                if getattr(args, name) < low]
    if args.budget_usd <= 0:
        problems.append(f"--budget-usd must be positive, got {args.budget_usd}")
    if problems:
        raise UserError("ftune demo: " + "; ".join(problems))
    return args


def stage(index: int, text: str) -> float:
    """Print a stage header; return its start time."""
    print(f"\n=== [{index}/{STAGES}] {text}", flush=True)
    return time.perf_counter()


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it at 127.0.0.1, else (or for 0) a free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                print(f"port {port} is in use; picking a free one", flush=True)
                continue
            return s.getsockname()[1]
    raise UserError("no free TCP port on 127.0.0.1")


def start_ray(cpus: int | None, verbose: bool = False) -> str:
    """A fresh single-node Ray started from this process (never an existing cluster); returns its session name.

    Actor output reaches this console: the training run's progress lines come from its Train controller.
    """
    import ray

    from ftune.console import announce_ray_logs, ray_logging_level, show_only_ftune_lines

    if ray.is_initialized():
        raise UserError("ftune demo starts its own local Ray, but this process is already connected to one")
    cpus = cpus or max(4, os.cpu_count() or 1)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True,
             logging_level=ray_logging_level(verbose))
    session = ray.get_runtime_context().get_session_name()
    print(f"local Ray: {ray.cluster_resources().get('CPU', 0):g} logical CPUs ({session})", flush=True)
    announce_ray_logs(show_only_ftune_lines(verbose))
    return session


def job_overrides(args: argparse.Namespace) -> list[str]:
    """Settings the training run and every trial share, so their eval losses are comparable."""
    every = max(1, args.steps // 4)
    return [f"train.max_steps={args.steps}", f"train.eval_every={every}", f"train.checkpoint_every={every}",
            f"data.max_validation_rows={args.validation_rows}", "tracking.wandb=offline"]


def train_once(args: argparse.Namespace, workdir: Path, stamp: str) -> dict[str, Any]:
    """One LoRA training run of configs/train/tiny.yaml on ``args.workers`` Ray Train workers."""
    from ftune.config import TrainJobConfig
    from ftune.yaml_config import load_config
    from train.job import print_summary, run_training

    overrides = [f"storage.path={workdir / 'runs'}", f"scaling.num_workers={args.workers}",
                 f"train.exact_match_examples={args.validation_rows}", *job_overrides(args)]
    cfg = load_config(TrainJobConfig, TRAIN_CONFIG, overrides)
    summary = run_training(cfg, name=f"demo-train-{stamp}")
    print_summary(summary)
    return summary


def sweep_config(args: argparse.Namespace, workdir: Path):
    """configs/sweep/tiny.yaml at the demo's size, with absolute paths so any working directory works."""
    from ftune.yaml_config import load_config
    from tune.config import SweepConfig

    overrides = [f"base={TRAIN_CONFIG}", f"compute.pricing={PRICING}", f"job.storage.path={workdir}",
                 f"search.num_samples={args.trials}", f"search.tpe_startup_trials={min(args.trials, 4)}",
                 f"budget.usd={args.budget_usd}", *[f"job.{o}" for o in job_overrides(args)]]
    return load_config(SweepConfig, SWEEP_CONFIG, overrides)


def run_sweep(args: argparse.Namespace, workdir: Path, stamp: str) -> dict[str, Any]:
    """The budgeted TPE + ASHA sweep; returns tune.sweep's result (sweep_dir, rows, spend, best)."""
    from ftune.console import worker_lines_muted
    from tune import sweep

    with worker_lines_muted(args.verbose):  # the sweep's own lines say what every trial does
        return sweep.start(sweep_config(args, workdir), f"demo-sweep-{stamp}")


def deploy(sweep_dir: str, trained_adapter: str, port: int, verbose: bool = False) -> tuple[str, str]:
    """Deploy the sweep's best adapter next to the training run's (``ftune serve --sweep DIR --adapter ...``).

    Returns:
        The base URL and the winner's model id; the training run's adapter is served as ``trained``.
    """
    from ftune.console import quiet_libraries
    from serve.cli import plan_from_args
    from serve.deploy import deploy as deploy_app

    quiet_libraries(verbose)  # importing ray.serve set its logger back to INFO
    plan = plan_from_args(["--sweep", sweep_dir, "--adapter", f"trained={trained_adapter}", "--port", str(port),
                           "limits.default_max_tokens=16"])
    url = deploy_app(plan.config, host=plan.host, port=plan.port, app_name=plan.app_name,
                     route_prefix=plan.route_prefix)
    winner = next(name for name in plan.config.adapters if name != "trained")
    print(f"serving {', '.join(plan.config.model_ids)} at {url}", flush=True)
    return url, winner


def heldout_questions() -> list[dict[str, str]]:
    """The built-in held-out questions (facts the training file never asks about) and their answers."""
    from ftune.builtin_assets import ensure_sample_heldout

    with ensure_sample_heldout().open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [{"question": row["instruction"], "expected": row["output"]} for row in rows]


def _answer(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16
    )
    return (reply.choices[0].message.content or "").strip()


def ask(url: str, models: dict[str, str], questions: list[dict[str, str]], shown: int) -> dict[str, Any]:
    """Ask every question of every model over HTTP (openai client, concurrently); score exact match.

    Args:
        models: label (``base``, ``trained``, ``winner``) -> served model id.
        shown: how many questions (of distinct families) to print with every model's answer.

    Returns:
        The model ids /v1/models lists, exact match per label, and the shown samples.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ftune.sample_data import family_of

    try:
        from openai import OpenAI
    except ImportError as e:
        raise UserError("the demo calls the endpoint with the openai client: pip install openai") from e

    client = OpenAI(base_url=url, api_key="unused", max_retries=2, timeout=120)
    served = [m.id for m in client.models.list().data]
    missing = [model for model in models.values() if model not in served]
    if missing:
        raise UserError(f"the endpoint lists {served}, not the deployed {missing}")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = {label: list(pool.map(lambda q, m=model: _answer(client, m, q["question"]), questions))
                   for label, model in models.items()}
    exact = {label: sum(a == q["expected"] for a, q in zip(got, questions)) / len(questions)
             for label, got in answers.items()}
    samples, families = [], set()
    for i, q in enumerate(questions):  # the first question of each family, so the samples differ in kind
        family = family_of(q["question"])
        if family in families or len(samples) == shown:
            continue
        families.add(family)
        samples.append({**q, **{label: answers[label][i] for label in models}})
        print(f"  Q: {q['question']}  expected {q['expected']!r} | "
              + " | ".join(f"{label}: {answers[label][i]!r}" for label in models), flush=True)
    print(f"  exact match over {len(questions)} held-out questions: "
          + " | ".join(f"{label} {exact[label]:.0%}" for label in models), flush=True)
    return {"models": served, "exact_match": exact, "questions": len(questions), "samples": samples}


def sweep_facts(result: dict[str, Any]) -> dict[str, Any]:
    """Counts, spend and the best trial of a sweep result, for the summary."""
    sweep = SweepResult.open(result["sweep_dir"])
    spend = json.loads(sweep.spend_file.read_text())
    statuses = [row["status"] for row in result["rows"]]
    best = result["best"] or {}
    return {
        "sweep_dir": str(sweep.local_dir),
        "trials": len(statuses),
        "completed": statuses.count("completed"),
        "pruned": statuses.count("pruned"),
        "stopped_by_budget": statuses.count("stopped_budget"),
        "failed": statuses.count("error"),
        "spent_usd": result["spent_usd"],
        "budget_usd": spend["budget_usd"],
        "stop_reason": (result["stop"] or {}).get("reason"),
        "best_trial": best.get("trial"),
        "best_eval_loss": best.get("eval_loss"),
        "best_config": best.get("config"),
        "best_adapter": str(sweep.best_adapter),
        "leaderboard": str(sweep.leaderboard_csv),
        "report": str(sweep.report),
    }


def print_summary(s: dict[str, Any]) -> None:
    """The end-of-demo report."""
    t, sw, sv = s["train"], s["sweep"], s["serving"]
    em = sv["exact_match"]
    print("\n=== ftune demo summary", flush=True)
    print(f"held-out exact match ({sv['questions']} questions about facts the training data never asks): "
          f"base {em['base']:.0%} -> trained {em['trained']:.0%} -> sweep winner {em['winner']:.0%}")
    print(f"held-out eval loss: base {t['eval_loss_before']:.4f} -> trained ({t['steps']} steps, {s['workers']} workers) "
          f"{t['eval_loss_after']:.4f}" + (f" -> sweep winner {sw['best_eval_loss']:.4f}" if sw["best_eval_loss"] is not None else ""))
    settings = " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                        for k, v in (sw["best_config"] or {}).items())
    print(f"sweep: {sw['trials']} trial(s) run: {sw['completed']} completed, {sw['pruned']} pruned by ASHA, "
          f"{sw['stopped_by_budget']} stopped by the budget, {sw['failed']} failed; winner {sw['best_trial']} ({settings})")
    print(f"spend: ${sw['spent_usd']:.5f} of ${sw['budget_usd']:.5f} budget"
          + (f" ({sw['stop_reason']})" if sw["stop_reason"] else ""))
    print(f"report: {sw['report']}\nleaderboard: {sw['leaderboard']}")
    print(f"endpoint: {sv['url']}  (models {', '.join(repr(m) for m in sv['models'])}; the winner is {sv['model']!r})")
    for row in sv["samples"]:
        print(f"  {row['question']} -> {row['winner']!r} (expected {row['expected']!r})")
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in s["timings_s"].items())
    print(f"time: {s['total_s']:.0f} s ({timings})\nsummary: {s['summary_path']}", flush=True)


def keep_serving(url: str, model: str) -> None:
    """Print how to call the endpoint and block until Ctrl-C."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is 2 + 3?"}]})
    print(f"\nserving at {url} until Ctrl-C. Try:\n"
          f"  curl {url}/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
          f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}', api_key='x'); print(c.chat."
          f"completions.create(model='{model}', messages=[dict(role='user', content='What is 2 + 3?')])"
          f".choices[0].message.content)\"", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)


def shutdown(ray_session: str | None) -> None:
    """Stop the Serve application and proxies, then the local Ray the demo started."""
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    print("\n=== cleaning up: Serve and the local Ray", flush=True)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
    print(f"stopped the local Ray ({ray_session})", flush=True)


def main(argv: list[str]) -> int:
    """Train, sweep, serve and query on a fresh local Ray; write and print the summary."""
    from ftune.builtin_assets import ensure_sample_dataset, ensure_sample_heldout, ensure_tiny_model
    from ftune.console import quiet_libraries
    from ftune.deepspeed_ops import ensure_built

    args = parse_args(argv)
    quiet_libraries(args.verbose)
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    started, timings = time.perf_counter(), {}
    ray_session = None
    try:
        t0 = stage(1, "built-in tiny Llama model and sample instruction data (built once, then cached)")
        print("the tiny model is pretrained on the sample facts stated tersely; it has never seen a question "
              "(about 30 s on 2 cores, once)", flush=True)
        model_dir, data_path, heldout_path = ensure_tiny_model(), ensure_sample_dataset(), ensure_sample_heldout()
        print(f"model: {model_dir}\ndata:  {data_path}\nheld-out questions: {heldout_path}", flush=True)
        ensure_built(announce=lambda line: print(line, flush=True))
        ray_session = start_ray(args.cpus, args.verbose)
        timings["setup"] = time.perf_counter() - t0

        t0 = stage(2, f"one LoRA training run: Ray Train + DeepSpeed ZeRO-2, {args.workers} workers, "
                      f"{args.steps} steps")
        trained = train_once(args, workdir, stamp)
        timings["train"] = time.perf_counter() - t0

        t0 = stage(3, f"sweep: TPE + ASHA over rank, alpha and lr, {args.trials} trials x {args.steps} steps, "
                      f"budget ${args.budget_usd:g}")
        swept = sweep_facts(run_sweep(args, workdir, stamp))
        timings["sweep"] = time.perf_counter() - t0
        if swept["best_trial"] is None:
            raise JobFailed(f"the sweep produced no scored adapter to serve; see {swept['report']}")

        t0 = stage(4, "deploy the winner and the trained adapter on Ray Serve over one base model "
                      "(OpenAI-compatible, what `ftune serve --sweep DIR --adapter trained=DIR` does)")
        url, winner = deploy(swept["sweep_dir"], trained["adapter_path"], free_port(args.port), args.verbose)
        timings["deploy"] = time.perf_counter() - t0

        questions = heldout_questions()
        t0 = stage(5, f"ask the {len(questions)} held-out questions of base, trained and winner over HTTP "
                      "(openai client, temperature 0)")
        asked = ask(url, {"base": "base", "trained": "trained", "winner": winner}, questions, args.requests)
        timings["requests"] = time.perf_counter() - t0

        summary = {
            "workdir": str(workdir),
            "workers": args.workers,
            "train": {k: trained.get(k) for k in ("name", "run_dir", "steps", "eval_loss_before", "eval_loss_after",
                                                   "exact_match_after", "wall_time_s", "adapter_path")},
            "sweep": swept,
            "serving": {"url": url, "model": winner, "base_model": "base", **asked},
            "ray_session": ray_session,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "total_s": round(time.perf_counter() - started, 1),
            "summary_path": str(workdir / SUMMARY_FILE),
        }
        (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
        print_summary(summary)
        if args.keep_serving:
            keep_serving(url, winner)
    finally:
        shutdown(ray_session)
    return 0
