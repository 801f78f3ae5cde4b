"""Ray Train's ``TorchTrainer`` as ftune runs it.

* **Without the Ray Data machinery it never uses.** ftune ships its tokenized data to the workers
  through the object store (``RunSpec.data``), not as Ray Datasets. Ray Train V2 still sets up
  Ray Data for every worker group it starts: a ``DatasetManager`` actor (a process importing
  ``ray.data``) and a call on every worker that installs Ray Data's context (importing ``ray.data``
  there too). On a small node that is a few CPU-seconds of every start and every restart, so the
  trainer leaves that callback out when it is given no datasets. Anything given datasets gets Ray's
  behaviour unchanged.
* **Without a placement-group cleaner per run.** Ray Train V2 starts a detached ``PlacementGroupCleaner``
  actor (a process) for every run, which asks Ray's state API every second whether the run's controller
  is alive, to remove the workers' placement group should the controller die without doing it. In ftune
  that group goes anyway: a training job's placement groups belong to its job and go when its driver
  ends (and the driver ends when its controller dies: ``fit()`` fails), and a sweep's driver aborts its
  trials' runs and removes their groups itself (``tune.placement_groups``). Leaving it out cut a sweep's
  trial turnaround by 1.25 s (bench/RESULTS.md).
* **With the job's Ray Train settings.** ``fit()`` runs with the job config's environment-only Ray
  Train settings (``train.ray_settings``) and gives the process back its SIGINT handler afterwards
  (``ftune.interrupts``).
"""

from __future__ import annotations

from ftune.compat.ray_private import without_datasets_callback, without_placement_group_cleaner
from ftune.compat.ray_private_hooks import TorchTrainerWithHooks
from ftune.config import TrainJobConfig
from ftune.interrupts import sigint_handler_restored
from train.ray_settings import ray_train_settings


class LoraTrainer(TorchTrainerWithHooks):
    """A ``TorchTrainer`` that sets up Ray Data only when it is given datasets, and starts no placement-group cleaner.

    Args:
        job: The job's config, whose Ray Train settings ``fit()`` applies (None: Ray's own).
        *args, **kwargs: As for ``TorchTrainer``.
    """

    def __init__(self, *args, job: TrainJobConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._job = job

    def fit(self):
        with sigint_handler_restored():
            if self._job is None:
                return super().fit()
            with ray_train_settings(self._job):
                return super().fit()

    def default_callbacks(self, callbacks):
        """Ray's callbacks, less the placement-group cleaner, and less the Ray Data set-up without datasets."""
        callbacks = without_placement_group_cleaner(callbacks)
        return callbacks if self.datasets else without_datasets_callback(callbacks)
