"""Hand-off from a sweep to serving: pick the best adapters from a sweep directory's leaderboard.

A sweep directory (``ftune.sweep_result.SweepResult``) holds ``leaderboard.json`` (a list of rows, best
first, each with at least ``trial``, ``eval_loss``, ``status`` and ``adapter_path``) and ``best/adapter/``
(the winner's adapter). Served adapters are named ``trial-<id>`` so a client can tell them apart.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ftune.errors import UserError
from ftune.sweep_result import LEADERBOARD_JSON, SweepResult

FAILED_STATUSES = frozenset({"error", "errored", "failed", "failure", "crashed"})
"""Row statuses whose adapter is never served."""


def adapter_name(trial: Any) -> str:
    """The OpenAI model id of a trial's adapter: ``trial-<id>`` with unsafe characters replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", str(trial)).strip("-.") or "unnamed"
    return f"trial-{safe}"[:64]


def _usable(row: dict[str, Any], sweep: SweepResult) -> tuple[Path | None, str]:
    """(adapter directory, "") for a servable row, else (None, why not)."""
    status = str(row.get("status", "")).lower()
    if status in FAILED_STATUSES:
        return None, f"status {row.get('status')!r}"
    loss = row.get("eval_loss")
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
        return None, f"eval_loss {loss!r}"
    if not row.get("adapter_path"):
        return None, "no adapter_path"
    path = sweep.adapter_dir(row["adapter_path"])
    if not path.is_dir():
        return None, f"adapter_path {str(path)!r} does not exist"
    return path, ""


def adapters_from_sweep(sweep_dir: str | Path, top_k: int = 1) -> dict[str, str]:
    """The ``top_k`` best servable adapters of a sweep, as {name: local directory}, best first.

    With ``top_k == 1`` the sweep's ``best/adapter/`` is used when it exists.

    Raises:
        UserError: the directory or leaderboard is missing or malformed, or fewer than ``top_k``
            trials have a servable adapter (the message lists why each skipped trial was skipped).
    """
    sweep = SweepResult.open(sweep_dir)
    board = sweep.leaderboard_json
    if not board.is_file():
        raise UserError(f"--sweep {sweep.local_dir}: no {LEADERBOARD_JSON} there; is it a sweep directory?")
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    try:
        rows = json.loads(board.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{board} is not valid JSON: {e}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "trial" in r for r in rows):
        raise UserError(
            f"{board} must be a list of rows, each with trial, eval_loss, status and adapter_path"
        )
    chosen: dict[str, str] = {}
    skipped = []
    for row in rows:
        path, why = _usable(row, sweep)
        if path is None:
            skipped.append(f"trial {row['trial']}: {why}")
            continue
        name = adapter_name(row["trial"])
        if name in chosen:
            raise UserError(f"{board}: two rows for trial {row['trial']!r}")
        chosen[name] = str(path)
        if len(chosen) == top_k:
            break
    if len(chosen) < top_k:
        detail = f" (skipped {'; '.join(skipped)})" if skipped else ""
        raise UserError(
            f"{board}: asked for the top {top_k} adapters but only {len(chosen)} trial(s) have one{detail}"
        )
    if top_k == 1 and sweep.best_adapter.is_dir():
        return {name: str(sweep.best_adapter) for name in chosen}
    return chosen
