"""The sweep driver's files kept with the sweep in storage: what is pushed and when, what a resume pulls, and the
Optuna study found again in the resuming machine's directory. A second local directory stands in for the bucket."""

from __future__ import annotations

import pickle
import sqlite3

import pytest
from ray.tune.experiment import Trial

from ftune.storage import Storage
from tune.budget import SpendLedger, SpendTracker
from tune.config import BudgetConfig
from tune.sweep_session import SweepSession
from tune.sweep_state import SweepState, SweepStateSync, SweepStudyStorage


def driver_files(local):
    local.mkdir(parents=True, exist_ok=True)
    (local / "sweep.json").write_text('{"name": "s"}')
    (local / "tune" / "trial1").mkdir(parents=True)
    (local / "tune" / "experiment_state-1.json").write_text("{}")
    (local / "tune" / "trial1" / "result.json").write_text("{}")
    (local / "trials").mkdir()  # the runs: in storage already, never pushed
    (local / "trials" / "big.bin").write_bytes(b"x")
    db = sqlite3.connect(local / "optuna.db")
    with db:
        db.execute("create table t (v integer)")
        db.execute("insert into t values (1)")
    return db


def test_push_and_pull_round_trip(tmp_path):
    machine1, bucket, machine2 = tmp_path / "m1", tmp_path / "bucket", tmp_path / "m2"
    open_db = driver_files(machine1)  # the study stays open, as in a running sweep
    with open_db:
        open_db.execute("insert into t values (2)")
    SweepState(machine1, Storage(str(bucket))).push()
    assert sorted(p.relative_to(bucket).as_posix() for p in bucket.rglob("*") if p.is_file()) == [
        "optuna.db", "sweep.json", "tune/experiment_state-1.json", "tune/trial1/result.json"]
    assert [r[0] for r in sqlite3.connect(bucket / "optuna.db").execute("select v from t order by v")] == [1, 2]
    (machine2 / "tune").mkdir(parents=True)
    (machine2 / "tune" / "experiment_state-0.json").write_text("{}")  # another session's state: must go
    assert SweepState(machine2, Storage(str(bucket))).pull()
    assert sorted(p.name for p in (machine2 / "tune").iterdir()) == ["experiment_state-1.json", "trial1"]
    assert (machine2 / "sweep.json").read_text() == '{"name": "s"}'
    assert not SweepState(tmp_path / "m3", Storage(str(tmp_path / "empty"))).pull()


def stub(trial_id: str, status: str) -> Trial:
    trial = Trial("run_trial", config={}, trial_id=trial_id, stub=True)
    trial.status = status
    return trial


def test_sync_pushes_on_status_changes_and_throttles_checkpoints(tmp_path):
    local, bucket = tmp_path / "local", tmp_path / "bucket"
    driver_files(local)
    uri = str(bucket)  # the sweep's key is where it lives in storage, not the driver's directory
    ledger = SpendLedger.open(local, BudgetConfig(), rate_usd_per_h=36.0, estimate_trial_s=10.0, report_interval_s=0.5)
    SweepSession.begin(uri, ledger)
    tracker, sync = SpendTracker(uri, "eval_loss"), SweepStateSync(uri, Storage(uri), min_interval_s=3600.0)
    ledger.admit("a")
    a = stub("a", "RUNNING")

    def step() -> bool:
        """One Tune step's end; True if it pushed (spend.json in the bucket changed)."""
        before = (bucket / "spend.json").read_text() if (bucket / "spend.json").exists() else None
        tracker.on_step_end(0, [a])
        sync.on_step_end(0, [a])
        return (bucket / "spend.json").exists() and (bucket / "spend.json").read_text() != before

    assert step()  # a started
    ledger.save()
    assert not step()  # nothing changed
    sync.on_trial_result(0, [a], a, {"checkpoint_path": "x"})
    assert not step()  # a checkpoint, but the last push is recent
    sync.min_interval_s = 0.0
    assert step()
    sync.min_interval_s = 3600.0
    sync.on_trial_complete(0, [a], a)  # Tune calls this while the trial still runs: nothing to push yet
    a.status = "TERMINATED"
    assert step()  # ... the step after, the ledger says stopped and that is pushed
    assert '"status": "stopped"' in (bucket / "spend.json").read_text()


