"""Autoscaling on a real local Ray Serve: a bounded load adds a replica, and idleness removes it again.

Replica counts are read from ``serve.status()``; each replica takes 0.5 CPU so two fit on 2 cores.
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.waiting import wait_for

pytestmark = pytest.mark.integration

APP = "scaling"


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    return app.deployments["LoraServer"].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def base_url(tiny_model_dir, ftune_home):
    import ray
    from ray import serve

    from serve.config import validate_serving_args
    from serve.deploy import deploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = validate_serving_args(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0,
                "downscale_delay_s": 2,
                "look_back_period_s": 1,
                "metrics_interval_s": 0.5,
            },
            "limits": {"max_ongoing_requests": 8, "max_queued_requests": -1},
            "resources": {"num_cpus": 0.5},
        }
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield deploy(config, port=port, app_name=APP, route_prefix="/scaling")
    finally:
        serve.shutdown()
        ray.shutdown()


def test_load_scales_up_to_max_and_idleness_scales_back_down(base_url):
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    assert running_replicas() == 1
    stop = threading.Event()
    served, failures = [0], []

    def load():
        while not stop.is_set():
            try:
                client.completions.create(model="base", prompt="Keep talking.", max_tokens=32, temperature=0)
                served[0] += 1
            except Exception as e:  # noqa: BLE001 -- recorded, and fails the test below
                failures.append(repr(e))

    workers = [threading.Thread(target=load) for _ in range(4)]  # 4 ongoing vs a target of 1 per replica
    for w in workers:
        w.start()
    try:
        wait_for(lambda: running_replicas() == 2, "a second replica under 4 concurrent requests", 120, interval_s=0.5)
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert not failures, failures[:3]
    assert served[0] > 0
    wait_for(lambda: running_replicas() == 1, "the scale back down to one replica when idle", 90, interval_s=0.5)
    reply = client.completions.create(model="base", prompt="Still there?", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4
