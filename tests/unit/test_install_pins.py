"""constraints.txt pins every package ftune installs, exactly, and agrees with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    found = {}
    for number, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert m, f"constraints.txt:{number}: {line!r} is not an exact pin NAME==VERSION"
        name = canonicalize_name(m[1])
        assert name not in found, f"constraints.txt:{number}: {m[1]} pinned twice"
        found[name] = m[2]
    return found


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return [Requirement(r) for r in listed]


def test_every_dependency_is_pinned_within_its_range():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue  # install.sh pins the torch it installed or found (CPU or CUDA build)
        assert name in pinned, f"{req.name} (pyproject.toml) has no exact pin in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req}"
        )


def test_torch_is_left_to_install_sh_and_ray_minor_is_fixed():
    pinned = pins()
    assert "torch" not in pinned
    assert pinned["ray"].startswith("2.60."), "Ray's private APIs ftune wraps are tested against Ray 2.60"
    # The family an old pip backtracked over: each pinned, so the resolver has one candidate each.
    for name in ("fsspec", "s3fs", "aiobotocore", "botocore", "boto3", "pydantic", "fastapi", "deepspeed"):
        assert name in pinned, name
