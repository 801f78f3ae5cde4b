"""Spend accounting and budget enforcement: one ledger per sweep, kept current by a Tune callback.

``SpendLedger`` (persisted as ``spend.json``) is the only place spend is computed: a trial costs
its hourly rate x the wall time it held resources (Tune RUNNING: start-up, training, restarts after
preemption), summed over segments across pauses, PBT exploits and sweep resumes. Around it:

- ``SpendTracker`` (ray_tune.Callback) syncs the ledger with Tune's trials every loop step and result;
- ``BudgetGate`` (Searcher wrapper) lets a new trial start only if its projected cost still fits;
- ``BudgetStopper`` (ray_tune.Stopper) ends the sweep once spend or time reaches the budget: it raises
  the sweep's ``train.stop.StopSignal`` so every running trial checkpoints at the step it reached and
  finishes, and lets Tune kill what still runs ``budget.stop_grace_s`` later.

The dollar stop is decided early by what the running trials may spend until then (one reporting
interval plus the grace period), so final spend stays within the budget plus one interval's cost.
They run in the sweep driver and find the ledger through the sweep's session (``tune.sweep_session``), since
Tune pickles searchers, schedulers and callbacks into its experiment state and restores copies on resume.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.tune as ray_tune
from ray.tune.search import Searcher

from ftune.atomic_files import write_text_atomic
from ftune.sweep_result import SPEND_FILE
from tune.config import BudgetConfig
from tune.sweep_session import SweepSession

FINISHED_STATUSES = ("completed", "pruned", "stopped_budget", "stopped", "error")
"""Leaderboard statuses of a trial that will not run again."""
ACTIVE_STATUSES = ("pending", "running", "paused", "interrupted")
"""Statuses of a trial that started and may still run (and spend)."""


@dataclass
class TrialSpend:
    """What one trial did and cost."""

    trial_id: str
    """Tune trial id (also the name of its first training run)."""
    number: int
    """1-based order in which the sweep started it."""
    rate_usd_per_h: float
    """Dollars per hour while it holds resources."""
    segments: list[list[float]] = field(default_factory=list)
    """[start, end] spans it held resources, on the ledger's monotonic clock of the session that ran them
    (end advances while it runs); only their lengths mean anything across sessions."""
    status: str = "pending"
    """pending, running, paused, interrupted, completed, pruned, stopped_budget, stopped (by the user) or error."""
    config: dict[str, Any] = field(default_factory=dict)
    """Its Tune config (sampled parameters; PBT updates it on exploit)."""
    step: int = 0
    """Last optimizer step reported."""
    total_steps: int = 0
    """Steps of a full run."""
    metric: float | None = None
    """Last reported objective value."""
    eval_loss: float | None = None
    """Last reported eval loss."""
    run: str = ""
    """Current training run (its directory under the sweep's trials/)."""
    runs: list[str] = field(default_factory=list)
    """Every training run of the trial, in order (PBT exploits start new ones)."""
    checkpoint_path: str | None = None
    """Last checkpoint the run reported."""
    pruned_at: int | None = None
    """Step at which early stopping ended it."""
    error: str | None = None
    """Why it failed."""

    @property
    def running(self) -> bool:
        """Whether it holds resources now."""
        return self.status == "running"

    def cost(self) -> float:
        """Dollars spent so far."""
        return self.rate_usd_per_h * sum(end - start for start, end in self.segments) / 3600.0

    def wall_s(self) -> float:
        """Seconds it held resources."""
        return sum(end - start for start, end in self.segments)


class SpendLedger:
    """Spend of one sweep: per-trial costs, the budget, and spend over time (``spend.json``).

    Durations come from ``clock`` (monotonic: a step of the wall clock never makes spend negative);
    every method taking ``now`` reads it on that clock, so tests drive time by hand.
    """

    def __init__(self, sweep_dir: str | Path, budget: BudgetConfig, *, rate_usd_per_h: float,
                 estimate_trial_s: float, report_interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.path = Path(sweep_dir) / SPEND_FILE
        self.budget = budget
        self.rate_usd_per_h = rate_usd_per_h
        self.estimate_trial_s = estimate_trial_s
        self.report_interval_s = report_interval_s
        self.trials: dict[str, TrialSpend] = {}
        self.history: list[list[float]] = []  # [elapsed_s, spend_usd]
        self.elapsed_before_s = 0.0
        self.session_start = clock()
        self.stop: dict[str, Any] | None = None
        self.exhausted = False  # no further trial fits (set where no searcher can say FINISHED)
        self._last_save = 0.0
        self.reconciled = False  # interrupted trials checked against the trials Tune restored (reconcile)

    @classmethod
    def open(cls, sweep_dir: str | Path, budget: BudgetConfig, **kwargs: Any) -> SpendLedger:
        """The sweep's ledger, continued from its spend.json when resuming.

        Args:
            sweep_dir: The local directory of spend.json.
        """
        ledger = cls(sweep_dir, budget, **kwargs)
        if ledger.path.is_file():
            ledger._load(json.loads(ledger.path.read_text()))
        return ledger

    @property
    def sweep_dir(self) -> Path:
        """The local directory of the sweep's files (spend.json, pbt_exploits.jsonl, ...)."""
        return self.path.parent

    def _load(self, data: dict[str, Any]) -> None:
        self.history = data.get("history", [])
        self.elapsed_before_s = float(data.get("elapsed_s", 0.0))
        for row in data.get("trials", []):
            row = {k: v for k, v in row.items() if k in TrialSpend.__dataclass_fields__}
            trial = TrialSpend(**row)
            if trial.status in ("running", "pending", "paused"):
                trial.status = "interrupted"  # the driver died; the last saved end of each segment stands
            self.trials[trial.trial_id] = trial
        self.stop = data.get("stop")  # a budget stop stands unless the budget was raised (tune.sweep.open_ledger)

    # -- figures -----------------------------------------------------------------------------

    def elapsed(self, now: float | None = None) -> float:
        """Seconds the sweep has run, earlier sessions included."""
        return self.elapsed_before_s + ((self.clock() if now is None else now) - self.session_start)

    def spend(self) -> float:
        """Dollars spent by every trial so far (open segments counted up to the last sync)."""
        return sum(t.cost() for t in self.trials.values())

    def active(self) -> list[TrialSpend]:
        """Trials started and not finished (pending, running, paused, or interrupted by a driver that died:
        a resumed sweep runs them again, so their projected cost stays reserved)."""
        return [t for t in self.trials.values() if t.status in ACTIVE_STATUSES]

    def projected_trial_usd(self) -> float:
        """Cost of one full trial: the mean of completed trials, else the configured estimate."""
        done = [t.cost() for t in self.trials.values() if t.status == "completed"]
        return sum(done) / len(done) if done else self.rate_usd_per_h * self.estimate_trial_s / 3600.0

    def projected_trial_s(self) -> float:
        """Wall seconds of one full trial: measured like ``projected_trial_usd``."""
        done = [t.wall_s() for t in self.trials.values() if t.status == "completed"]
        return sum(done) / len(done) if done else self.estimate_trial_s

    def interval_cost(self) -> float:
        """What the running trials spend in one reporting interval (the allowed overshoot)."""
        return sum(t.rate_usd_per_h for t in self.trials.values() if t.running) * self.report_interval_s / 3600.0

    def grace_cost(self) -> float:
        """What the running trials may spend finishing after a budget stop (``budget.stop_grace_s``)."""
        return sum(t.rate_usd_per_h for t in self.trials.values() if t.running) * self.budget.stop_grace_s / 3600.0

    # -- decisions ---------------------------------------------------------------------------

    def admit(self, trial_id: str, now: float | None = None) -> str:
        """Whether a new trial may start: ``start``, ``wait`` (maybe after running ones end) or ``finished``."""
        now = self.clock() if now is None else now
        b, active = self.budget, self.active()
        if self.stop is not None:
            return "finished"
        if b.max_trials is not None and len(self.trials) >= b.max_trials:
            return "finished"
        if b.time_s is not None and self.elapsed(now) + self.projected_trial_s() > b.time_s:
            return "finished"
        if b.usd is not None:
            projected = self.projected_trial_usd()
            committed = self.spend() + sum(max(0.0, projected - t.cost()) for t in active)
            if committed + projected > b.usd:
                return "wait" if active else "finished"
        self.trials[trial_id] = TrialSpend(
            trial_id, len(self.trials) + 1, self.rate_usd_per_h, status="pending", run=trial_id, runs=[trial_id]
        )
        return "start"

    def withdraw(self, trial_id: str) -> None:
        """Forget an admitted trial the searcher did not create after all."""
        trial = self.trials.get(trial_id)
        if trial is not None and not trial.segments:
            del self.trials[trial_id]

    def should_stop(self, now: float | None = None) -> str | None:
        """Why the sweep must stop now (dollar or time budget reached), or None."""
        now = self.clock() if now is None else now
        b = self.budget
        # Stopped trials may run for the grace period, and Tune checks between loop steps (about one
        # reporting interval): stop early by both so spend at the end stays within budget + one interval.
        if b.usd is not None and self.spend() >= b.usd - self.interval_cost() - self.grace_cost():
            return f"budget reached: spent ${self.spend():.4f} of ${b.usd:.4f}"
        grace_s = b.stop_grace_s if any(t.running for t in self.trials.values()) else 0.0
        if b.time_s is not None and self.elapsed(now) + grace_s >= b.time_s:
            return f"time budget reached: {self.elapsed(now):.0f} s of {b.time_s:.0f} s"
        if self.exhausted and not self.active():
            return f"no further trial fits the budget (spent ${self.spend():.4f})"
        return None

    def mark_stopped(self, reason: str, now: float) -> None:
        """Record a budget stop; the trials active now end as stopped_budget unless they complete first."""
        self.stop = {"reason": reason, "at": time.time(), "at_elapsed_s": self.elapsed(now), "spend_usd": self.spend(),
                     "interval_cost_usd": self.interval_cost(), "grace_s": self.budget.stop_grace_s,
                     "grace_cost_usd": self.grace_cost(), "stopped_trials": [t.trial_id for t in self.active()],
                     "killed_trials": []}

    def stop_settled(self, now: float) -> bool:
        """After a budget stop: True once no trial runs or the grace period is over (recording who is killed)."""
        assert self.stop is not None
        running = [t.trial_id for t in self.trials.values() if t.running]
        if running and self.elapsed(now) < self.stop.get("at_elapsed_s", 0.0) + self.stop.get("grace_s", 0.0):
            return False
        if running and not self.stop.get("killed_trials"):
            self.stop["killed_trials"] = running
            self.record(now)
        return True

    # -- syncing with Tune -------------------------------------------------------------------

    def reconcile(self, trials: list) -> None:
        """After a resume, settle the interrupted trials Tune's restored state does not know (all of ``trials``).

        Tune saves its state every few seconds: a trial the dead driver admitted (or even started) after the
        last save will never run again, so it must not stay reserved. One that never ran is forgotten; one
        that ran is stopped, its cost kept.
        """
        known = {trial.trial_id for trial in trials}
        for entry in list(self.trials.values()):
            if entry.status == "interrupted" and entry.trial_id not in known:
                if entry.segments:
                    entry.status, entry.error = "stopped", "lost with the sweep driver before Tune recorded it"
                else:
                    del self.trials[entry.trial_id]
        self.reconciled = True

    def recorded_ends(self, metric: str) -> dict[str, dict[str, Any]]:
        """The last reported result of every trial this ledger has finished, by trial id.

        A resumed Tune runs such a trial again when its state was saved before the trial ended. ``run_trial``
        reports this end at once instead of training on: a pruned, stopped or failed run would otherwise go on
        to its last step, and ``sync`` counts no time for a finished trial.
        """
        ends = {}
        for entry in self.trials.values():
            if entry.status in FINISHED_STATUSES:
                end: dict[str, Any] = {"step": entry.step, "total_steps": entry.total_steps}
                if entry.eval_loss is not None:
                    end["eval_loss"] = entry.eval_loss
                if entry.metric is not None:
                    end[metric] = entry.metric
                ends[entry.trial_id] = end
        return ends

    def sync(self, trials: list, now: float | None = None) -> bool:
        """Bring every trial's segments and status in line with Tune's; True if a status changed."""
        now = self.clock() if now is None else now
        changed = False
        for trial in trials:
            entry = self.trials.get(trial.trial_id)
            if entry is None:  # created before this ledger knew (e.g. restored from an older state)
                entry = self.trials[trial.trial_id] = TrialSpend(
                    trial.trial_id, len(self.trials) + 1, self.rate_usd_per_h, run=trial.trial_id, runs=[trial.trial_id]
                )
            entry.config = {k: v for k, v in trial.config.items() if not str(k).startswith("_")}
            tune_running = trial.status == "RUNNING"
            if tune_running:
                if not entry.running:
                    if entry.status in FINISHED_STATUSES:
                        continue
                    entry.segments.append([now, now])
                    entry.status, changed = "running", True
                entry.segments[-1][1] = now
                continue
            if entry.running:
                entry.segments[-1][1] = now
            status = self._final_status(entry, trial)
            if status != entry.status:
                entry.status, changed = status, True
                if status == "error":
                    entry.error = _error_text(trial)
        if changed or now - self._last_save >= 1.0:
            self.record(now)
        return changed

    def _final_status(self, entry: TrialSpend, trial) -> str:
        if entry.status in FINISHED_STATUSES:
            return entry.status  # a resumed sweep re-queues trials Tune had not yet seen finish
        if trial.status == "ERROR":
            return "error"
        if trial.status == "PAUSED":
            return "paused"
        if trial.status == "PENDING":
            return entry.status if entry.status == "interrupted" else "pending"
        # TERMINATED: by its own end, early stopping, the budget, or the user (Ctrl-C)
        if entry.total_steps and entry.step >= entry.total_steps:
            return "completed"
        if entry.pruned_at is not None:
            return "pruned"
        return "stopped_budget" if self.stop is not None else "stopped"

    def on_result(self, trial_id: str, result: dict[str, Any], metric: str) -> None:
        """Record a trial's latest reported metrics."""
        entry = self.trials[trial_id]
        entry.step = int(result.get("step", entry.step))
        entry.total_steps = int(result.get("total_steps", entry.total_steps))
        if result.get("eval_loss") is not None and math.isfinite(result["eval_loss"]):
            entry.eval_loss = float(result["eval_loss"])
        if result.get(metric) is not None and math.isfinite(result[metric]):
            entry.metric = float(result[metric])
        if result.get("checkpoint_path"):
            entry.checkpoint_path = str(result["checkpoint_path"])

    def mark_pruned(self, trial_id: str, step: int) -> None:
        """Early stopping ended the trial at ``step``."""
        if trial_id in self.trials:
            self.trials[trial_id].pruned_at = step

    def set_run(self, trial_id: str, run: str) -> None:
        """A trial continues in a new training run (PBT exploit)."""
        entry = self.trials[trial_id]
        entry.run = run
        if run not in entry.runs:
            entry.runs.append(run)

    # -- persistence -------------------------------------------------------------------------

    def record(self, now: float) -> None:
        """Add a point to the spend over time and save."""
        self.history.append([round(self.elapsed(now), 3), self.spend()])
        self.save(now)

    def save(self, now: float | None = None) -> None:
        """Write spend.json atomically."""
        now = self.clock() if now is None else now
        self._last_save = now
        data = self.to_json(now)
        write_text_atomic(self.path, json.dumps(data, indent=2, default=str))

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The ledger as written to spend.json."""
        now = self.clock() if now is None else now
        trials = sorted(self.trials.values(), key=lambda t: t.number)
        return {
            "currency": "USD",
            "budget_usd": self.budget.usd,
            "budget_time_s": self.budget.time_s,
            "max_trials": self.budget.max_trials,
            "spent_usd": self.spend(),
            "elapsed_s": self.elapsed(now),
            "trials_started": len(self.trials),
            "rate_usd_per_h": self.rate_usd_per_h,
            "projected_trial_usd": self.projected_trial_usd(),
            "report_interval_s": self.report_interval_s,
            "stop": self.stop,
            "trials": [{**asdict(t), "cost_usd": t.cost(), "wall_s": t.wall_s()} for t in trials],
            "history": self.history[-5000:],
        }


def _error_text(trial) -> str | None:
    path = getattr(trial, "error_file", None) or getattr(getattr(trial, "run_metadata", None), "error_filename", None)
    try:
        text = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        text = []
    return text[-1] if text else "failed (see the trial's error.txt under tune/)"


class SpendTracker(ray_tune.Callback):
    """Keeps the ledger in step with Tune: segments every loop step, metrics on every result."""

    def __init__(self, sweep_uri: str, metric: str):
        self.sweep_uri = sweep_uri
        self.metric = metric

    @property
    def ledger(self) -> SpendLedger:
        """The sweep's ledger."""
        return SweepSession.of(self.sweep_uri).ledger

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        """Advance running trials' segments (the first time, settle trials a dead driver left behind)."""
        if not self.ledger.reconciled:
            self.ledger.reconcile(trials)
        self.ledger.sync(trials)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Close the segments of trials Tune just stopped or paused."""
        self.ledger.sync(trials)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        """Record the trial's metrics."""
        self.ledger.sync(trials)
        self.ledger.on_result(trial.trial_id, result, self.metric)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        """Record the final status."""
        self.ledger.sync(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        """Record the failure."""
        self.ledger.sync(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Final sync and save."""
        self.ledger.sync(trials)
        self.ledger.record(self.ledger.clock())


class BudgetStopper(ray_tune.Stopper):
    """Ends the sweep when spend or elapsed time reaches the budget: trials checkpoint and finish, then Tune stops."""

    def __init__(self, sweep_uri: str):
        self.sweep_uri = sweep_uri

    def __call__(self, trial_id: str, result: dict) -> bool:
        """Single trials are never stopped here (ASHA and the budget decide)."""
        return False

    def stop_all(self) -> bool:
        """Checked every Tune loop step: once the budget is spent, signal the trials to checkpoint and
        finish; True (Tune stops the rest) when none runs any more or the grace period is over."""
        session = SweepSession.of(self.sweep_uri)
        ledger = session.ledger
        now = ledger.clock()
        if ledger.stop is None:
            for trial in ledger.active():  # count the time since the last sync
                if trial.running:
                    trial.segments[-1][1] = now
            reason = ledger.should_stop(now)
            if reason is None:
                return False
            session.request_stop(reason, now)
        return ledger.stop_settled(now)


class BudgetGate(Searcher):
    """Wraps a Searcher: a new trial is suggested only if its projected cost fits the budget left."""

    def __init__(self, searcher: Searcher, sweep_uri: str):
        self.searcher = searcher
        self.sweep_uri = sweep_uri
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Delegated to the wrapped searcher."""
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Concurrency is left to the ConcurrencyLimiter around this gate."""
        return False

    def suggest(self, trial_id: str) -> dict | str | None:
        """The wrapped searcher's suggestion if the trial fits; None to wait; FINISHED when nothing more fits."""
        ledger = SweepSession.of(self.sweep_uri).ledger
        decision = ledger.admit(trial_id)
        if decision == "wait":
            return None
        if decision == "finished":
            return Searcher.FINISHED
        suggestion = self.searcher.suggest(trial_id)
        if suggestion is None or suggestion == Searcher.FINISHED:
            ledger.withdraw(trial_id)
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Delegated."""
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Delegated."""
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        """Delegated."""
        self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict:
        """Nothing of its own: the ledger persists itself."""
        return {"sweep_uri": self.sweep_uri}

    def set_state(self, state: dict) -> None:
        """Restore the sweep's location."""
        self.sweep_uri = state["sweep_uri"]

    def save(self, checkpoint_path: str) -> None:
        """Delegated."""
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        """Delegated."""
        self.searcher.restore(checkpoint_path)

    def on_pause(self, trial_id: str) -> None:
        """Delegated."""
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        """Delegated."""
        self.searcher.on_unpause(trial_id)
