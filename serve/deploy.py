"""Deploy a ServingConfig on Ray Serve from Python without blocking: ``deploy()`` and ``shutdown()``.

from serve.deploy import deploy, shutdown
base_url = deploy(config)                      # http://127.0.0.1:8000/v1
OpenAI(base_url=base_url, api_key="...").chat.completions.create(model="base", ...)
shutdown()

With ``direct_ingress=True`` each replica also answers HTTP on a port of its own (Ray Serve's direct
ingress), skipping the proxy hop; ``replica_urls()`` lists those base URLs.
"""

from __future__ import annotations

import os
import time

from ftune.errors import UserError
from serve.config import ServingConfig, exposure_problem

APP_NAME = "ftune"
"""Serve application name used unless another is given."""
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
"""Ray Serve's switch for direct ingress, read by its controller and replicas when they start."""
DRAINING_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
"""How long a stopping replica keeps its port open for a load balancer to deregister it (Ray: 30 s)."""


def openai_base_url(host: str, port: int, route_prefix: str = "/") -> str:
    """The URL an OpenAI client takes as ``base_url`` for an app at ``route_prefix``."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}/v1"


def deploy(
    config: ServingConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
    direct_ingress: bool = False,
) -> str:
    """Start Serve (and a local Ray, unless connected to one) and deploy ``config``; return at once.

    Adapters are checked before anything starts. Serve's HTTP options are cluster-wide: if Serve is
    already running, its host and port stay as they are.

    Args:
        direct_ingress: Give each replica its own HTTP port as well (see ``replica_urls``). Ray reads
            the switch when it starts: a Ray started here gets it; a running cluster must have been
            started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1, else this raises.

    Returns:
        The OpenAI base URL (``http://host:port/<prefix>/v1``); ``/healthz`` is beside ``/v1``.

    Raises:
        ConfigError: an adapter is missing, incomplete, not LoRA or made for another model.
        UserError: ``host`` is not loopback and the config has no API key (nor allow_unauthenticated), a
            replica failed to start (the message carries its error), or direct ingress was asked of a
            running Ray that was started without it.
    """
    import ray
    from ray import serve as ray_serve

    from serve.app import build_application

    exposed = exposure_problem(host, config)
    if exposed:
        raise UserError(exposed)
    app = build_application(config)
    if direct_ingress and not ray.is_initialized():
        os.environ.setdefault(DIRECT_INGRESS_ENV, "1")
        # Nothing stands between clients and the replica ports here, so there is nothing to deregister from.
        os.environ.setdefault(DRAINING_ENV, "2")
    ray_serve.start(http_options={"host": host, "port": port})
    try:
        ray_serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as e:
        raise UserError(f"serving application {app_name!r} failed to start:\n{e}") from e
    if direct_ingress and not replica_urls(app_name, host):
        raise UserError(
            f"the running Ray does not give Serve replicas their own ports; start it with {DIRECT_INGRESS_ENV}=1 "
            "in its environment (e.g. `RAY_SERVE_ENABLE_DIRECT_INGRESS=1 ray start --head`), or deploy without "
            "direct ingress"
        )
    return openai_base_url(host, port, route_prefix)


def replica_urls(app_name: str = APP_NAME, host: str = "127.0.0.1", wait_s: float = 10.0) -> list[str]:
    """OpenAI base URLs reaching each running replica of ``app_name`` directly, without the proxy hop.

    Empty unless Ray runs with direct ingress. The ports come from Serve's controller (Ray 2.60 has no
    public call for them) and change when a replica is replaced, so look them up again after a restart.

    Args:
        app_name: Serve application name.
        host: Serve's HTTP host: replicas listen on it (a loopback host is only reachable on its node).
        wait_s: How long to wait for the controller to list the ports of replicas that just started.
    """
    from ftune.compat.ray_private import serve_http_replica_targets

    deadline = time.monotonic() + wait_s
    while True:
        urls = [
            openai_base_url(ip if host in ("0.0.0.0", "::") else host, port, route_prefix)
            for ip, port, route_prefix in serve_http_replica_targets(app_name)
        ]
        if urls or time.monotonic() >= deadline:
            return urls
        time.sleep(0.2)


def shutdown() -> None:
    """Tear down every Serve application and the Serve proxies (Ray itself keeps running)."""
    from ray import serve as ray_serve

    ray_serve.shutdown()
