"""The spend ledger: costs from wall time, admission of new trials, the budget stop, resume from spend.json."""

from __future__ import annotations

import json

import pytest
from ray.tune.experiment import Trial

from tune.budget import SpendLedger
from tune.config import BudgetConfig
from tune.leaderboard import leaderboard
from tune.report import pareto_front
from tune.sweep_session import SweepSession

RATE = 36.0  # $/h: one cent per second keeps the arithmetic readable


def ledger(tmp_path, clock=None, **budget) -> SpendLedger:
    extra = {"clock": clock} if clock is not None else {}
    book = SpendLedger.open(tmp_path, BudgetConfig(**budget), rate_usd_per_h=RATE, estimate_trial_s=10.0,
                            report_interval_s=0.5, **extra)
    return SweepSession.begin(tmp_path, book).ledger


def stub(trial_id: str, status: str, **config) -> Trial:
    trial = Trial("run_trial", config=config, trial_id=trial_id, stub=True)
    trial.status = status
    return trial


def test_cost_is_rate_times_running_wall_time_across_segments(tmp_path):
    book = ledger(tmp_path)
    assert book.admit("a", now=100.0) == "start"
    a = stub("a", "RUNNING", **{"train.lr": 1e-3})
    book.sync([a], now=100.0)
    book.sync([a], now=104.0)
    a.status = "PAUSED"
    book.sync([a], now=105.0)
    book.sync([a], now=200.0)  # paused: no cost
    a.status = "RUNNING"
    book.sync([a], now=200.0)
    book.sync([a], now=203.0)
    assert book.trials["a"].wall_s() == pytest.approx(8.0)
    assert book.spend() == pytest.approx(0.08)
    assert book.trials["a"].config == {"train.lr": 1e-3}


def test_admission_reserves_projected_cost_and_finishes_when_nothing_fits(tmp_path):
    book = ledger(tmp_path, usd=0.25)  # a projected trial costs 10 s = $0.10
    assert book.admit("a", now=0.0) == "start"
    assert book.admit("b", now=0.0) == "start"
    assert book.admit("c", now=0.0) == "wait"  # 0.2 committed + 0.1 > 0.25, and trials are active
    for trial_id in ("a", "b"):
        t = stub(trial_id, "RUNNING")
        book.sync([t], now=0.0)
        book.sync([t], now=4.0)
        t.status = "TERMINATED"
        book.on_result(trial_id, {"step": 5, "total_steps": 20, "eval_loss": 3.0}, "eval_loss")
        book.mark_pruned(trial_id, 5)  # what ASHA's STOP does
        book.sync([t], now=4.0)
    assert {t.status for t in book.trials.values()} == {"pruned"}
    interrupted = stub("z", "TERMINATED")  # ended short of its steps with no prune and no budget stop: Ctrl-C
    book.trials["z"] = type(book.trials["a"])("z", 9, RATE, segments=[[0.0, 1.0]], status="running", total_steps=20)
    book.sync([interrupted], now=1.0)
    assert book.trials.pop("z").status == "stopped"
    assert book.spend() == pytest.approx(0.08)
    assert book.admit("c", now=5.0) == "start"  # pruned early: their reservations are released
    assert book.admit("d", now=5.0) == "wait"
    book.trials.pop("c")
    book.trials["a"].segments[-1][1] = 20.0  # pretend a cost more: 0.24 spent
    assert book.admit("d", now=5.0) == "finished"


def test_budget_stop_leaves_a_grace_period_and_marks_trials_and_max_trials(tmp_path):
    book = ledger(tmp_path, usd=0.1, stop_grace_s=4.0, max_trials=2)  # one trial's grace period costs $0.04
    book.admit("a", now=0.0)
    a = stub("a", "RUNNING")
    book.sync([a], now=0.0)
    book.sync([a], now=5.0)
    assert book.should_stop(now=5.0) is None
    book.sync([a], now=5.6)  # $0.056: within the grace period's ($0.04) and one interval's ($0.005) cost of $0.1
    reason = book.should_stop(now=5.6)
    assert reason and "budget reached" in reason
    book.mark_stopped(reason, now=5.6)
    assert book.stop["grace_cost_usd"] == pytest.approx(0.04)
    assert book.stop["interval_cost_usd"] == pytest.approx(RATE * 0.5 / 3600)
    assert book.admit("b") == "finished"
    book.sync([a], now=7.0)  # told to stop, it checkpoints and finishes: still running, still paid for
    assert not book.stop_settled(now=7.0)
    a.status = "TERMINATED"
    book.sync([a], now=8.0)  # it ended on its own within the grace period
    assert book.stop_settled(now=8.0) and book.stop["killed_trials"] == []
    assert book.trials["a"].status == "stopped_budget"
    assert book.spend() == pytest.approx(0.08) and book.spend() <= 0.1 + book.stop["interval_cost_usd"]
    fresh = ledger(tmp_path / "other", max_trials=1)
    assert fresh.admit("x") == "start" and fresh.admit("y") == "finished"


