"""The sweep driver's files kept with the sweep in storage: what is pushed and when, what a resume pulls, and the
Optuna study found again in the resuming machine's directory. A second local directory stands in for the bucket."""

from __future__ import annotations

import pickle
import sqlite3

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
