"""The sweep driver's own files, kept with the sweep in storage so ``--resume`` works from the bucket on any machine.

With ``storage.path`` on s3:// the trials' runs go to ``<storage>/sweeps/<name>/trials/`` while the driver
works in a local directory (``FTUNE_HOME/sweeps/<name>``). ``SweepState`` copies the driver's part next to
the trials::

    sweep.json            what --resume reads
    spend.json            the ledger: spend carries on from it
    optuna.db             the Optuna study, as a consistent snapshot (SQLite's backup API)
    tune/                 Ray Tune's experiment state (Tuner.restore)
    pbt_exploits.jsonl, leaderboard.json/csv, report.html, best/     the sweep's results

``SweepStateSync`` (a Tune callback) pushes them when a trial reports a checkpoint (at most every
``min_interval_s``) and whenever a trial ends; the driver pushes once more when the sweep ends. ``pull``
fetches them into the local directory of the machine that resumes. Tune pickles the sweep's searcher
into its state, Optuna study included: ``SweepStudyStorage`` finds the study again in the resuming
machine's directory, wherever that is, and ``SweepOptunaSearch`` squares the study with the Tune state
it resumes from (the study is written at once, Tune's state every few seconds).
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs as pafs
import ray.tune as ray_tune
from pyarrow import ArrowException
from ray.tune.search.optuna import OptunaSearch

from ftune.compat.optuna_private import (
    live_trial,
    optuna_search_study,
    optuna_search_trials,
    rdb_storage_state_with_url,
)
from ftune.errors import UserError
from ftune.storage import Storage
from ftune.sweep_result import BEST_DIR, LEADERBOARD_CSV, LEADERBOARD_JSON, REPORT_FILE, SPEND_FILE
from tune.sweep_session import SweepSession

log = logging.getLogger("ftune.tune")
SWEEP_FILE = "sweep.json"
OPTUNA_DB = "optuna.db"
FILES = (SWEEP_FILE, SPEND_FILE, "pbt_exploits.jsonl", LEADERBOARD_JSON, LEADERBOARD_CSV, REPORT_FILE)
"""Single files of the driver's directory kept in storage."""
DIRS = ("tune", BEST_DIR)
"""Directories of the driver's directory kept in storage."""
LOST_WITH_DRIVER = "lost_with_driver"
"""User attribute of a study trial told failed on resume: created after Tune's last save, it never ran."""


@dataclass(frozen=True)
class SweepState:
    """The driver's directory of a sweep and the sweep's place in storage."""

    local_dir: Path
    """Where the driver reads and writes the files."""
    storage: Storage
    """The sweep's root in storage (``<storage.path>/sweeps/<name>``)."""

    def push(self) -> None:
        """Copy the driver's files to storage (each file whole; the study as a consistent snapshot)."""
        for name in FILES:
            if (self.local_dir / name).is_file():
                self.storage.upload_file(self.local_dir / name, name)
        if (self.local_dir / OPTUNA_DB).is_file():
            with tempfile.TemporaryDirectory(prefix="ftune-optuna-") as tmp:
                snapshot = Path(tmp) / OPTUNA_DB
                _backup(self.local_dir / OPTUNA_DB, snapshot)
                self.storage.upload_file(snapshot, OPTUNA_DB)
        fs, _ = self.storage.filesystem()
        for name in DIRS:
            if (self.local_dir / name).is_dir():
                fs.create_dir(self.storage.path(name), recursive=True)
                # One thread: pyarrow's threaded uploads to S3 are not safe (apache/arrow#32372).
                pafs.copy_files(str(self.local_dir / name), self.storage.path(name), source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs, use_threads=False)

    def pull(self) -> bool:
        """Replace the driver's files with the copies in storage; False if storage holds no sweep there."""
        if not self.storage.exists(SWEEP_FILE):
            return False
        self.local_dir.mkdir(parents=True, exist_ok=True)
        for name in (*FILES, OPTUNA_DB):
            if not self.storage.download_file(self.local_dir / name, name):
                (self.local_dir / name).unlink(missing_ok=True)
        for name in DIRS:
            shutil.rmtree(self.local_dir / name, ignore_errors=True)  # no state of another session mixed in
            if self.storage.exists(name):
                self.storage.download_dir(self.local_dir / name, name)
        return True


def pull_sweep(uri: str) -> Path:
    """Fetch a sweep's driver files from storage into this machine's ``FTUNE_HOME/sweeps/<name>``; return it.

    The endpoint of an S3-compatible store comes from ``AWS_ENDPOINT_URL``, as for every ftune command.
    """
    from ftune.builtin_assets import ftune_home

    storage = Storage(uri.rstrip("/"))
    try:
        name = json.loads(storage.read_text(SWEEP_FILE))["name"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--resume {uri}: no readable {SWEEP_FILE} there ({e}); give the sweep's location, "
                        "<storage.path>/sweeps/<name>") from e
    local = ftune_home() / "sweeps" / name
    SweepState(local, storage).pull()
    return local


def _backup(db: Path, out: Path) -> None:
    """A consistent copy of a SQLite database another connection may be writing."""
    source, target = sqlite3.connect(f"file:{db}?mode=ro", uri=True), sqlite3.connect(out)
    try:
        with target:
            source.backup(target)
    finally:
        source.close()
        target.close()


