"""`ftune demo` settings: its flags reach the training job and the sweep, from any working directory."""

from __future__ import annotations

import pytest

from ftune.errors import UserError
from ftune_cli import demo


def test_flags_size_the_training_run_and_the_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sweep's base job and pricing table must not depend on the working directory
    args = demo.parse_args(["--workdir", str(tmp_path), "--steps", "12", "--trials", "3", "--budget-usd", "0.002"])
    cfg = demo.sweep_config(args, tmp_path)
    job = cfg.job_config()
    assert (cfg.search.num_samples, cfg.search.tpe_startup_trials, cfg.budget.usd) == (3, 3, 0.002)
    assert job.train.max_steps == 12 and job.train.eval_every == job.train.checkpoint_every == 3
    assert job.data.max_validation_rows == 128 and job.tracking.wandb == "offline"
    assert job.data.validation_path == "builtin:sample-instructions-heldout"  # scored on held-out questions
    assert job.storage.path == str(tmp_path)
    assert cfg.search.algorithm == "tpe" and cfg.search.asha.enabled


def test_default_size_is_four_trials_of_a_hundred_steps():
    args = demo.parse_args([])
    assert (args.steps, args.trials, args.budget_usd, args.workers) == (100, 4, 0.01, 2)
    assert "train.eval_every=25" in demo.job_overrides(args)


def test_bad_flags_are_reported_together():
    with pytest.raises(UserError) as e:
        demo.parse_args(["--steps", "1", "--trials", "0", "--budget-usd", "-1"])
    message = str(e.value)
    assert "--steps must be at least 2, got 1" in message and "--trials must be at least 1, got 0" in message
    assert "--budget-usd must be positive, got -1.0" in message
