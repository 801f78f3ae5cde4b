"""The Train run inside each sweep trial: aborting it when Tune stops the trial, and removing what it leaves behind.

Tune ends a stopped trial (ASHA, PBT, the budget) by stopping its actor, and at the end of a sweep by
killing it after a few seconds. The trial's Train controller dies with the actor, but the placement
group it reserved for its workers is scoped to the sweep's job and outlives it: Train's own
PlacementGroupCleaner notices a dead controller through the state API, which needs the dashboard
and a single Ray instance per machine. So each run's controller hands out

- its own actor handle, to the trial process (``TrialRun.mailbox``): a stopped trial aborts its run
  gracefully (``abort_run``), which stops the workers and removes their placement group;
- every placement group it reserves, to the sweep driver (``PlacementGroupRegistry``, held by the sweep's
  session): when a trial has ended, and when the sweep ends, the driver removes any of its placement
  groups still there.
"""

from __future__ import annotations

import threading
import time
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

    def __init__(self, trial_id: str, mailbox: Queue, registry: Queue | None):
        self.trial_id = trial_id
        self.mailbox = mailbox
        self.registry = registry

    def after_controller_start(self, train_run_context) -> None:
        """Post the controller's own handle to the trial."""
        self.mailbox.put(ray.get_runtime_context().current_actor)

    def after_worker_group_start(self, worker_group) -> None:
        """Post the placement group the workers run in to the sweep driver."""
        if self.registry is not None:
            group = worker_group_placement_group(worker_group)
            self.registry.put((self.trial_id, group))


@dataclass
class TrialRun:
    """The Train run a trial process started (one per trial actor)."""

    mailbox: Queue
    """Where the run's controller posts its handle."""
    ended: threading.Event = field(default_factory=threading.Event)
    """Set once ``trainer.fit()`` returned or raised."""


_LOCK = threading.Lock()
_RUNS: dict[str, TrialRun] = {}
"""This trial process's Train run, by trial id."""
_STOPPED: set[str] = set()
"""Trials Tune stopped in this process (their run is aborted, or must not start)."""


def start_run(trial_id: str) -> TrialRun | None:
    """Register the Train run a trial is about to start; None if Tune stopped the trial already."""
    with _LOCK:
        if trial_id in _STOPPED:
            return None
        run = _RUNS[trial_id] = TrialRun(Queue(actor_options={"num_cpus": 0}))
        return run


def end_run(trial_id: str) -> None:
    """The trial's ``trainer.fit()`` returned or raised."""
    with _LOCK:
        run = _RUNS.pop(trial_id, None)
    if run is not None:
        run.ended.set()


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
            controller = run.mailbox.get(timeout=1.0)
        except Empty:
            continue
        except ray.exceptions.RayError:
            return
        try:
            ray.get(controller.abort.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            pass  # abort ends with the controller exiting
        return


class PlacementGroupRegistry(ray_tune.Callback):
    """Driver side: the placement groups of the sweep's Train runs; removes those of ended trials.

    Tune pickles its callbacks into the experiment state: a copy finds the live registry through the
    sweep's session, by the sweep's location.
    """

    def __init__(self, sweep_uri: str):
        self.sweep_uri = sweep_uri
        self.queue: Queue | None = None
        self.groups: dict[str, list[Any]] = {}

    @classmethod
    def open(cls, sweep_uri: str) -> PlacementGroupRegistry:
        """A registry for this driver's run of the sweep (needs Ray); the sweep's session holds it."""
        registry = cls(sweep_uri)
        registry.queue = Queue(actor_options={"num_cpus": 0})
        return registry

    def __getstate__(self) -> dict[str, Any]:
        return {"sweep_uri": self.sweep_uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sweep_uri, self.queue, self.groups = state["sweep_uri"], None, {}

    def live(self) -> PlacementGroupRegistry | None:
        """This registry if it runs in the driver that opened it, else the one the sweep's session holds."""
        if self.queue is not None:
            return self
        session = SweepSession.find(self.sweep_uri)
        return session.placement_groups if session is not None else None

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        """Remove the ended trial's placement groups that are still there."""
        live = self.live()
        if live is not None:
            live.release([trial.trial_id])

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        """Same as a completed trial."""
        self.on_trial_complete(iteration, trials, trial)

    def release(self, trial_ids: list[str] | None = None) -> int:
        """Remove the placement groups of these trials (None: all) still there; returns how many were."""
        from ray.util.placement_group import placement_group_table, remove_placement_group

        assert self.queue is not None, "release runs in the driver that opened the registry"
        while True:
            try:
                trial_id, group = self.queue.get_nowait()
            except Empty:
                break
            self.groups.setdefault(trial_id, []).append(group)
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
