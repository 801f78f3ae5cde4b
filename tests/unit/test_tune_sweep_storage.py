"""A sweep on S3 hands its region on: the sweep's storage, its trials' storage and every trial's job keep it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftune.config import TrainJobConfig
from ftune.storage import Storage
from ftune.yaml_config import load_config
from tune.config import SweepConfig
from tune.sweep import prepare_sweep

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # base: and compute.pricing are relative to the working directory


@pytest.mark.parametrize(
    "storage", ["{path: 's3://bucket/runs?region=eu-west-3'}", "{path: 's3://bucket/runs', region: eu-west-3}"]
)
def test_trials_keep_the_region_of_the_sweep_storage(tmp_path, tiny_model_dir, storage):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "base: configs/train/tiny.yaml\n"
        f"job:\n  scaling: {{num_workers: 1}}\n  storage: {storage}\n  data: {{max_rows: 64, max_validation_rows: 8}}\n"
        "space:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "compute: {pricing: configs/pricing/local-cpu.yaml, instance_type: cpu-worker}\n"
    )
    sweep = prepare_sweep(load_config(SweepConfig, path, []), "regional")
    assert sweep.uri == "s3://bucket/runs/sweeps/regional", "the sweep's key and shown location carry no query"
    assert sweep.storage.region == "eu-west-3"
    assert sweep.trials.region == "eu-west-3" and sweep.trials.path() == "bucket/runs/sweeps/regional/trials"
    trial_job = TrainJobConfig.model_validate({**sweep.plan.job, "name": "t1"})
    assert Storage.from_config(trial_job.storage).region == "eu-west-3"
    assert sweep.plan.spec_for(trial_job).storage().region == "eu-west-3"
