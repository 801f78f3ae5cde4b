"""Imports point down only: the core imports none of the packages built on it, and no import cycle exists.

Layers, bottom to top: ``ftune`` (the core); ``train``, ``tune``, ``serve``, ``cluster`` (the apps);
``ftune_cli`` (the ``ftune`` command, the demo, the configuration reference). The one exception is
``ftune/__main__.py``, the launcher ``python -m ftune`` needs, which may name the command package.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = "ftune"
APPS = ("train", "tune", "serve", "cluster")
COMMAND = "ftune_cli"
PROJECT = (CORE, *APPS, COMMAND)
LAUNCHER = f"{CORE}.__main__"

# Run in a fresh interpreter: a finder refuses the apps and the command package, then every core
# module is imported. Prints the modules imported, as JSON.
_IMPORT_CORE_ALONE = """
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = {blocked!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"the core imported {{fullname}}")
        return None

sys.meta_path.insert(0, Refuse())
import {core}
names = [{core!r}]
for info in pkgutil.walk_packages({core}.__path__, prefix={core!r} + "."):
    if info.name != {launcher!r}:  # running it would run the command
        importlib.import_module(info.name)
        names.append(info.name)
print(json.dumps(names))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _modules(package: str) -> dict[str, Path]:
    """Every module of a project package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


PROJECT_MODULES = {name: path for package in PROJECT for name, path in _modules(package).items()}


def _imported(module: str, path: Path) -> set[str]:
    """Every name an import statement of the module names, at any depth (functions and TYPE_CHECKING included)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def _project_dependencies(module: str, path: Path) -> set[str]:
    """The project modules a module imports: each imported name mapped to the longest project module it names."""
    out = set()
    for name in _imported(module, path):
        parts = name.split(".")
        while parts and ".".join(parts) not in PROJECT_MODULES:
            parts.pop()
        if parts and ".".join(parts) != module:
            out.add(".".join(parts))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_core_module_imports_with_the_packages_above_it_unimportable():
    code = _IMPORT_CORE_ALONE.format(blocked=(*APPS, COMMAND), core=CORE, launcher=LAUNCHER)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(json.loads(done.stdout.strip().splitlines()[-1]))
    expected = set(_modules(CORE)) - {LAUNCHER}
    assert imported == expected, sorted(expected ^ imported)
    assert {"ftune.config", "ftune.data.dataset", "ftune.builtin_assets", "ftune.entrypoint"} <= imported


def test_python_m_ftune_starts_without_importing_the_apps():
    code = (
        "import importlib.abc, runpy, sys\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, fullname, path=None, target=None):\n"
        f"        if fullname.split('.')[0] in {APPS!r}:\n"
        "            raise ImportError(fullname)\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "sys.argv = ['ftune', '--help']\n"
        "runpy.run_module('ftune', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: ftune <command>")
    assert "build-tiny-model" in done.stdout


def test_no_core_module_names_a_package_above_it_even_inside_a_function():
    above = (*APPS, COMMAND)
    offenders = {}
    for module, path in _modules(CORE).items():
        allowed = (COMMAND,) if module == LAUNCHER else ()
        names = sorted(n for n in _imported(module, path) if n.split(".")[0] in set(above) - set(allowed))
        if names:
            offenders[module] = names
    assert not offenders, f"the core must not import the packages built on it: {offenders}"


def test_no_package_imports_the_command_package():
    offenders = {
        module: sorted(n for n in _imported(module, path) if n.split(".")[0] == COMMAND)
        for module, path in PROJECT_MODULES.items()
        if module.split(".")[0] in APPS
    }
    assert not {m: n for m, n in offenders.items() if n}


def test_project_modules_have_no_import_cycles():
    graph = {module: _project_dependencies(module, path) for module, path in PROJECT_MODULES.items()}
    assert len(graph) > 50 and graph["ftune.builtin_assets"] >= {"ftune.tiny_model", "ftune.sample_data"}
    assert _cycles(graph) == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}, [["a", "b", "c"], ["d"]]),
    ],
)
def test_cycle_finder(graph, expected):
    assert sorted(_cycles(graph)) == expected


def test_import_scan_sees_function_level_relative_and_type_checking_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tune.config import SweepConfig\n"
        "def f():\n    import serve.cli\n    from . import sibling\n",
        encoding="utf-8",
    )
    names = _imported("train.mod", source)
    assert {"tune.config.SweepConfig", "serve.cli", "train.sibling"} <= names


def test_no_product_function_is_longer_than_80_lines():
    long = []
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "split these: " + ", ".join(long)
