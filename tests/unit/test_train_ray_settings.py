"""The job's failure settings reach Ray Train through the environment variables it propagates."""

from __future__ import annotations

import os

from ray.train.v2._internal.constants import get_env_vars_to_propagate

from ftune.config import TrainJobConfig
from train.ray_settings import HEALTH_CHECK_INTERVAL, WORKER_GROUP_START_TIMEOUT, ray_train_settings


def test_settings_are_propagated_during_the_run_and_restored_after(monkeypatch):
    monkeypatch.setenv(HEALTH_CHECK_INTERVAL, "7")
    monkeypatch.delenv(WORKER_GROUP_START_TIMEOUT, raising=False)
    cfg = TrainJobConfig.model_validate({"failure": {"poll_interval_s": 0.25, "worker_start_timeout_s": 15}})
    with ray_train_settings(cfg):
        propagated = get_env_vars_to_propagate()  # what Ray Train copies to its controller and workers
        assert float(propagated[HEALTH_CHECK_INTERVAL]) == 0.25
        assert float(propagated[WORKER_GROUP_START_TIMEOUT]) == 15.0
    assert os.environ[HEALTH_CHECK_INTERVAL] == "7"
    assert WORKER_GROUP_START_TIMEOUT not in os.environ


def test_settings_are_restored_when_the_run_fails(monkeypatch):
    monkeypatch.delenv(HEALTH_CHECK_INTERVAL, raising=False)
    try:
        with ray_train_settings(TrainJobConfig()):
            raise RuntimeError("the run failed")
    except RuntimeError:
        pass
    assert HEALTH_CHECK_INTERVAL not in os.environ
