"""A sweep directory's layout, in one place: where results are, for a local sweep and one on S3."""

from __future__ import annotations

from pathlib import Path

from ftune.storage import Storage
from ftune.sweep_result import SweepResult


def test_local_sweep_keeps_results_and_trials_in_one_directory(tmp_path):
    sweep = SweepResult.open(tmp_path / "sweeps" / "s")
    root = tmp_path / "sweeps" / "s"
    assert sweep.local_dir == root and sweep.storage == Storage(str(root))
    assert sweep.spend_file == root / "spend.json"
    assert (sweep.leaderboard_json, sweep.leaderboard_csv) == (root / "leaderboard.json", root / "leaderboard.csv")
    assert sweep.report == root / "report.html"
    assert (sweep.best_adapter, sweep.best_trial) == (root / "best" / "adapter", root / "best" / "trial.json")
    assert sweep.trials == Storage(str(root / "trials"))


def test_home_is_expanded_and_relative_adapter_paths_are_the_sweeps(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    sweep = SweepResult.open("~/s")
    assert sweep.local_dir == tmp_path / "s"
    assert sweep.adapter_dir("trials/a/adapter") == tmp_path / "s" / "trials" / "a" / "adapter"
    assert sweep.adapter_dir("/abs/adapter") == Path("/abs/adapter")


def test_sweep_on_s3_reads_its_driver_files_from_this_machines_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FTUNE_HOME", str(tmp_path / "home"))
    sweep = SweepResult.open("s3://bucket/runs/sweeps/s1/", endpoint_url="http://127.0.0.1:9000")
    assert sweep.local_dir == tmp_path / "home" / "sweeps" / "s1"
    assert sweep.leaderboard_json == tmp_path / "home" / "sweeps" / "s1" / "leaderboard.json"
    assert sweep.trials == Storage("s3://bucket/runs/sweeps/s1/trials", "http://127.0.0.1:9000")
