"""What every benchmark prints and records: the machine it ran on, markdown tables and goal verdicts."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """``Model name`` from lscpu (falls back to platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when the work tree has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def machine_line() -> str:
    """One line naming the CPU, its cores, the load, the date and the commit."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{cpu_model()}, {os.cpu_count()} cores (load avg {load}); {today}; commit {git_commit()}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table with columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def goal(name: str, measured: str, target: str, passed: bool) -> str:
    """``PASS``/``FAIL`` line of one goal, e.g. ``FAIL  step time 1-worker/plain: 1.23x (goal <= 1.10x)``."""
    return f"{'PASS' if passed else 'FAIL'}  {name}: {measured} (goal {target})"


RESULTS = REPO / "bench" / "RESULTS.md"


def record_section(key: str, text: str, results: Path = RESULTS) -> None:
    """Replace the section between ``<!-- {key} start -->`` and ``<!-- {key} end -->`` (or append it).

    The file is read right before it is written, so sections other benchmarks wrote meanwhile are kept.
    """
    start, end = f"<!-- {key} start -->", f"<!-- {key} end -->"
    section = f"{start}\n{text.rstrip()}\n{end}\n"
    old = results.read_text(encoding="utf-8") if results.exists() else "# Benchmark results\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip() + "\n\n" + section
    results.write_text(new, encoding="utf-8")
