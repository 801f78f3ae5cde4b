"""`ftune demo` end to end at a small size: train, budgeted sweep, Serve deployment, HTTP requests, clean-up.

The demo runs as a user runs it, ``python -m ftune demo`` in its own process, so the test sees the
terminal output (stdout and stderr) a user sees. It starts and stops its own local Ray. Its facts are
checked against the files the run wrote (summary.json, spend.json, the leaderboard, the report); the
adapters must beat the base model on the held-out questions; and after it returns nothing it started
may still run: no Ray process of its session, nothing on its HTTP port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ftune_cli import demo
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(900)

STEPS, TRIALS, BUDGET_USD, REQUESTS = 80, 2, 0.01, 2
RAY_NOISE = ("PlacementGroupCleaner", "core_worker", "raylet", "PreemptionWatcher", "Failed to query",
             "(pid=", "RayTrainWorker pid", "TrainController pid", "INFO worker.py", "SetuptoolsDeprecation")
"""Fragments of Ray's internal output that must not reach the demo's terminal (they stay in Ray's logs)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(session: str) -> list[str]:
    """Command lines of live processes that belong to the Ray session ``session``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if session in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline[:200])
    return found


@pytest.fixture(scope="module")
def demo_run(tiny_model_dir, tmp_path_factory):
    """One small demo run in its own process: (return code, terminal output, summary.json, port)."""
    workdir, port = tmp_path_factory.mktemp("demo"), free_port()
    argv = ["--workdir", str(workdir), "--steps", str(STEPS), "--trials", str(TRIALS), "--budget-usd", str(BUDGET_USD),
            "--requests", str(REQUESTS), "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FTUNE_VERBOSE")}
    proc = subprocess.run([sys.executable, "-m", "ftune", "demo", *argv], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=840)
    print(proc.stdout)  # shown by pytest when a test fails
    return proc.returncode, proc.stdout, json.loads((workdir / demo.SUMMARY_FILE).read_text()), port


def test_demo_prints_every_stage_and_the_summary(demo_run):
    rc, out, summary, port = demo_run
    assert rc == 0
    for index in range(1, demo.STAGES + 1):
        assert f"=== [{index}/{demo.STAGES}]" in out
    assert "=== ftune demo summary" in out and "=== cleaning up" in out
    assert f"endpoint: http://127.0.0.1:{port}/v1" in out
    assert f"report: {summary['sweep']['report']}" in out
    assert f"spend: ${summary['sweep']['spent_usd']:.5f} of ${BUDGET_USD:.5f} budget" in out


def test_training_run_lowered_the_eval_loss(demo_run):
    _, _, summary, _ = demo_run
    train = summary["train"]
    assert train["steps"] == STEPS and train["eval_loss_after"] < train["eval_loss_before"]
    run_summary = json.loads(Path(train["run_dir"], "summary.json").read_text())
    assert run_summary["eval_loss_after"] == train["eval_loss_after"]
    assert Path(train["adapter_path"], "adapter_config.json").is_file()


def test_sweep_facts_match_its_files(demo_run):
    _, _, summary, _ = demo_run
    sweep = summary["sweep"]
    sweep_dir = Path(sweep["sweep_dir"])
    rows = json.loads((sweep_dir / "leaderboard.json").read_text())
    statuses = [r["status"] for r in rows]
    assert sweep["trials"] == len(rows) == TRIALS and sweep["failed"] == 0
    assert sweep["completed"] == statuses.count("completed") and sweep["pruned"] == statuses.count("pruned")
    assert sweep["completed"] + sweep["pruned"] + sweep["stopped_by_budget"] == TRIALS
    spend = json.loads((sweep_dir / "spend.json").read_text())
    assert sweep["spent_usd"] == pytest.approx(spend["spent_usd"]) and sweep["budget_usd"] == BUDGET_USD
    assert 0 < sweep["spent_usd"] == pytest.approx(sum(t["cost_usd"] for t in spend["trials"]))
    assert sweep["best_trial"] == rows[0]["trial"] and sweep["best_eval_loss"] == rows[0]["eval_loss"]
    assert Path(sweep["best_adapter"], "adapter_config.json").is_file()
    assert Path(sweep["leaderboard"]).is_file() and Path(sweep["report"]).is_file()
    assert "Eval loss vs cost" in Path(sweep["report"]).read_text()


def test_winner_was_served_and_answered_over_http(demo_run):
    from serve.leaderboard_source import adapter_name

    _, out, summary, port = demo_run
    serving = summary["serving"]
    assert serving["url"] == f"http://127.0.0.1:{port}/v1"
    assert serving["model"] == adapter_name(summary["sweep"]["best_trial"])
    assert sorted(serving["models"]) == sorted(["base", "trained", serving["model"]])
    assert serving["questions"] == len(demo.heldout_questions()) > 50
    assert len(serving["samples"]) == REQUESTS
    for sample in serving["samples"]:
        assert sample["question"] and sample["expected"]
        assert all(isinstance(sample[label], str) for label in ("base", "trained", "winner"))
        assert f"Q: {sample['question']}" in out


def test_fine_tuning_beats_the_base_model_on_held_out_questions(demo_run):
    """The adapters answer questions about facts their training data never asked; the base model does not."""
    _, out, summary, _ = demo_run
    em = summary["serving"]["exact_match"]
    assert em["base"] <= 0.1, em
    assert em["trained"] >= em["base"] + 0.4, em
    assert em["winner"] >= em["base"] + 0.4, em
    assert f"base {em['base']:.0%} -> trained {em['trained']:.0%} -> sweep winner {em['winner']:.0%}" in out
    # The training run's own evaluation (greedy decoding in the workers) agrees with the endpoint's.
    assert summary["train"]["exact_match_after"] == pytest.approx(em["trained"], abs=0.1)


def test_terminal_shows_ftune_lines_and_no_ray_internals(demo_run):
    _, out, _, _ = demo_run
    noise = [line for line in out.splitlines() if any(fragment in line for fragment in RAY_NOISE)]
    assert not noise, f"Ray's internal output reached the terminal: {noise[:10]}"
    assert "[ftune] Ray's own logs: " in out
    assert "[ftune] step" in out or "[ftune] 2 worker(s)" in out  # progress from the workers still shows


def test_nothing_is_left_running(demo_run):
    _, _, summary, port = demo_run
    try:
        wait_for(lambda: not session_processes(summary["ray_session"]), "the demo's Ray processes to exit", 60,
                 interval_s=0.5)
    except AssertionError:
        raise AssertionError(f"processes of the demo's Ray session still run: {session_processes(summary['ray_session'])}") from None
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))  # Serve's HTTP proxy is gone
