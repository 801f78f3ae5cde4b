"""Stop requests: ask running training runs to checkpoint at the step they reached and finish early.

Whoever holds a ``StopSignal`` (a sweep driver whose budget ran out, an operator) calls ``request``.
A run started with the signal (``train.job.build_trainer(stop_signal=...)``) polls it from rank 0
on the report cadence through ``StopPoller`` and shares the answer in the step's all-reduce, so every
rank stops after the same step; the loop then evaluates, reports a checkpoint, writes its adapter and
summary, and returns, and the Train run ends as a normal, finished run.

The signal is an actor: one call per report interval per run, to whichever node holds it, without
blocking a step (the answer is picked up at a later step). A marker object in the run's storage
would reach every node too, but on S3 it costs a request per poll per run and a listing's delay.
"""

from __future__ import annotations

import logging

import ray

log = logging.getLogger("ftune.train")


@ray.remote(num_cpus=0)
class StopSignal:
    """A flag raised once; runs polling it checkpoint and finish. Lives as long as its owner."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def request(self, reason: str) -> None:
        """Ask every run polling this signal to stop (the first reason given stands)."""
        if self._reason is None:
            self._reason = reason

    def reason(self) -> str | None:
        """Why a stop was requested, or None while none was."""
        return self._reason


def create_stop_signal() -> ray.actor.ActorHandle:
    """A ``StopSignal`` pinned to the caller's node (the driver's), so losing a spot worker node never takes it along."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return StopSignal.options(scheduling_strategy=here).remote()


class StopPoller:
    """Rank 0's side of a ``StopSignal``: at most one call in flight, a new one every ``interval_s``."""

    def __init__(self, signal: ray.actor.ActorHandle | None, interval_s: float):
        self.signal = signal
        self.interval_s = interval_s
        self.reason: str | None = None
        self._inflight: ray.ObjectRef | None = None
        self._last = float("-inf")

    def poll(self, now: float) -> str | None:
        """The stop reason once a request was seen, else None. Never waits on the signal.

        Args:
            now: A monotonic clock reading (seconds).
        """
        if self.reason is not None or self.signal is None:
            return self.reason
        if self._inflight is not None and ray.wait([self._inflight], timeout=0)[0]:
            try:
                self.reason = ray.get(self._inflight)
            except ray.exceptions.RayError as e:  # its owner is gone: no request can come any more
                log.warning("stop signal unreachable, training on without it: %s", e)
                self.signal = None
            self._inflight = None
        idle = self.signal is not None and self.reason is None and self._inflight is None
        if idle and now - self._last >= self.interval_s:
            self._last = now
            self._inflight = self.signal.reason.remote()
        return self.reason