def stopped_by_budget(tmp_path, trial: str):
    """A $0.10 ledger whose one running trial reached the budget at t=5.6 s and was asked to stop."""
    book = ledger(tmp_path, usd=0.1, stop_grace_s=4.0)
    book.admit(trial, now=0.0)
    running = stub(trial, "RUNNING")
    book.sync([running], now=0.0)
    book.sync([running], now=5.6)
    book.mark_stopped(book.should_stop(now=5.6), now=5.6)
    return book, running


def test_trials_still_running_when_the_grace_period_ends_are_killed(tmp_path):
    book, s = stopped_by_budget(tmp_path, "s")
    book.sync([s], now=9.5)
    assert not book.stop_settled(now=9.5)
    assert book.stop_settled(now=9.7) and book.stop["killed_trials"] == ["s"]  # Tune stops it now
    s.status = "TERMINATED"
    book.sync([s], now=9.7)
    assert book.trials["s"].status == "stopped_budget" and book.spend() == pytest.approx(0.097)


def test_time_budget_stop_leaves_the_grace_period_while_trials_run(tmp_path):
    book = ledger(tmp_path, time_s=100.0, stop_grace_s=10.0)
    book.session_start = 0.0
    assert book.should_stop(now=95.0) is None  # nothing runs: no grace period to leave
    book.admit("a", now=0.0)
    book.sync([stub("a", "RUNNING")], now=95.0)
    assert "time budget reached" in book.should_stop(now=95.0)


def test_resume_keeps_spend_and_closes_interrupted_segments(tmp_path):
    book = ledger(tmp_path, usd=1.0)
    book.admit("a", now=0.0)
    a = stub("a", "RUNNING")
    book.sync([a], now=10.0)
    book.sync([a], now=13.0)  # the driver dies after this save
    book.save(now=13.0)
    again = ledger(tmp_path, usd=1.0)
    assert again.trials["a"].status == "interrupted"
    assert again.spend() == pytest.approx(0.03)
    a2 = stub("a", "RUNNING")
    again.sync([a2], now=50.0)
    again.sync([a2], now=52.0)
    assert again.spend() == pytest.approx(0.05)
    assert len(again.trials["a"].segments) == 2
    saved = json.loads((tmp_path / "spend.json").read_text())
    assert saved["spent_usd"] == pytest.approx(0.05) and saved["trials"][0]["cost_usd"] == pytest.approx(0.05)


def test_resume_keeps_interrupted_trials_reserved(tmp_path):
    book = ledger(tmp_path, usd=0.25)  # a projected trial costs $0.10
    for trial_id in ("a", "b"):
        book.admit(trial_id, now=0.0)
        t = stub(trial_id, "RUNNING")
        book.sync([t], now=0.0)
        book.sync([t], now=3.0)
    book.save(now=3.0)  # the driver dies: $0.06 spent, both trials mid-run
    again = ledger(tmp_path, usd=0.25)
    assert {t.trial_id for t in again.active()} == {"a", "b"}
    # Both will run again: $0.06 + 2 x $0.07 still to come + $0.10 for a third is over $0.25.
    assert again.admit("c", now=0.0) == "wait"
    assert "c" not in again.trials


def test_resume_settles_interrupted_trials_tune_never_recorded(tmp_path):
    book = ledger(tmp_path, usd=1.0)
    for trial_id in ("kept", "ran", "admitted"):
        book.admit(trial_id, now=0.0)
    for trial_id in ("kept", "ran"):
        t = stub(trial_id, "RUNNING")
        book.sync([t], now=0.0)
        book.sync([t], now=2.0)
    book.save(now=2.0)  # the driver dies; Tune's last saved state knows only "kept"
    again = ledger(tmp_path, usd=1.0)
    assert {t.trial_id for t in again.active()} == {"kept", "ran", "admitted"}
    again.reconcile([stub("kept", "PENDING")])
    assert [t.trial_id for t in again.active()] == ["kept"]
    assert "admitted" not in again.trials  # never ran: forgotten
    assert again.trials["ran"].status == "stopped" and again.trials["ran"].cost() == pytest.approx(0.02)
    assert again.spend() == pytest.approx(0.04)


