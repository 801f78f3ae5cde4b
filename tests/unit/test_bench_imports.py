"""Every benchmark script imports and parses its arguments: a renamed helper must not wait for the next bench run."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in ("__init__", "report"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_imports_and_has_a_command_line(script, monkeypatch):
    module = importlib.import_module(f"bench.{script}")
    assert callable(module.main), f"bench/{script}.py has no main()"
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"]) if inspect.signature(module.main).parameters else module.main()
    assert exit_info.value.code == 0
