"""The sweep's HTML report (``report.html``): one self-contained file that works offline.

Plots are matplotlib PNGs embedded as base64 (no CDN, no scripts): eval-loss curves per trial,
eval loss against cost with the Pareto front, spend over time against the budget, and each searched
setting against the objective; then the leaderboard as a table.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from ftune.storage import Storage
from ftune.sweep_result import SweepResult
from tune.space import format_value

STATUS_COLORS = {"completed": "#1f77b4", "pruned": "#999999", "stopped_budget": "#ff7f0e", "error": "#d62728"}


def eval_curve(trials: Storage, runs: list[str]) -> list[tuple[int, float]]:
    """(step, eval loss) of every evaluation across a trial's runs (PBT continuations included)."""
    by_step: dict[int, float] = {}
    for run in runs:
        if not trials.exists(run, "metrics.jsonl"):
            continue
        for line in trials.read_text(run, "metrics.jsonl").splitlines():
            row = json.loads(line)
            if row.get("eval_loss") is not None and math.isfinite(row["eval_loss"]):
                by_step[int(row["step"])] = float(row["eval_loss"])
    return sorted(by_step.items())


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, loss) points no other point beats on both, by increasing cost."""
    front: list[tuple[float, float]] = []
    for cost, loss in sorted(points):
        if not front or loss < front[-1][1]:
            front.append((cost, loss))
    return front


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figures(rows: list[dict], spend: dict[str, Any], trials: Storage) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, str] = {}
    best = rows[0]["trial"] if rows else None

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        curve = eval_curve(trials, row["runs"])
        if curve:
            steps, losses = zip(*curve)
            ax.plot(steps, losses, marker=".", color=STATUS_COLORS.get(row["status"], "#2ca02c"),
                    linewidth=2.5 if row["trial"] == best else 1.0, alpha=1.0 if row["trial"] == best else 0.6,
                    linestyle="-" if row["status"] == "completed" else "--", label=f"#{row['number']}")
    ax.set(xlabel="step", ylabel="eval loss", title="Eval loss per trial (dashed: pruned / stopped; thick: best)")
    if len(rows) <= 12:
        ax.legend(fontsize=7, ncol=2)
    figs["Eval-loss curves"] = _png(fig)

    scored = [r for r in rows if r["eval_loss"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in scored:
        ax.scatter(row["cost_usd"], row["eval_loss"], color=STATUS_COLORS.get(row["status"], "#2ca02c"), zorder=3)
        ax.annotate(f"#{row['number']}", (row["cost_usd"], row["eval_loss"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    front = pareto_front([(r["cost_usd"], r["eval_loss"]) for r in scored])
    if front:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="black", linewidth=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set(xlabel="trial cost (USD)", ylabel="eval loss", title="Eval loss vs cost (grey: pruned, orange: budget stop)")
    figs["Eval loss vs cost"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    history = spend.get("history") or [[0.0, 0.0]]
    ax.plot([h[0] for h in history], [h[1] for h in history], label="spend")
    if spend.get("budget_usd"):
        ax.axhline(spend["budget_usd"], color="red", linestyle="--", label="budget")
    if spend.get("stop"):
        ax.axvline(spend["stop"]["at_elapsed_s"], color="grey", linestyle=":", label="budget stop")
    ax.set(xlabel="sweep time (s)", ylabel="USD", title="Spend over time")
    ax.legend(fontsize=8)
    figs["Spend over time"] = _png(fig)

    keys = sorted({k for r in scored for k in r["config"]})
    if keys:
        from matplotlib.ticker import NullFormatter

        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False, sharey=True)
        for i, (ax, key) in enumerate(zip(axes[0], keys)):
            points = [(r["config"][key], r["eval_loss"], r["status"]) for r in scored if key in r["config"]]
            numeric = all(isinstance(p[0], (int, float)) and not isinstance(p[0], bool) for p in points)
            labels = sorted({format_value(p[0]) for p in points})
            for value, loss, status in points:
                x = value if numeric else labels.index(format_value(value))
                ax.scatter(x, loss, color=STATUS_COLORS.get(status, "#2ca02c"))
            if numeric and key in ("train.lr", "lora.r", "lora.alpha"):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            if not numeric:
                ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
            ax.set(xlabel=key, ylabel="eval loss" if i == 0 else None)
        fig.suptitle("Settings vs objective")
        figs["Settings vs objective"] = _png(fig)
    return figs


def write_report(result: SweepResult, rows: list[dict], spend: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write report.html for a finished (or stopped) sweep and return its path."""
    esc = html.escape
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    budget = f" of ${spend['budget_usd']:.4f}" if spend.get("budget_usd") else ""
    best = rows[0] if rows and rows[0]["eval_loss"] is not None else None
    summary = {
        "sweep": meta.get("name"),
        "algorithm": meta.get("algorithm"),
        "objective": f"{meta.get('metric')} ({meta.get('mode')})",
        "trials": ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none",
        "spend": f"${spend['spent_usd']:.4f}{budget} in {spend['elapsed_s']:.0f} s",
        "stopped": spend["stop"]["reason"] if spend.get("stop") else "no (finished within budget)",
        "best": (f"#{best['number']} {best['trial']}: eval loss {best['eval_loss']:.4f}, "
                 + " ".join(f"{k}={format_value(v)}" for k, v in best["config"].items())) if best else "none",
    }
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Sweep {esc(str(meta.get('name')))}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>Sweep {esc(str(meta.get('name')))}</h1><table>",
        *[f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in summary.items()],
        "</table>",
    ]
    for title, png in _figures(rows, spend, result.trials).items():
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' src='data:image/png;base64,{png}'>")
    keys = sorted({k for r in rows for k in r["config"]})
    head = ["rank", "trial", "status", "eval loss", "steps", "cost (USD)", *keys, "adapter"]
    parts.append("<h2>Leaderboard</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>")
    for r in rows:
        cells = [r["rank"], f"#{r['number']} {r['trial']}", r["status"] + (f" at {r['pruned_at']}" if r["pruned_at"] else ""),
                 f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-", f"{r['steps']}/{r['total_steps']}",
                 f"{r['cost_usd']:.5f}", *[format_value(r["config"].get(k, "")) for k in keys], r["adapter_path"] or "-"]
        parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    parts.append("</table></body></html>")
    path = result.report
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
