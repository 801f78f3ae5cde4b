"""DeepSpeed's CPU communication op: compiled once (install.sh), announced if a run has to build it.

On a machine without CUDA, DeepSpeed's communication backend JIT-compiles ``deepspeed_shm_comm`` with
g++ the first time a process initializes it (1-2 minutes on 2 cores), silently. ``install.sh`` builds
it into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
every later process on the machine loads the cached library in well under a second. A machine whose
cache is empty (a new cluster node, a wiped home) builds it on first use, and :func:`ensure_built`
says so before the wait instead of after.

    python -m ftune.deepspeed_ops --build    # build (or verify) the op now
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time

from ftune.compat.deepspeed_private import op_is_compatible
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


def is_built() -> bool:
    """True when the op is cached on this machine (or not needed here)."""
    builder = _builder()
    if builder is None:
        return True
    return os.path.exists(os.path.join(extension_build_dir(builder.NAME), f"{builder.NAME}.so"))


def ensure_built(announce=print) -> float:
    """Build the op if this machine's cache lacks it; return the seconds spent building (0 if cached).

    Args:
        announce: called with one line before a build starts and one when it ends.
    """
    if is_built():
        return 0.0
    builder = _builder()
    announce(
        f"building DeepSpeed's CPU communication op ({EXPECTED_BUILD}, once per machine; "
        f"cached in {os.path.dirname(extension_build_dir(builder.NAME))})"
    )
    start = time.monotonic()
    # The build prints compiler command lines; keep them out of the user's terminal unless it fails.
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            builder.load(verbose=False)
    except Exception:
        sys.stderr.write(output.getvalue())
        raise
    took = time.monotonic() - start
    announce(f"built DeepSpeed's CPU communication op in {took:.0f} s")
    return took


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
