"""Integration tier: a real local Ray instance on 127.0.0.1 (CPU, gloo), started once per module."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local(ftune_home):
    """A local Ray with 4 logical CPUs (2 training workers + Train's own actors) for this module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
