"""When a training step is followed by an evaluation, a checkpoint, a report or the end of the run.

A pure decision from the step number, rank 0's clock (shared in each step's all-reduce), Ray's
agreed preemption notice and the agreed stop flag: every rank computes the same actions, so every
rank runs the same collectives (evaluation, ``ray.train.report``) and none waits on a barrier the
others skip. Tests drive it with hand-made clock readings, no sleeps.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepActions:
    """What follows one training step."""

    evaluate: bool
    """Run the evaluation (every ``eval_every`` steps and after the last step)."""
    checkpoint: bool
    """Save and report a checkpoint (implies ``report``)."""
    report: bool
    """Send the pending metric rows with ``ray.train.report``."""
    jit: bool
    """The checkpoint is a just-in-time one after a preemption notice."""
    last: bool
    """The run ends after this step (all steps done, or a stop requested)."""


@dataclass(frozen=True)
class Cadence:
    """The run's step and time intervals (``train`` section) and its length."""

    total_steps: int
    eval_every: int
    checkpoint_every: int
    report_interval_s: float
    """Longest time between two reports (seconds of rank 0's monotonic clock)."""
    preemption_check_interval_s: float
    """How often Ray is asked for a preemption notice."""

    def check_preemption(self, clock: float, last_check: float) -> bool:
        """Whether to ask Ray for a preemption notice now (none arrived yet)."""
        return clock - last_check >= self.preemption_check_interval_s

    def after_step(self, step: int, clock: float, last_report: float, *, preempted: bool,
                   stopping: bool) -> StepActions:
        """The actions after step ``step`` (1-based) ended at ``clock``.

        Args:
            last_report: Clock reading of the previous report (``-inf`` before the first).
            preempted: A preemption notice arrived: after it the node may go at any moment, so a
                just-in-time checkpoint after every step means at most the step in flight is lost.
            stopping: A stop was requested: this step is the last.
        """
        last = step >= self.total_steps or stopping
        evaluate = last or step % self.eval_every == 0
        checkpoint = last or preempted or step % self.checkpoint_every == 0
        report = checkpoint or evaluate or clock - last_report >= self.report_interval_s
        return StepActions(evaluate=evaluate, checkpoint=checkpoint, report=report, jit=preempted, last=last)
