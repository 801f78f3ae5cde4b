"""Sweep efficiency: full grid vs random vs TPE+ASHA vs PBT on the sample task, under the same dollar budget.

    python bench/sweep_efficiency.py                  # about 45 min on 2 shared cores
    python bench/sweep_efficiency.py --quick          # 2 x 2 grid, 60 steps: a smoke run (minutes)
    python bench/sweep_efficiency.py --write-results  # + record the table in bench/RESULTS.md

Goal: TPE+ASHA reaches within 1 % of the grid's best eval loss for <= 30 % of the grid's cost.

Design (what keeps the comparison honest, and what makes it say what a sweep buys):

* Same space for every method: configs/sweep/tiny.yaml's, unchanged -- LoRA rank {4, 8, 16, 32},
  alpha = 2 x rank, learning rate log-uniform in [3e-4, 1e-2]. The grid is that space at the default
  ``search.grid_points`` (3 learning rates: 3e-4, 1.7e-3, 1e-2), 12 trials. PBT perturbs only the
  learning rate (an exploiting member takes its donor's rank with its weights), so it too stays in the space.
* Same trial, same concurrency, same prices: every trial is the tiny job on 1 CPU worker, 2 trials at
  once on one local Ray instance, priced by configs/pricing/local-cpu.yaml; a trial pays for its wall
  time from the moment it is scheduled (start-up, evaluations, checkpoints and restarts included).
* Same budget rule: the grid runs first without a budget; what it spent becomes ``budget.usd`` of the
  other three, which may start as many trials as the grid had (PBT: a population of 2).
* Trials long enough that training dominates: a trial's fixed start-up on this machine (Ray Train
  worker group, imports, model load, DeepSpeed initialisation) is 20-70 s, while the tiny model trains
  at ~0.05 s a step. At 120 steps start-up was most of a trial's cost, so stopping a trial early saved
  little -- unlike a real fine-tune, where a trial trains for many minutes to hours. Trials here train
  1200 steps (about 5 epochs of the sample data), so a full trial is mostly training and a trial ASHA
  stops at its first rung costs little more than its start-up. The table shows the share of each
  method's trial time spent outside training.
* Early stopping as shipped: ASHA's grace period is one evaluation interval (100 steps, 1/12 of a
  trial) and its reduction factor is the shipped 2; TPE's first 4 trials are random (the shipped
  ``tpe_startup_trials``). Seeds are the configs' (search.seed 0): one sample of each method, not a mean.

For each method the table reports:

  best eval loss       the best evaluation any trial reached (evaluations coincide with checkpoints)
  spend                dollars the sweep spent (the ledger's spend.json)
  $ to within 1 %      spend when any trial first evaluated within 1 % of the grid's best eval loss
                       (every running trial's time counted up to that moment)
  outside training     share of the trials' wall time not spent in the training loop (start-up,
                       restarts, tear-down of stopped trials)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import REPO, goal, machine_line, markdown_table, record_section

SWEEP = REPO / "configs" / "sweep" / "tiny.yaml"


def job_overrides(quick: bool) -> list[str]:
    """The trial every method trains, and the cost projections the budget admits trials with."""
    steps, every = (60, 20) if quick else (1200, 100)
    out = [
        f"job.train.max_steps={steps}", f"job.train.eval_every={every}", f"job.train.checkpoint_every={every}",
        "job.data.max_validation_rows=64", "job.tracking.wandb=disabled",
        "search.max_concurrent_trials=2", "budget.startup_s=45", "budget.step_time_s=0.08",
    ]
    if quick:
        out += ["space.lora.r={choice: [4, 32]}", "search.grid_points=2"]
    return out


def methods(grid_trials: int, checkpoint_every: int) -> dict[str, list[str]]:
    """Per-method overrides; random and TPE may start as many trials as the grid has."""
    return {
        "grid": ["search.algorithm=grid", "search.asha.enabled=false"],
        "random": ["search.algorithm=random", "search.asha.enabled=false", f"search.num_samples={grid_trials}"],
        "tpe+asha": ["search.algorithm=tpe", f"search.num_samples={grid_trials}", "search.asha.enabled=true"],
        "pbt": ["search.algorithm=pbt", "search.num_samples=2", "search.pbt.quantile_fraction=0.5",
                f"search.pbt.perturbation_interval_steps={2 * checkpoint_every}", "search.pbt.mutate=[train.lr]"],
    }


def spend_until(spend: dict[str, Any], t: float) -> float:
    """Dollars the sweep had spent at wall-clock time ``t`` (from each trial's segments)."""
    total = 0.0
    for trial in spend["trials"]:
        held = sum(max(0.0, min(end, t) - start) for start, end in trial["segments"])
        total += trial["rate_usd_per_h"] * held / 3600.0
    return total


def run_metrics(sweep_dir: Path, spend: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The metrics.jsonl rows of every training run of every trial (a PBT trial has one per exploit)."""
    out = []
    for trial in spend["trials"]:
        for run in trial["runs"]:
            path = sweep_dir / "trials" / run / "metrics.jsonl"
            if path.is_file():
                out.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    return out


def evaluations(runs: list[list[dict[str, Any]]]) -> list[tuple[float, float]]:
    """(wall-clock time, eval loss) of every evaluation after step 0, in time order."""
    return sorted((row["time"], row["eval_loss"]) for rows in runs for row in rows
                  if row["step"] > 0 and "eval_perplexity" in row)


def training_s(runs: list[list[dict[str, Any]]]) -> float:
    """Seconds inside training loops: from each run's first record (its step-0 evaluation) to its last."""
    return sum(rows[-1]["time"] - rows[0]["time"] for rows in runs if rows)


def run_method(name: str, overrides: list[str], root: Path, budget: float | None) -> dict[str, Any]:
    """Run one sweep and summarise it."""
    from ftune.yaml_config import load_config
    from tune.config import SweepConfig
    from tune.sweep import start

    budget_override = [f"budget.usd={budget}" if budget else "budget.usd=null"]
    cfg = load_config(SweepConfig, SWEEP, [f"job.storage.path={root}", *overrides, *budget_override])
    t0 = time.time()
    result = start(cfg, name.replace("+", "-"))
    sweep_dir = Path(result["sweep_dir"])
    spend = json.loads((sweep_dir / "spend.json").read_text())
    counts: dict[str, int] = {}
    for row in result["rows"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    runs = run_metrics(sweep_dir, spend)
    wall = sum(t["wall_s"] for t in spend["trials"])
    return {"name": name, "spend": spend, "sweep_dir": sweep_dir, "evals": evaluations(runs), "counts": counts,
            "wall_s": time.time() - t0, "trial_s": wall, "outside_training": 1.0 - training_s(runs) / wall,
            "best_config": result["best"]["config"] if result["best"] else None}


def first_within(res: dict[str, Any], target: float) -> float | None:
    """Spend at the first evaluation with eval loss <= target."""
    for t, loss in res["evals"]:
        if loss <= target:
            return spend_until(res["spend"], t)
    return None


def main() -> int:
    """Run the four sweeps and print (and optionally record) the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2 x 2 grid and 60 steps (smoke run)")
    parser.add_argument("--out", type=Path, help="where the sweeps go (default: a temporary directory)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--write-results", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.chdir(REPO)

    import ray

    from ftune.yaml_config import load_config
    from tune.config import SweepConfig
    from tune.space import SearchSpace

    load_before = machine_line()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    root = args.out or Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    common = job_overrides(args.quick)
    cfg = load_config(SweepConfig, SWEEP, common)
    grid_trials = SearchSpace.from_config(cfg).grid_size(cfg.search.grid_points)
    plan = methods(grid_trials, cfg.job_config().train.checkpoint_every)
    results = {"grid": run_method("grid", common + plan["grid"], root, None)}
    budget = results["grid"]["spend"]["spent_usd"]
    for name in ("random", "tpe+asha", "pbt"):
        results[name] = run_method(name, common + plan[name], root, budget)

    grid_best = min(loss for _, loss in results["grid"]["evals"])
    target = grid_best * 1.01
    rows = []
    for name, res in results.items():
        best = min((loss for _, loss in res["evals"]), default=float("nan"))
        spent = res["spend"]["spent_usd"]
        reach = first_within(res, target)
        counts = ", ".join(f"{n} {s}" for s, n in sorted(res["counts"].items()))
        best_config = res["best_config"] or {}
        settings = f"r={best_config.get('lora.r')} lr={best_config.get('train.lr', float('nan')):.2g}"
        rows.append([name, counts, f"{best:.4f}", f"{(best / grid_best - 1) * 100:+.2f} %", settings, f"{spent:.5f}",
                     f"{spent / budget:.2f}x", f"{reach:.5f}" if reach is not None else "never",
                     f"{reach / budget:.2f}x" if reach is not None else "-",
                     f"{res['trial_s'] / max(1, sum(res['counts'].values())):.0f}",
                     f"{res['outside_training'] * 100:.0f} %", f"{res['wall_s'] / 60:.1f}"])
    table = markdown_table(["method", "trials", "best eval loss", "vs grid best", "best trial", "spend $",
                            "spend / grid", "$ to within 1 %", "/ grid cost", "s per trial", "outside training",
                            "wall min"], rows)
    tpe_reach = first_within(results["tpe+asha"], target)
    reached = f"{tpe_reach / budget:.2f}x of grid cost" if tpe_reach is not None else "never reached"
    verdict = goal("TPE+ASHA cost to reach within 1 % of the grid's best", reached, "<= 0.30x",
                   tpe_reach is not None and tpe_reach <= 0.3 * budget)
    command = "python bench/sweep_efficiency.py" + (" --quick" if args.quick else "") + f" --num-cpus {args.num_cpus}"
    text = (f"## Sweep efficiency ({command})\n\n{load_before} at the start; {machine_line()} at the end; "
            f"ray {ray.__version__}; prices: configs/pricing/local-cpu.yaml (cpu-worker $0.048/h per worker); "
            f"1 worker per trial, 2 trials at once; {cfg.job_config().train.max_steps} steps per trial; "
            f"grid = {grid_trials} trials; budget of the others = the grid's spend (${budget:.5f}); "
            f"sweeps under {root}.\n\n{table}\n\n```\n{verdict}\n```\n")
    print(text)
    if args.write_results:
        record_section("bench/sweep_efficiency.py", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
