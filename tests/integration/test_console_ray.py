"""On a real local Ray driver: ftune's worker lines reach the terminal, Ray's other output does not."""

from __future__ import annotations

import time

import pytest

from ftune import console

pytestmark = pytest.mark.integration


def test_filter_replaces_rays_printer_on_a_real_driver(capsys):
    """On a real local Ray: a worker's ftune line is printed, its other output is not."""
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    try:
        log_dir = console.show_only_ftune_lines()
        assert log_dir and log_dir.endswith("logs")

        @ray.remote
        def chatty() -> int:
            print("[ftune] visible line", flush=True)
            print("Failed to query Ray Train Controller actor state", flush=True)
            print("[2026-12-03 13:45:01,123 E 4242 4242] core_worker.cc:512: an internal error line", flush=True)
            return 1

        assert ray.get(chatty.remote()) == 1
        seen, deadline = "", time.monotonic() + 60
        while "[ftune] visible line" not in seen and time.monotonic() < deadline:
            time.sleep(0.1)  # Ray's log monitor forwards worker output asynchronously
            seen += capsys.readouterr().out
        assert "[ftune] visible line" in seen, f"the worker's ftune line never reached the driver: {seen!r}"
        assert "Failed to query" not in seen and "core_worker.cc" not in seen
    finally:
        console.show_everything()
        ray.shutdown()