class SweepStateSync(ray_tune.Callback):
    """Pushes the sweep's driver files to storage whenever a trial changes status (starts, ends, pauses) and,
    while trials report checkpoints, at most every ``min_interval_s``.

    It pushes at the end of a Tune step, after ``SpendTracker`` has brought the ledger up to date (Tune calls
    ``on_trial_complete`` while the trial still counts as running). A push that fails is logged and retried
    ``min_interval_s`` later: storage trouble never fails a trial.
    """

    def __init__(self, sweep_uri: str, storage: Storage, min_interval_s: float = 10.0):
        self.sweep_uri = sweep_uri
        self.storage = storage
        self.min_interval_s = min_interval_s
        self._pushed_statuses: dict[str, str] | None = None
        self._checkpointed = False
        self._failed = False
        self._last_attempt = float("-inf")

    def push(self) -> bool:
        """Push now; False (and a warning) if storage refused."""
        self._last_attempt = time.monotonic()
        local = SweepSession.of(self.sweep_uri).ledger.sweep_dir
        try:
            SweepState(local, self.storage).push()
        except (OSError, ArrowException) as e:
            log.warning("could not keep the sweep's state in %s (retrying in %.0f s): %s", self.sweep_uri,
                        self.min_interval_s, e)
            return False
        return True

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        """Note a reported checkpoint (pushed at the end of the step, if the last push is old enough)."""
        if result.get("checkpoint_path"):
            self._checkpointed = True

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Push if a trial's status changed since the last push, or a checkpoint came in a while after it."""
        statuses = {t.trial_id: t.status for t in SweepSession.of(self.sweep_uri).ledger.trials.values()}
        recent = time.monotonic() - self._last_attempt < self.min_interval_s
        if self._failed and recent:
            return  # back off after a failed push
        if statuses == self._pushed_statuses and not (self._checkpointed and not recent):
            return
        self._failed = not self.push()
        if not self._failed:
            self._pushed_statuses, self._checkpointed = statuses, False


class SweepStudyStorage(optuna.storages.RDBStorage):
    """The sweep's Optuna study in ``<driver directory>/optuna.db``, found again there after Tune unpickles it.

    Tune restores the searcher (and with it this storage) from pickles; the driver directory of a sweep
    resumed on another machine is elsewhere, so the database path is taken from the sweep's open ledger.
    """

    def __init__(self, sweep_uri: str, sweep_dir: Path):
        self.sweep_uri = sweep_uri
        super().__init__(f"sqlite:///{Path(sweep_dir) / OPTUNA_DB}")

    def __setstate__(self, state: dict[str, Any]) -> None:
        session = SweepSession.find(state["sweep_uri"])
        if session is not None:
            state = rdb_storage_state_with_url(state, f"sqlite:///{session.ledger.sweep_dir / OPTUNA_DB}")
        super().__setstate__(state)


class SweepOptunaSearch(OptunaSearch):
    """Ray Tune's ``OptunaSearch``, squared on resume with the Tune state the sweep resumes from.

    The study's database takes every suggestion and every trial's end the moment Tune passes them on; Tune
    saves its own state (which trials there are and which ended, this searcher and its sampler pickled) every
    few seconds. A driver that dies in between leaves a study ahead of that state, and the resumed sweep meets:

    - trials Tune restores as unfinished that the study has already told finished. Tune runs them again
      (their runs find their summaries and report the end at once), but Optuna refuses any report on a
      finished trial (``UpdateFinishedTrialError``, which would fail the sweep). Their reports are dropped:
      the study keeps what it was told the first time;
    - trials the study created after Tune's last save. Tune never heard of them and will not run them (the
      budget's ledger forgets them: ``SpendLedger.reconcile``); left running, they would stay so in the study
      for good. The restored sampler is the one from before they were suggested, so a random or TPE sampler
      draws them again for Tune's next trials: they are told failed (user attribute ``lost_with_driver``).
      A grid sampler would count a failed point as visited and never come back to it: its lost trials are
      handed out again instead, oldest first, under the ids Tune gives its next trials.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ended_before_resume: set[str] = set()
        """Tune trial ids whose end the study had when the sweep resumed."""
        self.unclaimed: list[int] = []
        """Numbers of grid trials created after Tune's last save, not yet handed out again."""

    def restore(self, checkpoint_path: str) -> None:
        """Tune's pickled state, then the study squared with it."""
        super().restore(checkpoint_path)
        running, study, trials = optuna.trial.TrialState.RUNNING, optuna_search_study(self), optuna_search_trials(self)
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        self.ended_before_resume = {tid for tid, t in trials.items() if states.get(t.number, running).is_finished()}
        known = {t.number for t in trials.values()}
        lost = sorted(n for n, state in states.items() if state == running and n not in known)
        if isinstance(study.sampler, optuna.samplers.GridSampler):
            self.unclaimed = lost
            return
        for number in lost:
            live_trial(study, number).set_user_attr(LOST_WITH_DRIVER, True)
            study.tell(number, state=optuna.trial.TrialState.FAIL)
            log.info("study trial %d was created after Tune last saved its state and never runs: told failed", number)

    def suggest(self, trial_id: str) -> dict | None:
        """A grid trial Tune never recorded, if one is left; else a new one."""
        if self.unclaimed and trial_id not in optuna_search_trials(self):
            number = self.unclaimed.pop(0)
            optuna_search_trials(self)[trial_id] = live_trial(optuna_search_study(self), number)
            log.info("study trial %d, created after Tune last saved its state, runs as trial %s", number, trial_id)
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Passed on, unless the study had this trial's end before the resume."""
        if trial_id not in self.ended_before_resume:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Passed on, unless the study had this trial's end before the resume."""
        if trial_id not in self.ended_before_resume:
            super().on_trial_complete(trial_id, result=result, error=error)
