"""Ray Train settings that only environment variables reach, set from the job's config for one run.

Ray Train V2 reads its controller's poll interval and the worker group's start timeout from
environment variables, and copies the driver's values of those variables to the controller and
the workers when ``fit()`` starts (``get_env_vars_to_propagate``). So the driver sets them for the
duration of the run and puts back what was there before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ftune.config import TrainJobConfig

HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
WORKER_GROUP_START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def ray_train_env(cfg: TrainJobConfig) -> dict[str, str]:
    """The environment variables a run of ``cfg`` sets for Ray Train."""
    return {
        HEALTH_CHECK_INTERVAL: repr(cfg.failure.poll_interval_s),
        WORKER_GROUP_START_TIMEOUT: repr(cfg.failure.worker_start_timeout_s),
    }


@contextmanager
def ray_train_settings(cfg: TrainJobConfig) -> Iterator[None]:
    """Set ``ray_train_env(cfg)`` in this process while the block runs (around ``trainer.fit()``)."""
    settings = ray_train_env(cfg)
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
