"""The sweep's results: ``leaderboard.json`` / ``leaderboard.csv`` (best first) and ``best/adapter/``.

Rows come from the spend ledger (one per trial: status, steps, cost, settings) and the trials' run
directories (adapters). A finished run's adapter is ``<run>/adapter``, and so is that of a run the
budget stop ended (it checkpoints and exports at the step it reached); a pruned run, or one killed
after the stop's grace period, has none, so its row points at the adapter inside its latest
checkpoint whose adapter files match the checkpoint's manifest (a partly written or uploaded
checkpoint never becomes ``best/adapter``). Serving (``serve.leaderboard_source``) reads ``trial``, ``eval_loss``,
``status`` and ``adapter_path`` of these rows. Where the files go is ``ftune.sweep_result.SweepResult``'s to say.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from typing import Any

import pyarrow.fs as pafs

from ftune.storage import Storage
from ftune.sweep_result import SweepResult
from train.checkpoint import CorruptCheckpoint, verify_adapter
from tune.space import SearchSpace, format_value


def adapter_of(storage: Storage, run: str, step: int) -> str | None:
    """The run's exported adapter, else the adapter of its latest verified checkpoint at or before ``step``
    (the last step the sweep saw: a stopped run may save one more checkpoint before it dies), else of its
    latest verified checkpoint, else None."""
    if storage.exists(run, "adapter", "adapter_config.json"):
        return storage.uri_of(run, "adapter")
    fs, _ = storage.filesystem()
    try:
        infos = fs.get_file_info(pafs.FileSelector(storage.path(run), recursive=False))
    except (FileNotFoundError, OSError):
        return None
    checkpoints = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_step"))
    seen = [n for n in checkpoints if int(n.removeprefix("checkpoint_step")[:7]) <= step]
    later = [n for n in checkpoints if n not in seen]
    for name in [*reversed(seen), *reversed(later)]:
        try:
            verify_adapter(storage.path(run, name), fs)
        except (CorruptCheckpoint, OSError):
            continue
        return storage.uri_of(run, name, "adapter")
    return None


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def leaderboard(spend: dict[str, Any], trials: Storage, space: SearchSpace, base_r: int, metric: str, mode: str) -> list[dict]:
    """One row per trial of a ledger (``spend.json`` contents), best first; failed and unscored trials last."""
    rows = []
    for t in spend["trials"]:
        value = _finite(t.get("metric"))
        row = {
            "trial": t["trial_id"],
            "number": t["number"],
            "status": t["status"],
            "eval_loss": _finite(t.get("eval_loss")),
            "steps": t["step"],
            "total_steps": t["total_steps"],
            "cost_usd": round(t["cost_usd"], 6),
            "wall_s": round(t["wall_s"], 1),
            "pruned_at": t.get("pruned_at"),
            "config": space.job_overrides(t["config"], base_r) if t["config"] else {},
            "params": t["config"],
            "run": t["run"],
            "runs": t["runs"],
            "run_dir": trials.uri_of(t["run"]),
            "adapter_path": adapter_of(trials, t["run"], t["step"]),
            "error": t.get("error"),
        }
        if metric != "eval_loss":
            row[metric] = value
        rows.append(row)
    sign = 1.0 if mode == "min" else -1.0

    def order(row: dict) -> tuple:
        value = row.get(metric) if metric != "eval_loss" else row["eval_loss"]
        failed = row["status"] == "error"
        return (failed, value is None, sign * value if value is not None else 0.0, row["cost_usd"])

    rows.sort(key=order)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def write_leaderboard(result: SweepResult, rows: list[dict]) -> None:
    """Write leaderboard.json (rows as they are) and leaderboard.csv (settings as columns)."""
    result.leaderboard_json.write_text(json.dumps(rows, indent=2, default=str))
    keys = sorted({k for row in rows for k in row["config"]})
    fields = ["rank", "trial", "status", "eval_loss", "steps", "cost_usd", "wall_s", "pruned_at", *keys, "adapter_path"]
    with result.leaderboard_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: format_value(v) for k, v in row["config"].items()}})


def export_best(result: SweepResult, rows: list[dict]) -> dict | None:
    """Copy the best scored trial's adapter to ``best/adapter/`` (PEFT format); returns its row."""
    best = next((r for r in rows if r["status"] != "error" and r["adapter_path"] and r["eval_loss"] is not None), None)
    target, trials = result.best_adapter, result.trials
    if target.exists():
        shutil.rmtree(target)
    if best is None:
        return None
    source = best["adapter_path"]
    if trials.is_remote:
        fs, _ = trials.filesystem()
        target.mkdir(parents=True)
        pafs.copy_files(source.removeprefix("s3://"), str(target), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    else:
        shutil.copytree(source, target)
    result.best_trial.write_text(json.dumps(best, indent=2, default=str))
    return best
