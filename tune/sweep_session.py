"""One sweep's run in this driver process: its spend ledger, stop signal and placement groups, found by key.

Tune pickles the sweep's searcher, scheduler, stopper and callbacks into its experiment state and
restores copies on resume, so they cannot hold the ledger or Ray handles themselves: they keep the
sweep's location and look the session up (``SweepSession.of``). The driver begins the session once per
run of the sweep (``tune.sweep.run``) and ends it when Tune returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol


class SpendLedger(Protocol):
    """What the session needs of ``tune.budget.SpendLedger`` (which imports this module, so not the class)."""

    def mark_stopped(self, reason: str, now: float) -> None: ...

    def record(self, now: float) -> None: ...


class PlacementGroupRegistry(Protocol):
    """What the session needs of ``tune.placement_groups.PlacementGroupRegistry`` (which imports this module)."""

    def stop_runs(self, trial_ids: list[str]) -> None: ...

    def close(self) -> int: ...


def sweep_key(uri: str | Path) -> str:
    """The key a sweep's session is found by: its storage URI, or its directory's absolute path."""
    return str(uri) if "://" in str(uri) else str(Path(uri).resolve())


class SweepSession:
    """The live objects of one sweep in this process (what Tune's pickled copies find by the sweep's location)."""

    _open: ClassVar[dict[str, SweepSession]] = {}

    def __init__(self, key: str, ledger: SpendLedger, placement_groups: PlacementGroupRegistry | None = None,
                 stop_signal: Any = None):
        self.key = key
        """``sweep_key`` of the sweep's location."""
        self.ledger = ledger
        """The sweep's spend ledger."""
        self.placement_groups = placement_groups
        """The registry of the placement groups its trials' Train runs reserve (None: not tracked)."""
        self.stop_signal = stop_signal
        """The ``train.stop.StopSignal`` every trial's training run polls (None: none to raise)."""

    @classmethod
    def begin(cls, sweep_uri: str | Path, ledger: SpendLedger, *, placement_groups: PlacementGroupRegistry | None = None,
              stop_signal: Any = None) -> SweepSession:
        """The session of the sweep at ``sweep_uri`` (where it lives in storage, so that it does not depend
        on the machine: a sweep on s3:// resumes anywhere under the same key), registered for ``of``."""
        session = cls(sweep_key(sweep_uri), ledger, placement_groups, stop_signal)
        cls._open[session.key] = session
        return session

    @classmethod
    def find(cls, sweep_uri: str | Path) -> SweepSession | None:
        """The session begun for the sweep at ``sweep_uri`` in this process, or None."""
        return cls._open.get(sweep_key(sweep_uri))

    @classmethod
    def of(cls, sweep_uri: str | Path) -> SweepSession:
        """The session begun for the sweep at ``sweep_uri`` in this process."""
        session = cls.find(sweep_uri)
        if session is None:
            raise RuntimeError(f"no sweep session for {sweep_uri}; sweeps run through tune.sweep")
        return session

    def request_stop(self, reason: str, now: float) -> None:
        """Record a budget stop in the ledger and raise the stop signal: every trial checkpoints and finishes."""
        self.ledger.mark_stopped(reason, now)
        self.ledger.record(now)
        if self.stop_signal is not None:
            self.stop_signal.request.remote(reason)

    def end(self) -> int:
        """Forget the session; remove the placement groups still there. Returns how many were."""
        if self._open.get(self.key) is self:
            del self._open[self.key]
        return self.placement_groups.close() if self.placement_groups is not None else 0
