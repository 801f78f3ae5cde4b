"""DeepSpeed's CPU communication op: compiled once (install.sh), announced if a run has to build it.

On a machine without CUDA, DeepSpeed's communication backend JIT-compiles ``deepspeed_shm_comm`` with
g++ the first time a process initializes it (1-2 minutes on 2 cores), silently. ``install.sh`` builds
it into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
every later process on the machine loads the cached library in well under a second. A machine whose
cache is empty (a new cluster node, a wiped home) builds it on first use, and :func:`ensure_built`
says so before the wait instead of after.

Training workers call :func:`preload` before DeepSpeed starts: it imports the cached library itself and
hands it to DeepSpeed, so a worker runs no build step at all. DeepSpeed's own path would run torch's
JIT loader in every process, and that loader takes a lock file in the cache for the length of a ninja
check; a process killed inside it (a preempted node, a pruned trial) leaves the lock behind, and every
later worker on the machine then waits on it forever. A stamp written next to a verified build (the
versions and a hash of the op's sources) keeps a stale library from being loaded after an upgrade; without
a matching stamp, DeepSpeed's path is taken as before.

    python -m ftune.deepspeed_ops --build    # build (or verify) the op now
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
import time

from ftune.compat.deepspeed_private import op_is_compatible, register_loaded_op
from ftune.compat.torch_private import extension_build_dir

EXPECTED_BUILD = "1-2 minutes on 2 cores"


def _builder():
    """DeepSpeed's builder for the op, or None where DeepSpeed would not use it (CUDA, unsupported CPU)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return None
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not op_is_compatible(builder.NAME):
        return None
    return builder


def _library(builder) -> str:
    return os.path.join(extension_build_dir(builder.NAME), f"{builder.NAME}.so")


def _stamp_path(builder) -> str:
    return os.path.join(extension_build_dir(builder.NAME), "ftune_build_stamp.json")


def _expected_stamp(builder) -> dict[str, str]:
    """What a library built from this DeepSpeed and torch must have been built from."""
    import deepspeed
    import torch

    digest = hashlib.sha256()
    paths = [builder.deepspeed_src_path(p) for p in builder.sources()]
    for include in builder.include_paths():
        root = builder.deepspeed_src_path(include)
        paths += sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)
    for path in paths:
        digest.update(path.encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return {"deepspeed": deepspeed.__version__, "torch": torch.__version__, "sources": digest.hexdigest()}


def is_built() -> bool:
    """True when the op is cached on this machine (or not needed here)."""
    builder = _builder()
    if builder is None:
        return True
    return os.path.exists(_library(builder))


def preload() -> bool:
    """Load the cached op into this process for DeepSpeed, without torch's build step; True if loaded.

    False (nothing done; DeepSpeed loads or builds the op itself) where the op is not used, not built,
    or built without a stamp matching this DeepSpeed, torch and op sources.
    """
    builder = _builder()
    if builder is None or not os.path.exists(_library(builder)):
        return False
    if not _stamp_matches(builder):
        return False
    spec = importlib.util.spec_from_file_location(builder.NAME, _library(builder))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    register_loaded_op(builder, module)
    return True


def _stamp_matches(builder) -> bool:
    try:
        with open(_stamp_path(builder)) as f:
            return json.load(f) == _expected_stamp(builder)
    except (OSError, ValueError):
        return False


def _write_stamp(builder) -> None:
    from ftune.atomic_files import write_text_atomic

    write_text_atomic(_stamp_path(builder), json.dumps(_expected_stamp(builder)))


def ensure_built(announce=print) -> float:
    """Build the op if this machine's cache lacks it; return the seconds spent building (0 if cached).

    A cached build without a matching stamp (built by DeepSpeed itself, or before an upgrade) is checked
    by DeepSpeed's own loader, which rebuilds it if its sources changed, and then stamped.

    Args:
        announce: called with one line before a build starts and one when it ends.
    """
    builder = _builder()
    if builder is None:
        return 0.0
    if os.path.exists(_library(builder)):
        if not _stamp_matches(builder):
            _quietly(builder.load)
            _write_stamp(builder)
        return 0.0
    announce(
        f"building DeepSpeed's CPU communication op ({EXPECTED_BUILD}, once per machine; "
        f"cached in {os.path.dirname(extension_build_dir(builder.NAME))})"
    )
    start = time.monotonic()
    _quietly(builder.load)
    _write_stamp(builder)
    took = time.monotonic() - start
    announce(f"built DeepSpeed's CPU communication op in {took:.0f} s")
    return took


def _quietly(load) -> None:
    """Run ``load`` with the compiler's command lines kept out of the terminal unless it fails."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            load(verbose=False)
    except Exception:
        sys.stderr.write(output.getvalue())
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftune.deepspeed_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build the op now if it is not cached")
    args = parser.parse_args(argv)
    from ftune.console import quiet_libraries

    quiet_libraries()  # DeepSpeed's "Setting accelerator to CPU" is expected here
    if not args.build:
        print("built" if is_built() else "not built")
        return 0
    took = ensure_built(announce=lambda line: print(f"install: {line}", flush=True))
    if took == 0.0:
        print("install: DeepSpeed's CPU communication op is ready (cached, or not needed on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
