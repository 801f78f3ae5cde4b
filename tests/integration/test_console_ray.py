"""On a real local Ray driver: ftune's worker lines reach the terminal, Ray's other output does not."""

from __future__ import annotations

import pytest

from ftune import console
from tests.waiting import wait_for

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
        seen = []  # Ray's log monitor forwards worker output asynchronously

        def arrived() -> bool:
            seen.append(capsys.readouterr().out)
            return "[ftune] visible line" in "".join(seen)

        wait_for(arrived, "the worker's ftune line to reach the driver")
        seen = "".join(seen)
        assert "Failed to query" not in seen and "core_worker.cc" not in seen
    finally:
        console.show_everything()
        ray.shutdown()
