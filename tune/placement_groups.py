"""The Train run inside each sweep trial: aborting it when Tune stops the trial, and removing what it leaves behind.

Tune stops a trial (ASHA, the budget) or pauses it (a PBT exploit) on the driver, and then either stops
the trial's actor or, since the sweep reuses trial actors (``reuse_actors``), keeps it for a later trial
without calling it: until that trial resets it, nothing in the trial's process learns of the stop. The
trial's Train run would keep its workers and their placement group meanwhile, training on, unbudgeted.
At the end of a sweep Tune kills the trial actors after a few seconds; the trial's Train controller dies
with its actor, but the placement group it reserved for its workers is scoped to the sweep's job and
outlives it (ftune's trainer starts no Ray Train PlacementGroupCleaner, train/trainer.py; that one polls
the state API every second per run). So each run's controller hands out

- its own actor handle, to the trial process (``TrialRun.mailbox``: one queue per trial process, kept
  across the trials it runs, each item tagged with its run): a trial stopped in its own process
  (Tune's ``cleanup``, a reset for the next trial) aborts its run gracefully (``abort_run``), which stops
  the workers and removes their placement group;
- the same handle and every placement group it reserves, to the sweep driver (``PlacementGroupRegistry``,
  held by the sweep's session): the moment Tune stops or pauses a trial the driver aborts the trial's run
  (``stop_runs``), telling the trial's process through its mailbox first, and removes the run's placement
  groups still there; when the sweep ends it removes every one left.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.tune as ray_tune
from ray.util.queue import Empty, Queue

from ftune.compat.ray_private import worker_group_placement_group
from ftune.compat.ray_private_hooks import ControllerCallback, WorkerGroupCallback
from tune.sweep_session import SweepSession


class RunHandoff(ControllerCallback, WorkerGroupCallback):
    """Runs in the Train controller: posts its handle to the trial and each placement group to the sweep.

    Ray Train runs callbacks of RunConfig that are not UserCallbacks as controller callbacks.
    """

    def __init__(self, trial_id: str, mailbox: RunMailbox, registry: Queue | None):
        self.trial_id = trial_id
        self.mailbox = mailbox
        self.registry = registry

    def after_controller_start(self, train_run_context) -> None:
        """Post the controller's own handle to the trial and to the sweep driver."""
        controller = ray.get_runtime_context().current_actor
        self.mailbox.post(controller)
        if self.registry is not None:
            self.registry.put((self.trial_id, StartedRun(controller, self.mailbox)))

    def after_worker_group_start(self, worker_group) -> None:
        """Post the placement group the workers run in to the sweep driver."""
        if self.registry is not None:
            group = worker_group_placement_group(worker_group)
            self.registry.put((self.trial_id, group))


ABORTED_BY_SWEEP = "aborted by the sweep"
"""Posted to a run's mailbox by the sweep driver before it aborts the run: the run's failure is the abort."""


@dataclass(frozen=True)
class RunMailbox:
    """One Train run's address in its trial process: the process's queue, and the run's tag on each item.

    A trial process keeps one queue (an actor) across the trials it runs, not one per run: a new actor is a
    new process, seconds of CPU at every trial's start. Items of the process's earlier runs, which ended,
    may still be in the queue: a run's reader drops what is not tagged with its run.
    """

    queue: Queue
    run: str
    """The run's tag (unique per run: a trial may run again in the same process)."""

    def post(self, payload: Any, timeout: float | None = None) -> None:
        """Post ``payload`` to the run (blocks while the queue's actor starts)."""
        self.queue.put((self.run, payload), timeout=timeout)

    def take(self, timeout: float | None = None) -> Any:
        """The next payload posted to this run, waiting up to ``timeout`` s (None: not at all).

        Raises:
            Empty: nothing for this run came in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                run, payload = self.queue.get_nowait()
            else:
                run, payload = self.queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            if run == self.run:
                return payload


@dataclass(frozen=True)
class StartedRun:
    """A trial's Train run as the sweep driver knows it."""

    controller: Any
    """The run's Train controller (an actor handle)."""
    mailbox: RunMailbox
    """The run's mailbox in its trial process."""


@dataclass
class TrialRun:
    """The Train run a trial process started (one per trial actor)."""

    mailbox: RunMailbox
    """Where the run's controller posts its handle (and the sweep driver ``ABORTED_BY_SWEEP``)."""
    ended: threading.Event = field(default_factory=threading.Event)
    """Set once ``trainer.fit()`` returned or raised."""

    def aborted_by_sweep(self) -> bool:
        """Whether the sweep driver aborted the run (read once its ``fit()`` failed)."""
        try:
            while True:
                if self.mailbox.take() == ABORTED_BY_SWEEP:
                    return True
        except (Empty, ray.exceptions.RayError):
            return False


_LOCK = threading.Lock()
_RUNS: dict[str, TrialRun] = {}
"""This trial process's Train run, by trial id."""
_STOPPED: set[str] = set()
"""Trials Tune stopped in this process (their run is aborted, or must not start)."""
_QUEUE: Queue | None = None
"""This trial process's mailbox queue, once its first run started."""


