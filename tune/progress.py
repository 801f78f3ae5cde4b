"""Console progress of a sweep: one line per change (trial started, finished, pruned, failed, budget stop).

Tune's own reporter is turned off (verbose=0); this callback reads the spend ledger after the
``SpendTracker`` has synced it, so what it prints is what spend.json says.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import ray.tune as ray_tune

from tune.budget import SpendLedger, TrialSpend
from tune.space import SearchSpace
from tune.sweep_session import SweepSession


def say(message: str) -> None:
    """Print one sweep progress line."""
    print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", file=sys.stdout, flush=True)


def best_trial(ledger: SpendLedger, mode: str) -> TrialSpend | None:
    """The trial with the best reported objective so far (running ones included)."""
    scored = [t for t in ledger.trials.values() if t.metric is not None and math.isfinite(t.metric)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.metric)


class SweepProgress(ray_tune.Callback):
    """Prints a line whenever a trial changes state, with counts, spend against budget and the best so far."""

    def __init__(self, sweep_uri: str, space: SearchSpace, base_r: int, metric: str, mode: str):
        self.sweep_uri = sweep_uri
        self.space = space
        self.base_r = base_r
        self.metric = metric
        self.mode = mode
        self._seen: dict[str, str] = {}
        self._resumed: set[str] = set()
        self._stop_reported = False

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Report every status change since the last step."""
        ledger = SweepSession.of(self.sweep_uri).ledger
        if ledger.stop is not None and not self._stop_reported:
            self._stop_reported = True
            stopped = ledger.stop["stopped_trials"]
            say(f"{ledger.stop['reason']}; stopping {len(stopped)} running trial(s) with the checkpoints they have")
        for trial in sorted(ledger.trials.values(), key=lambda t: t.number):
            if self._seen.get(trial.trial_id) == trial.status:
                continue
            previous = self._seen.get(trial.trial_id)
            self._seen[trial.trial_id] = trial.status
            if trial.status in ("pending", "paused", "interrupted"):
                if previous is not None or trial.status == "interrupted":
                    self._resumed.add(trial.trial_id)
                continue  # waiting: the next line (started, resumed) says what happened
            say(f"{self._describe(trial)} | {self._totals(ledger)}")

    def _describe(self, trial: TrialSpend) -> str:
        head = f"#{trial.number} {trial.trial_id}"
        value = f"{self.metric} {trial.metric:.4f}" if trial.metric is not None else f"no {self.metric} yet"
        if trial.status == "running":
            verb = "resumed" if trial.trial_id in self._resumed or trial.runs[1:] else "started"
            return f"{head} {verb}: {self.space.describe(trial.config, self.base_r)}"
        if trial.status == "completed":
            return f"{head} completed {trial.step} steps: {value}, ${trial.cost():.4f}"
        if trial.status == "pruned":
            return f"{head} pruned at step {trial.pruned_at}: {value}, ${trial.cost():.4f}"
        if trial.status == "stopped_budget":
            return f"{head} stopped by the budget at step {trial.step}: {value}, ${trial.cost():.4f}"
        if trial.status == "stopped":
            return f"{head} stopped at step {trial.step}: {value}, ${trial.cost():.4f}"
        if trial.status == "error":
            return f"{head} failed: {trial.error}"
        return f"{head} {trial.status}"

    def _totals(self, ledger: SpendLedger) -> str:
        counts: dict[str, int] = {}
        for t in ledger.trials.values():
            counts[t.status] = counts.get(t.status, 0) + 1
        budget = f" / ${ledger.budget.usd:.4f}" if ledger.budget.usd is not None else ""
        best = best_trial(ledger, self.mode)
        best_text = f"best {self.metric} {best.metric:.4f} (#{best.number})" if best else "no result yet"
        return (f"running {counts.get('running', 0)}, done {counts.get('completed', 0)}, "
                f"pruned {counts.get('pruned', 0)}, errors {counts.get('error', 0)} | "
                f"spend ${ledger.spend():.4f}{budget} | {best_text}")
