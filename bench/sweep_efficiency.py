"""Sweep efficiency: full grid vs random vs TPE+ASHA vs PBT on the sample task, under the same dollar budget.

All four search the same space of the tiny job (configs/sweep/tiny.yaml: LoRA rank, alpha = 2 x rank,
learning rate) on one local Ray instance with the same trial shape and concurrency. The grid runs
first without a budget; its spend becomes the budget of the other three. For each method:

  best eval loss       the best evaluation any trial reached (evaluations coincide with checkpoints)
  spend                dollars the sweep spent (the ledger's spend.json; local-cpu prices)
  $ to within 1 %      spend when any trial first evaluated within 1 % of the grid's best eval loss

    python bench/sweep_efficiency.py                  # about 30-60 min on 2 shared cores
    python bench/sweep_efficiency.py --quick          # 2x2 grid, 30 steps: a smoke run
    python bench/sweep_efficiency.py --write-results  # + record the table in bench/RESULTS.md

Goal: TPE+ASHA reaches within 1 % of the grid's best eval loss for <= 30 % of the grid's cost.
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

from bench.report import REPO, goal, machine_line, markdown_table  # noqa: E402

SECTION_START = "<!-- bench/sweep_efficiency.py start -->"
SECTION_END = "<!-- bench/sweep_efficiency.py end -->"


def space_overrides(quick: bool) -> list[str]:
    """The searched space and the job every method trains."""
    steps, every = (30, 10) if quick else (120, 20)
    ranks = "[4, 32]" if quick else "[4, 16, 64]"
    return [
        f"job.train.max_steps={steps}", f"job.train.eval_every={every}", f"job.train.checkpoint_every={every}",
        "job.train.report_interval_s=0.5", "job.data.max_validation_rows=64", "job.tracking.wandb=disabled",
        f"space.lora.r={{choice: {ranks}}}", "space.lora.alpha={ratio: 2}",
        "space.train.lr={loguniform: [1.0e-4, 1.0e-2]}", f"search.grid_points={2 if quick else 3}",
        "search.max_concurrent_trials=2", "budget.startup_s=40", f"budget.step_time_s={0.1}",
    ]


def methods(quick: bool, grid_trials: int) -> dict[str, list[str]]:
    """Per-method overrides; the non-grid methods may sample as many trials as the grid."""
    n = grid_trials
    return {
        "grid": ["search.algorithm=grid", "search.asha.enabled=false"],
        "random": ["search.algorithm=random", "search.asha.enabled=false", f"search.num_samples={n}"],
        "tpe+asha": ["search.algorithm=tpe", f"search.num_samples={n}", "search.tpe_startup_trials=3",
                     "search.asha.reduction_factor=3"],
        "pbt": ["search.algorithm=pbt", "search.num_samples=2", "search.pbt.quantile_fraction=0.5",
                f"search.pbt.perturbation_interval_steps={10 if quick else 40}",
                "space.lora.alpha={ratio: [1, 2, 4]}"],
    }


def spend_until(spend: dict[str, Any], t: float) -> float:
    """Dollars the sweep had spent at wall-clock time ``t`` (from each trial's segments)."""
    total = 0.0
    for trial in spend["trials"]:
        held = sum(max(0.0, min(end, t) - start) for start, end in trial["segments"])
        total += trial["rate_usd_per_h"] * held / 3600.0
    return total


def evaluations(sweep_dir: Path, spend: dict[str, Any]) -> list[tuple[float, float]]:
    """(wall-clock time, eval loss) of every evaluation after step 0 of every trial's runs."""
    out = []
    for trial in spend["trials"]:
        for run in trial["runs"]:
            path = sweep_dir / "trials" / run / "metrics.jsonl"
            if path.is_file():
                for line in path.read_text().splitlines():
                    row = json.loads(line)
                    if row["step"] > 0 and "eval_perplexity" in row:
                        out.append((row["time"], row["eval_loss"]))
    return sorted(out)


def run_method(name: str, overrides: list[str], root: Path, budget: float | None) -> dict[str, Any]:
    """Run one sweep and summarise it."""
    from ftune.yaml_config import load_config
    from tune.config import SweepConfig
    from tune.sweep import start

    budget_override = [f"budget.usd={budget}" if budget else "budget.usd=null"]
    cfg = load_config(SweepConfig, REPO / "configs/sweep/tiny.yaml", [f"job.storage.path={root}", *overrides, *budget_override])
    t0 = time.time()
    result = start(cfg, name.replace("+", "-"))
    sweep_dir = Path(result["sweep_dir"])
    spend = json.loads((sweep_dir / "spend.json").read_text())
    counts: dict[str, int] = {}
    for row in result["rows"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return {"name": name, "spend": spend, "sweep_dir": sweep_dir, "evals": evaluations(sweep_dir, spend),
            "counts": counts, "wall_s": time.time() - t0}


def first_within(res: dict[str, Any], target: float) -> float | None:
    """Spend at the first evaluation with eval loss <= target."""
    for t, loss in res["evals"]:
        if loss <= target:
            return spend_until(res["spend"], t)
    return None


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section of bench/RESULTS.md, leaving the others alone."""
    path = REPO / "bench" / "RESULTS.md"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{SECTION_START}\n{text.rstrip()}\n{SECTION_END}\n"
    if SECTION_START in current and SECTION_END in current:
        head, rest = current.split(SECTION_START, 1)
        current = head + block + rest.split(SECTION_END, 1)[1].lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    path.write_text(current)


def main() -> int:
    """Run the four sweeps and print (and optionally record) the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid and few steps (smoke run)")
    parser.add_argument("--out", type=Path, help="where the sweeps go (default: a temporary directory)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--write-results", action="store_true", help="record the table in bench/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.chdir(REPO)

    import ray

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    root = args.out or Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    common = space_overrides(args.quick)
    from ftune.yaml_config import load_config
    from tune.config import SweepConfig
    from tune.space import SearchSpace

    cfg = load_config(SweepConfig, REPO / "configs/sweep/tiny.yaml", common)
    grid_trials = SearchSpace.from_config(cfg).grid_size(cfg.search.grid_points)
    plan = methods(args.quick, grid_trials)
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
        rows.append([name, counts, f"{best:.4f}", f"{(best / grid_best - 1) * 100:+.2f} %", f"{spent:.5f}",
                     f"{spent / budget:.2f}x", f"{reach:.5f}" if reach is not None else "never",
                     f"{reach / budget:.2f}x" if reach is not None else "-", f"{res['wall_s'] / 60:.1f}"])
    table = markdown_table(["method", "trials", "best eval loss", "vs grid best", "spend $", "spend / grid",
                            "$ to within 1 %", "/ grid cost", "wall min"], rows)
    tpe_reach = first_within(results["tpe+asha"], target)
    verdict = goal("TPE+ASHA cost to reach within 1 % of the grid's best", f"{tpe_reach / budget:.2f}x of grid cost"
                   if tpe_reach is not None else "never reached", "<= 0.30x", tpe_reach is not None and tpe_reach <= 0.3 * budget)
    command = "python bench/sweep_efficiency.py" + (" --quick" if args.quick else "") + f" --num-cpus {args.num_cpus}"
    text = (f"## Sweep efficiency ({command})\n\n{machine_line()}; ray {ray.__version__}; prices: "
            f"configs/pricing/local-cpu.yaml (cpu-worker $0.048/h per worker); 1 worker per trial, 2 trials at once; "
            f"grid = {grid_trials} trials; budget of the others = the grid's spend (${budget:.5f}); "
            f"sweeps under {root}.\n\n{table}\n\n```\n{verdict}\n```\n")
    print(text)
    if args.write_results:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
