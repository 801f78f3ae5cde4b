"""Ray classes ftune extends through their private methods, with those methods given public names.

A subclass overrides the public name here; only this module names Ray's private method, so a Ray release
that renames one fails ``tests/unit/test_compat.py`` here. Importing this module imports Ray Train and Tune.
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.tune.schedulers import PopulationBasedTraining

__all__ = ["ControllerCallback", "PBTWithHooks", "TorchTrainerWithHooks", "WorkerGroupCallback"]
# ControllerCallback, WorkerGroupCallback: Ray Train runs a RunConfig callback that is not a UserCallback
# in its controller; these (internal) bases are the only way to hear of the controller and worker group.


class TorchTrainerWithHooks(TorchTrainer):
    """``TorchTrainer`` whose default controller callbacks a subclass may change (``default_callbacks``)."""

    def default_callbacks(self, callbacks: list[Any]) -> list[Any]:
        """The controller callbacks Ray Train adds to every run (Ray's ``_create_default_callbacks``)."""
        return callbacks

    def _create_default_callbacks(self) -> list[Any]:
        return self.default_callbacks(super()._create_default_callbacks())


class PBTWithHooks(PopulationBasedTraining):
    """``PopulationBasedTraining`` whose per-perturbation step and exploit a subclass may replace.

    Tune's PBT exploits through Tune checkpoints it tracks in private per-trial state; a scheduler whose
    checkpoints live elsewhere (Ray Train runs) has to replace that step, mark donors and hand over the
    checkpoint itself. No public API does, so the methods below do it in one place.
    """

    DONOR_MARK = "train-checkpoint"
    """What a donor's checkpoint slot holds until an exploit puts the real pointer there: any true value
    tells PBT that the trial has a checkpoint to clone."""

    def checkpoint_or_exploit(self, trial, tune_controller, upper_quantile: list,
                              lower_quantile: list) -> None:
        """At a perturbation: checkpoint ``trial`` if in the upper quantile, exploit if in the lower.

        PBT's own step by default.
        """
        PopulationBasedTraining._checkpoint_or_exploit(
            self, trial, tune_controller, upper_quantile, lower_quantile
        )

    def exploit(self, tune_controller, trial, trial_to_clone) -> None:
        """Give ``trial`` a perturbed copy of ``trial_to_clone``'s config and donor checkpoint (PBT's own)."""
        PopulationBasedTraining._exploit(self, tune_controller, trial, trial_to_clone)

    def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile) -> None:
        self.checkpoint_or_exploit(trial, tune_controller, upper_quantile, lower_quantile)

    def _exploit(self, tune_controller, trial, trial_to_clone) -> None:
        self.exploit(tune_controller, trial, trial_to_clone)

    def last_train_time(self, trial) -> float:
        """The trial's training time at its last result (PBT orders paused trials by it)."""
        return self._trial_state[trial].last_train_time

    def donor_checkpoint(self, trial) -> Any:
        """What PBT clones when ``trial`` is a donor (a Tune checkpoint, :attr:`DONOR_MARK` or None)."""
        return self._trial_state[trial].last_checkpoint

    def set_donor_checkpoint(self, trial, checkpoint: Any) -> None:
        """Set what PBT clones when ``trial`` is a donor (None: it is not one)."""
        self._trial_state[trial].last_checkpoint = checkpoint

    def mark_donor(self, trial) -> None:
        """Mark ``trial`` as a donor with a checkpoint and count it (PBT's checkpoint count)."""
        self.set_donor_checkpoint(trial, self.DONOR_MARK)
        self._num_checkpoints += 1