def test_resume_hands_the_recorded_ends_of_finished_trials_to_their_runs(tmp_path):
    """Tune's state may be older than the ledger: a trial the ledger has finished can be run again on resume.
    Its run gets the end the ledger recorded (for a pruned one: where it was pruned), not a fresh start."""
    book = ledger(tmp_path, usd=1.0)
    results = {"done": (20, 1.25), "pruned": (5, 2.5), "broken": (3, None), "mid": (7, 1.75)}
    for trial_id, (step, loss) in results.items():
        book.admit(trial_id, now=0.0)
        t = stub(trial_id, "RUNNING")
        book.sync([t], now=0.0)
        book.on_result(trial_id, {"step": step, "total_steps": 20, "eval_loss": loss, "eval_perplexity": loss}, "eval_perplexity")
    book.mark_pruned("pruned", 5)
    book.sync([stub("done", "TERMINATED"), stub("pruned", "TERMINATED"), stub("broken", "ERROR"), stub("mid", "RUNNING")],
              now=4.0)
    book.save(now=4.0)  # the driver dies with "mid" still running
    again = ledger(tmp_path, usd=1.0)
    assert {t.trial_id: t.status for t in again.trials.values()} == {
        "done": "completed", "pruned": "pruned", "broken": "error", "mid": "interrupted"}
    assert again.recorded_ends("eval_perplexity") == {
        "done": {"step": 20, "total_steps": 20, "eval_loss": 1.25, "eval_perplexity": 1.25},
        "pruned": {"step": 5, "total_steps": 20, "eval_loss": 2.5, "eval_perplexity": 2.5},
        "broken": {"step": 3, "total_steps": 20},
    }
    spent = again.spend()
    for trial_id, end in again.recorded_ends("eval_perplexity").items():  # what their runs report on resume
        again.sync([stub(trial_id, "RUNNING")], now=10.0)
        again.on_result(trial_id, end, "eval_perplexity")
        again.sync([stub(trial_id, "TERMINATED")], now=11.0)
    assert again.recorded_ends("eval_perplexity")["pruned"]["step"] == 5 and again.trials["pruned"].status == "pruned"
    assert again.spend() == pytest.approx(spent)


def test_resume_keeps_the_budget_stop(tmp_path):
    book, a = stopped_by_budget(tmp_path, "a")
    a.status = "TERMINATED"
    book.sync([a], now=6.0)
    book.save(now=6.0)
    again = ledger(tmp_path, usd=0.1, stop_grace_s=4.0)
    assert again.stop == json.loads((tmp_path / "spend.json").read_text())["stop"]
    assert again.stop["reason"].startswith("budget reached")
    assert again.admit("b", now=0.0) == "finished" and "b" not in again.trials
    assert again.stop_settled(now=0.0)  # nothing runs


class ManualClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self, start: float = 500.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_spans_use_the_monotonic_clock_not_the_wall_clock(tmp_path, monkeypatch):
    import time

    clock = ManualClock()
    book = ledger(tmp_path, clock=clock, usd=1.0)
    book.admit("a")
    a = stub("a", "RUNNING")
    book.sync([a])
    wall = iter([2_000_000_000.0, 2_000_000_000.0 - 3600.0])  # NTP steps the wall clock back an hour
    monkeypatch.setattr(time, "time", lambda: next(wall, 2_000_000_000.0 - 3600.0))
    clock.now += 2.0
    book.sync([a])
    assert book.trials["a"].wall_s() == pytest.approx(2.0) and book.spend() == pytest.approx(0.02)
    assert book.elapsed() == pytest.approx(2.0)
    (tmp_path / "default").mkdir()
    default = ledger(tmp_path / "default", usd=1.0)  # the real default clock, under the same wall-clock step
    wall = iter([2_000_000_000.0, 2_000_000_000.0 - 3600.0])
    default.admit("b")
    b = stub("b", "RUNNING")
    default.sync([b])
    default.sync([b])
    assert default.spend() >= 0.0 and default.trials["b"].wall_s() >= 0.0


def test_budget_stopper_reads_the_ledger_clock(tmp_path):
    from tune.budget import BudgetStopper

    clock = ManualClock()
    book = ledger(tmp_path, clock=clock, usd=0.1, stop_grace_s=4.0)
    book.admit("a")
    a = stub("a", "RUNNING")
    book.sync([a])
    stopper = BudgetStopper(str(tmp_path))
    clock.now += 5.0
    assert stopper.stop_all() is False and book.stop is None  # $0.05: not yet within grace + interval of $0.1
    clock.now += 0.6
    assert stopper.stop_all() is False  # the stop is declared; the trial gets its grace period
    assert book.stop["at_elapsed_s"] == pytest.approx(5.6) and book.spend() == pytest.approx(0.056)
    clock.now += 3.9
    assert stopper.stop_all() is False
    clock.now += 0.2
    assert stopper.stop_all() is True and book.stop["killed_trials"] == ["a"]


def test_leaderboard_order_and_pareto_front(tmp_path):
    from ftune.storage import Storage
    from tune.space import SearchSpace

    def row(tid, status, metric, cost):
        return {"trial_id": tid, "number": 1, "status": status, "metric": metric, "eval_loss": metric, "step": 5,
                "total_steps": 10, "cost_usd": cost, "wall_s": 1.0, "config": {}, "run": tid, "runs": [tid]}

    spend = {"trials": [row("err", "error", None, 0.1), row("slow", "completed", 2.0, 0.5),
                        row("pruned", "pruned", 3.0, 0.1), row("best", "completed", 1.5, 0.4), row("none", "stopped_budget", None, 0.0)]}
    rows = leaderboard(spend, Storage(str(tmp_path)), SearchSpace(()), 8, "eval_loss", "min")
    assert [r["trial"] for r in rows] == ["best", "slow", "pruned", "none", "err"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert pareto_front([(0.5, 2.0), (0.1, 3.0), (0.4, 1.5), (0.2, 3.5)]) == [(0.1, 3.0), (0.4, 1.5)]
