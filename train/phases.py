"""Named phases of a worker's run, reported to an optional ``PhaseTimer`` (benchmarks time the loop with it).

The loop wraps each phase worth measuring in ``timer.phase(name, **fields)``. A run is given a
timer through its ``RunSpec`` (``phase_timer``, e.g. ``run_training(..., phase_timer=...)``); the
timer is pickled to every worker with the spec, so it must be picklable and cheap. Without one the
phases cost a shared no-op context manager.

Phases, in the order a worker meets them:

    worker                   the whole of ``train_loop_per_worker`` (a timer may set itself up here)
    load_tokenizer           the tokenizer, once per worker start
    build_engine             model, adapter and DeepSpeed engine; inside it:
      load_base_model, add_adapter, deepspeed.initialize
    load_checkpoint          each checkpoint a worker tries to restore (fields: path)
    evaluate_loss            held-out loss (before training, every ``eval_every`` steps, at the end)
    exact_match              greedy exact match, alongside evaluate_loss when the data has references
    collate                  one micro-batch collated
    record                   rank 0 writes a step's metrics row
    checkpoint               a checkpoint saved and reported (fields: step, jit)
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol


class PhaseTimer(Protocol):
    """Told when each named phase of a worker's run starts and ends."""

    def phase(self, name: str, **fields: Any) -> AbstractContextManager[Any]:
        """A context manager entered when phase ``name`` starts and left when it ends."""
        ...


class NoPhaseTimer:
    """The default: phases are not timed."""

    _null = nullcontext()

    def phase(self, name: str, **fields: Any) -> AbstractContextManager[Any]:
        """A shared no-op context manager."""
        return self._null


NO_PHASE_TIMER = NoPhaseTimer()
