"""Which worker lines reach the terminal of a run started by ftune."""

from __future__ import annotations

import pytest

from ftune import console


@pytest.mark.parametrize(
    "line",
    [
        "[ftune] 2 worker(s), global batch 16 = micro 8 x accumulation 1 x workers 2; 100 steps",
        "[demo-train-20261203-134500] step 40/100 | loss 0.4121 | lr 2.1e-03 | 9,120 tok/s | ETA 12s",
        "[trial-ab12cd34] step 10/60 | loss 1.2",
    ],
)
def test_ftune_lines_reach_the_terminal(line):
    assert console.ftune_lines({"lines": [line]}) == [line]


@pytest.mark.parametrize(
    "line",
    [
        "[2026-12-03 13:45:01,123 E 4242 4242] core_worker.cc:512: Failed to query Ray Train Controller actor state",
        "[2026-12-03 12:49:56,808] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
        "PlacementGroupCleaner: Failed to query Ray Train Controller actor state",
        "WARNING: 8 PYTHON worker processes have been started on node",
        "  warnings.warn(",
        "",
    ],
)
def test_ray_and_library_chatter_stays_in_the_log_files(line):
    assert console.ftune_lines({"lines": [line]}) == []


def test_verbose_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.verbose_requested() and console.verbose_requested(True)
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose_requested()


def test_a_muted_stage_prints_no_worker_line(monkeypatch, capsys):
    import sys

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    data = {"lines": ["[ftune] trial line"], "is_err": False}
    with console.worker_lines_muted():
        console._print_ftune_lines(data, sys.stdout)
    assert capsys.readouterr().out == ""
    console._print_ftune_lines(data, sys.stdout)
    assert capsys.readouterr().out == "[ftune] trial line\n"


def test_the_stderr_copy_of_a_line_is_not_shown_twice(capsys):
    import sys

    console._print_ftune_lines({"lines": ["[ftune] once"], "is_err": True}, sys.stderr)
    console._print_ftune_lines({"lines": ["[ftune] once"], "is_err": False}, sys.stdout)
    captured = capsys.readouterr()
    assert captured.out == "[ftune] once\n" and captured.err == ""
