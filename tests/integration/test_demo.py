"""`ftune demo` end to end at a small size: train, budgeted sweep, Serve deployment, HTTP requests, clean-up.

The demo starts and stops its own local Ray, so this module uses no Ray fixture. Its facts are checked
against the files the run wrote (summary.json, spend.json, the leaderboard, the report), and after it
returns nothing it started may still run: no Ray process of its session, nothing on its HTTP port.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from pathlib import Path

import psutil
import pytest

from ftune import demo

pytestmark = pytest.mark.timeout(900)

STEPS, TRIALS, BUDGET_USD, REQUESTS = 6, 2, 0.01, 2


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
    """One small demo run: (return code, printed output, summary.json, port)."""
    import ray

    assert not ray.is_initialized()
    workdir, port = tmp_path_factory.mktemp("demo"), free_port()
    argv = ["--workdir", str(workdir), "--steps", str(STEPS), "--trials", str(TRIALS), "--budget-usd", str(BUDGET_USD),
            "--requests", str(REQUESTS), "--validation-rows", "32", "--port", str(port)]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = demo.main(argv)
    finally:
        print(out.getvalue())  # shown by pytest when a test fails
    return rc, out.getvalue(), json.loads((workdir / demo.SUMMARY_FILE).read_text()), port


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
    from serve.sweep import adapter_name

    _, _, summary, port = demo_run
    serving = summary["serving"]
    assert serving["url"] == f"http://127.0.0.1:{port}/v1"
    assert serving["model"] == adapter_name(summary["sweep"]["best_trial"])
    assert serving["models"] == ["base", serving["model"]]
    assert len(serving["samples"]) == REQUESTS
    for sample in serving["samples"]:
        assert sample["question"] and sample["expected"]
        for prefix in ("", "base_"):
            assert sample[f"{prefix}finish_reason"] in ("stop", "length")
            assert 0 <= sample[f"{prefix}completion_tokens"] <= 16
            assert isinstance(sample[f"{prefix}answer"], str)


def test_nothing_is_left_running(demo_run):
    import ray

    _, _, summary, port = demo_run
    assert not ray.is_initialized()
    deadline, left = time.time() + 60, ["?"]
    while time.time() < deadline and (left := session_processes(summary["ray_session"])):
        time.sleep(1.0)
    assert not left, f"processes of the demo's Ray session still run: {left}"
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))  # Serve's HTTP proxy is gone
