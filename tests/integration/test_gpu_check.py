"""bench/gpu_check.sh runs end to end: in tiny mode on CPU every step runs and is recorded in one file.

The script is meant for a GPU machine lent now and then for a few minutes; this proves, on every CI
run, that it will not waste that time on a broken step.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = ("install", "environment", "train-lora", "train-qlora", "serve", "tests-gpu")


def run_check(out: Path, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the script with ``env`` added; its exit, output and results file."""
    full_env = {**os.environ, "FTUNE_GPU_CHECK_OUT": str(out), "PYTHON": sys.executable, **env}
    full_env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh")],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=850,
    )
    results = out / "gpu_check.md"
    assert results.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, results.read_text()


def section(results: str, step: str) -> str:
    """The text of one step's section (up to the next step's; a report inside may have headings of its own)."""
    text = results.split(f"\n## {step}:", 1)[1]
    for other in STEPS:
        text = text.split(f"\n## {other}:", 1)[0]
    return text


def test_tiny_mode_runs_every_step_on_cpu(tmp_path, tiny_model_dir):
    proc, results = run_check(tmp_path, FTUNE_GPU_CHECK_TINY="1")

    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Mode: tiny" in results
    for step in STEPS:
        assert f"\n## {step}:" in results, step
    assert "| install | skipped: tiny mode" in results
    for step in STEPS[1:]:
        assert f"| {step} | ok |" in results, step
    assert "torch " in section(results, "environment")
    for method in ("lora", "qlora"):
        train = section(results, f"train-{method}")
        assert f"| tiny  | {method} " in train
        assert "MFU (6N)" in train and "meaningless" in train
    serve = section(results, "serve")
    assert "in-process batch of 8, 1 adapter " in serve and "in-process batch of 8, 8 adapters " in serve
    gpu_tests = section(results, "tests-gpu")  # no CUDA here: every test of tests/gpu skips itself
    assert re.search(r"\n\d+ skipped in ", gpu_tests) and " passed" not in gpu_tests and " failed" not in gpu_tests
    assert "== train-lora" in (tmp_path / "gpu_check.log").read_text()


def test_failed_and_skipped_steps_are_recorded_with_the_reason(tmp_path):
    proc, results = run_check(tmp_path, FTUNE_GPU_CHECK_TINY="1", PYTHON="false")

    assert proc.returncode == 1
    assert "| environment | failed (exit 1) |" in results
    assert "| serve | failed (exit 1) |" in results
    assert "| train-lora | skipped: ray or deepspeed is not installed" in results
    assert "| tests-gpu | skipped: ray or deepspeed is not installed" in results


def test_steps_past_the_budget_are_skipped(tmp_path):
    proc, results = run_check(tmp_path, FTUNE_GPU_CHECK_TINY="1", FTUNE_GPU_CHECK_BUDGET_S="0")

    assert proc.returncode == 0
    assert "| environment | skipped: the 0 s budget is spent |" in results
    assert "| serve | skipped: the 0 s budget is spent |" in results