def test_study_storage_follows_the_sweep_to_another_directory(tmp_path):
    import shutil

    uri = "s3://bucket/runs/sweeps/moved"
    (tmp_path / "m1").mkdir()
    pickled = pickle.dumps(SweepStudyStorage(uri, tmp_path / "m1"))
    shutil.rmtree(tmp_path / "m1")  # the first machine is gone
    (tmp_path / "m2").mkdir()
    SweepSession.begin(uri, SpendLedger.open(tmp_path / "m2", BudgetConfig(), rate_usd_per_h=1.0, estimate_trial_s=1.0,
                                             report_interval_s=1.0))
    moved = pickle.loads(pickled)  # what Tune does with the searcher when the sweep resumes elsewhere
    assert moved.url == f"sqlite:///{tmp_path / 'm2' / 'optuna.db'}"
    assert (tmp_path / "m2" / "optuna.db").is_file() and not (tmp_path / "m1" / "optuna.db").exists()


GRID = [1e-4, 1e-3, 3e-3, 1e-2]


@pytest.mark.parametrize("kind", ["random", "grid"])
def test_a_resumed_study_ahead_of_tunes_saved_state_is_squared_with_it(tmp_path, kind):
    """The driver dies after the study took trial a's end and a new suggestion c, but before Tune saved its state
    again: the resumed Tune runs a again and never runs c. Real Optuna, SQLite and Tune's own save/restore."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from tune.sweep_state import LOST_WITH_DRIVER, SweepOptunaSearch

    complete, fail, running = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING

    def searcher(cls, name: str):
        sampler = optuna.samplers.RandomSampler(seed=0) if kind == "random" else optuna.samplers.GridSampler({"lr": GRID}, seed=0)
        return cls(space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}, metric="eval_loss",
                   mode="min", sampler=sampler, study_name=name,
                   storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / f'{name}.db'}"))

    def result(loss: float, step: int) -> dict:
        return {"eval_loss": loss, "training_iteration": step}

    def study_trials(name: str) -> list:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / f'{name}.db'}").trials

    def died_ahead_of_tune(cls, name: str):
        """The first driver's run; then a searcher as Tune restores it (the Tuner's pickle + the last save)."""
        first = searcher(cls, name)
        assert first.suggest("a") and first.suggest("b")
        first.on_trial_result("a", result(2.0, 1))
        first.save(str(tmp_path / f"{name}.pkl"))  # Tune's last save of its state
        first.on_trial_result("a", result(1.5, 2))
        first.on_trial_complete("a", result(1.5, 2))
        first.on_trial_result("b", result(3.0, 1))
        assert first.suggest("c")
        resumed = pickle.loads(pickle.dumps(searcher(cls, name)))
        resumed.restore(str(tmp_path / f"{name}.pkl"))
        return resumed

    plain = died_ahead_of_tune(OptunaSearch, "plain")  # the premise: Ray's own searcher fails the resumed sweep
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        plain.on_trial_result("a", result(1.5, 2))

    resumed = died_ahead_of_tune(SweepOptunaSearch, "sweep")
    c_params = study_trials("sweep")[2].params
    resumed.on_trial_result("a", result(9.0, 2))  # a's run again: finds its summary, reports its end at once
    resumed.on_trial_complete("a", result(9.0, 2))
    resumed.on_trial_result("b", result(2.5, 2))  # b continues from its checkpoint
    resumed.on_trial_complete("b", result(1.2, 3))
    assert resumed.suggest("d") == c_params  # Tune's next trial: c's settings again (drawn again, or c itself)
    resumed.save(str(tmp_path / "again.pkl"))  # a state saved after the resume; then the driver dies again
    resumed.on_trial_result("d", result(1.1, 1))
    again = searcher(SweepOptunaSearch, "sweep")
    again.restore(str(tmp_path / "again.pkl"))
    again.on_trial_result("d", result(1.1, 1))  # d is Tune's and still running: reported again, not dropped
    again.on_trial_complete("d", result(1.0, 2))
    assert again.suggest("e")
    trials = study_trials("sweep")
    a, b = trials[:2]
    assert (a.state, a.value, a.intermediate_values) == (complete, 1.5, {1: 2.0, 2: 1.5})
    assert (b.state, b.value, b.intermediate_values) == (complete, 1.2, {1: 3.0, 2: 2.5})
    if kind == "random":  # c failed; d drew its settings again as a new trial
        c, d, e = trials[2:]
        assert (c.state, c.value, c.user_attrs) == (fail, None, {LOST_WITH_DRIVER: True})
        assert (d.state, d.value, d.intermediate_values, d.params) == (complete, 1.0, {1: 1.1}, c_params)
    else:  # c ran as Tune's d; every grid point is handed out once
        c, e = trials[2:]
        assert (c.state, c.value, c.intermediate_values, c.user_attrs) == (complete, 1.0, {1: 1.1}, {})
        assert sorted(t.params["lr"] for t in trials) == GRID
    assert e.state == running and not e.user_attrs
