"""Deploy a ServingConfig on Ray Serve from Python without blocking: ``deploy()`` and ``shutdown()``.

from serve.deploy import deploy, shutdown
base_url = deploy(config)                      # http://127.0.0.1:8000/v1
OpenAI(base_url=base_url, api_key="...").chat.completions.create(model="base", ...)
shutdown()
"""

from __future__ import annotations

from ftune.errors import UserError
from serve.config import ServingConfig

APP_NAME = "ftune"
"""Serve application name used unless another is given."""


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
) -> str:
    """Start Serve (and a local Ray, unless connected to one) and deploy ``config``; return at once.

    Adapters are checked before anything starts. Serve's HTTP options are cluster-wide: if Serve is
    already running, its host and port stay as they are.

    Returns:
        The OpenAI base URL (``http://host:port/<prefix>/v1``); ``/healthz`` is beside ``/v1``.

    Raises:
        ConfigError: an adapter is missing, incomplete or not LoRA.
        UserError: a replica failed to start (the message carries its error).
    """
    from ray import serve

    from serve.app import build_application

    app = build_application(config)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(app, name=app_name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as e:
        raise UserError(f"serving application {app_name!r} failed to start:\n{e}") from e
    return openai_base_url(host, port, route_prefix)


def shutdown() -> None:
    """Tear down every Serve application and the Serve proxies (Ray itself keeps running)."""
    from ray import serve

    serve.shutdown()
