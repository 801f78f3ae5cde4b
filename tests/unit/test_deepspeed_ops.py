"""DeepSpeed's CPU op loaded from the cache without torch's build step (and its lock file), only when stamped."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from ftune import deepspeed_ops

pytestmark = pytest.mark.skipif(deepspeed_ops._builder() is None, reason="DeepSpeed does not use the CPU op here")


def in_fresh_process(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_stamped_build_loads_even_with_a_stale_lock_left_by_a_killed_process():
    deepspeed_ops.ensure_built(announce=lambda line: None)  # builds (or verifies) and stamps
    builder = deepspeed_ops._builder()
    lock = deepspeed_ops.extension_build_dir(builder.NAME) + "/lock"
    open(lock, "w").close()  # what a process killed inside torch's JIT loader leaves
    try:
        # DeepSpeed's own path in a fresh process would wait on the lock for ever; the preloaded op does not.
        loaded = in_fresh_process("""
            from ftune import deepspeed_ops
            assert deepspeed_ops.preload()
            from deepspeed.comm.torch import build_shm_op
            op = build_shm_op()
            print(type(op).__name__, op.__name__)
        """)
    finally:
        import os

        os.unlink(lock)
    assert loaded == f"module {builder.NAME}"


def test_an_unstamped_or_mismatched_build_is_left_to_deepspeed(monkeypatch, tmp_path):
    deepspeed_ops.ensure_built(announce=lambda line: None)
    builder = deepspeed_ops._builder()
    stamp = json.loads(open(deepspeed_ops._stamp_path(builder)).read())
    assert stamp == deepspeed_ops._expected_stamp(builder)
    monkeypatch.setattr(deepspeed_ops, "_expected_stamp", lambda b: {**stamp, "deepspeed": "0.0.0"})
    assert deepspeed_ops.preload() is False
