"""`ftune sweep` / `python -m tune` argument handling (no Ray): mistakes exit 2 with file:line and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ftune_cli import command as cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # base: and compute.pricing are relative to the working directory


def test_sweep_is_an_ftune_subcommand(capsys):
    assert cli.SUBCOMMANDS["sweep"][0] == "tune.sweep"
    assert cli.main(["--help"]) == 0
    assert "sweep" in capsys.readouterr().out


def test_typo_in_key_and_space_exits_2_with_lines_and_did_you_mean(tmp_path, capsys):
    bad = tmp_path / "sweep.yaml"
    bad.write_text(
        "base: configs/train/tiny.yaml\n"
        "space:\n"
        "  lora.r: {choice: [4, 8]}\n"
        "  train.lr: {log_uniform: [1.0e-4, 1.0e-2]}\n"
        "serch:\n"
        "  algorithm: tpe\n"
        "budget:\n"
        "  max_trail: 3\n"
    )
    assert cli.main(["sweep", "--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err and "Traceback" not in err
    assert f"{bad}:4: space.train.lr" in err and "did you mean 'loguniform'?" in err
    assert f"{bad}:5: serch: unknown key. did you mean 'search'?" in err
    assert f"{bad}:8: budget.max_trail: unknown key. did you mean 'budget.max_trials'?" in err


def test_bad_space_value_and_override_typo_exit_2(capsys):
    tiny = "configs/sweep/tiny.yaml"
    assert cli.main(["sweep", "--config", tiny, "--dry-run", "space.lora.r={choice: [0, 8]}"]) == 2
    err = capsys.readouterr().err
    assert "space.lora.r: 0 is not a valid lora.r" in err
    assert cli.main(["sweep", "--config", tiny, "--dry-run", "search.algoritm=pbt"]) == 2
    assert "did you mean 'search.algorithm'?" in capsys.readouterr().err


def test_missing_config_and_bad_resume_dir_exit_2(tmp_path, capsys):
    assert cli.main(["sweep"]) == 2
    assert "pass --config FILE" in capsys.readouterr().err
    assert cli.main(["sweep", "--resume", str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_python_m_tune_reports_the_same_error():
    done = subprocess.run([sys.executable, "-m", "tune", "--config", "configs/sweep/tiny.yaml", "--dry-run",
                           "budget.usd=-1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "budget.usd" in done.stderr and "Traceback" not in done.stderr