def start_run(trial_id: str) -> TrialRun | None:
    """Register the Train run a trial is about to start; None if Tune stopped the trial already."""
    global _QUEUE
    with _LOCK:
        if trial_id in _STOPPED:
            return None
        if _QUEUE is None:
            _QUEUE = Queue(actor_options={"num_cpus": 0})
        run = _RUNS[trial_id] = TrialRun(RunMailbox(_QUEUE, uuid.uuid4().hex))
        return run


def end_run(trial_id: str) -> None:
    """The trial's ``trainer.fit()`` returned or raised."""
    with _LOCK:
        run = _RUNS.pop(trial_id, None)
    if run is not None:
        run.ended.set()


def running_trials() -> list[str]:
    """Trials whose Train run this process started and that has not ended yet."""
    with _LOCK:
        return list(_RUNS)


def reopen(trial_id: str) -> None:
    """A reused trial process takes up ``trial_id`` (again): a stop recorded for it before no longer holds."""
    with _LOCK:
        _STOPPED.discard(trial_id)


def was_stopped(trial_id: str) -> bool:
    """Whether Tune stopped the trial (its run's failure is the abort, not an error)."""
    return trial_id in _STOPPED


def abort_run(trial_id: str, timeout_s: float = 120.0) -> None:
    """Abort the trial's Train run: wait for its controller to start if it is starting, then abort it."""
    with _LOCK:
        _STOPPED.add(trial_id)
        run = _RUNS.get(trial_id)
    if run is None:
        return  # no run started, and none will
    deadline = time.monotonic() + timeout_s
    while not run.ended.is_set() and time.monotonic() < deadline:
        try:
            controller = run.mailbox.take(timeout=1.0)
        except Empty:
            continue
        except ray.exceptions.RayError:
            return
        if controller == ABORTED_BY_SWEEP:
            return  # the driver aborted the run already
        try:
            ray.get(controller.abort.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # abort ends with the controller exiting
        return


class PlacementGroupRegistry(ray_tune.Callback):
    """Driver side: the sweep's Train runs and their placement groups; aborts a stopped trial's run, removes its groups.

    Tune pickles its callbacks into the experiment state: a copy finds the live registry through the
    sweep's session, by the sweep's location.
    """

    def __init__(self, sweep_uri: str):
        self.sweep_uri = sweep_uri
        self.queue: Queue | None = None
        self.groups: dict[str, list[Any]] = {}
        self.runs: dict[str, list[StartedRun]] = {}

    @classmethod
    def open(cls, sweep_uri: str) -> PlacementGroupRegistry:
        """A registry for this driver's run of the sweep (needs Ray); the sweep's session holds it."""
        registry = cls(sweep_uri)
        registry.queue = Queue(actor_options={"num_cpus": 0})
        return registry

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep_uri": self.sweep_uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sweep_uri, self.queue, self.groups, self.runs = state["sweep_uri"], None, {}, {}

    def live(self) -> PlacementGroupRegistry | None:
        """This registry if it runs in the driver that opened it, else the one the sweep's session holds."""
        if self.queue is not None:
            return self
        session = SweepSession.find(self.sweep_uri)
        return session.placement_groups if session is not None else None

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        """Abort the ended (or stopped) trial's run if it still runs, and remove its placement groups still there."""
        live = self.live()
        if live is not None:
            live.stop_runs([trial.trial_id])

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        """Same as a completed trial."""
        self.on_trial_complete(iteration, trials, trial)

    def _collect(self) -> None:
        """Take in what the runs' controllers posted."""
        assert self.queue is not None, "the registry is used in the driver that opened it"
        while True:
            try:
                trial_id, item = self.queue.get_nowait()
            except Empty:
                break
            if isinstance(item, StartedRun):
                self.runs.setdefault(trial_id, []).append(item)
            else:
                self.groups.setdefault(trial_id, []).append(item)

    def stop_runs(self, trial_ids: list[str], timeout_s: float = 10.0) -> None:
        """Abort these trials' Train runs that still run, then remove their placement groups.

        A run that ended already is left as it is (its controller's ``abort`` returns at once). Tune stops or
        pauses a trial on one of its results, and a run's controller posts itself here (a blocking put) when
        it starts, before its workers exist: so a run that reported is always known here when it is stopped.
        """
        self._collect()
        for trial_id in trial_ids:
            for run in self.runs.pop(trial_id, []):
                try:
                    run.mailbox.post(ABORTED_BY_SWEEP, timeout=timeout_s)
                    ray.get(run.controller.abort.remote(), timeout=timeout_s)
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    pass  # abort ends with the controller exiting; a trial process that is gone took its run along
        self.release(trial_ids)

    def release(self, trial_ids: list[str] | None = None) -> int:
        """Remove the placement groups of these trials (None: all) still there; returns how many were."""
        from ray.util.placement_group import placement_group_table, remove_placement_group

        self._collect()
        removed = 0
        for trial_id in list(self.groups) if trial_ids is None else trial_ids:
            for group in self.groups.pop(trial_id, []):
                if placement_group_table(group).get("state") not in (None, "REMOVED"):
                    remove_placement_group(group)
                    removed += 1
        return removed

    def close(self) -> int:
        """Remove every remaining placement group and the registry's queue (a pickled copy has neither)."""
        if self.queue is None:
            return 0
        removed = self.release()
        ray.kill(self.queue.actor)
        self.queue = None
        return removed
