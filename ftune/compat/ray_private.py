"""Ray internals ftune relies on where Ray 2.60 has no public API, each wrapped once (tested in test_compat).

Ray's minor version is pinned (pyproject.toml, constraints.txt) because of these. Ray is imported inside
each function: the ``ftune`` command imports this module without starting or importing Ray.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

WORKER_LOG_PRINTER = "print_worker_logs"
"""The function of ``ray._private.worker`` through which every line from workers, actors and raylets is
printed on the driver, whichever handler of Ray's log dispatcher forwards it."""


# ---- the driver's console ---------------------------------------------------------------------------


def worker_log_printer() -> Callable[..., None] | None:
    """Ray's printer of worker output on the driver (``ray._private.worker.print_worker_logs``), or None.

    Ray offers ``log_to_driver`` (all or nothing) but no filter: replacing this function is the only way
    to keep some worker lines on the terminal and send the rest to the log files.
    """
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, WORKER_LOG_PRINTER, None)
    return printer if callable(printer) else None


def set_worker_log_printer(printer: Callable[..., None]) -> None:
    """Make ``printer(data, print_file, ignore_prefix=False)`` print the driver's worker output."""
    from ray._private import worker as ray_worker

    setattr(ray_worker, WORKER_LOG_PRINTER, printer)


def session_log_dir() -> str | None:
    """The log directory of the connected Ray session on this node (None for a client or remote session).

    ``ray.get_runtime_context()`` names the session but not its directory; the driver's node object does.
    """
    from ray._private import worker as ray_worker

    node = ray_worker.global_worker.node
    return node.get_logs_dir_path() if node is not None else None


# ---- cluster: GCS, token auth, the local address ---------------------------------------------------


def gcs_client(address: str) -> Any:
    """A ``ray._raylet.GcsClient`` for ``host:port``: node list, draining nodes and drains without
    ``ray.init`` (``ray drain-node`` uses the same client; the public state API needs a driver)."""
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def auth_token_present() -> bool:
    """Whether Ray finds an auth token (``AuthenticationTokenLoader``, ignoring the current auth mode)."""
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


def forget_auth_token() -> None:
    """Make Ray look for its auth token again (after ``ray get-auth-token --generate`` made one)."""
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


def token_auth_on() -> bool:
    """Whether this process's Ray runs with token auth (Ray's C++ config, read at import)."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return get_authentication_mode() == AuthenticationMode.TOKEN


def reload_ray_config() -> None:
    """Re-read Ray's C++ config (auth mode included) from the environment, as Ray's own
    ``authentication_token_setup._enable_token_auth`` does; Ray caches it at import."""
    from ray._raylet import Config

    Config.initialize("")


def local_cluster_address() -> str:
    """The address ``ray.init()`` would connect to: ``RAY_ADDRESS``, else the cluster ``ray start`` recorded.

    Raises:
        ConnectionError: no local cluster is running.
    """
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die(None)


# ---- Ray Train and Tune -------------------------------------------------------------------------------


def _without(callbacks: list[Any], module: str, name: str) -> list[Any]:
    """``callbacks`` minus instances of ``module.name``; all of them when the installed Ray lacks that class."""
    import importlib

    try:
        kind = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the installed Ray
        return list(callbacks)
    return [c for c in callbacks if not isinstance(c, kind)]


def without_datasets_callback(callbacks: list[Any]) -> list[Any]:
    """Ray Train's default controller callbacks minus the one that sets up Ray Data for every worker group.

    ``DatasetsCallback`` lives in ``ray.train.v2._internal``; a Ray without it gets its callbacks back as is.
    """
    return _without(callbacks, "ray.train.v2._internal.callbacks.datasets", "DatasetsCallback")


def without_placement_group_cleaner(callbacks: list[Any]) -> list[Any]:
    """Ray Train's default controller callbacks minus the one that starts a ``PlacementGroupCleaner`` per run.

    ``PlacementGroupCleanerCallback`` lives in ``ray.train.v2._internal``; a Ray without it gets its callbacks
    back as is.
    """
    return _without(callbacks, "ray.train.v2._internal.callbacks.placement_group_callback",
                    "PlacementGroupCleanerCallback")


def worker_group_placement_group(worker_group: Any) -> Any:
    """The ``PlacementGroup`` a Ray Train worker group runs in (what a ``WorkerGroupCallback`` is given).

    Train removes it only when its controller ends normally; a sweep that kills the controller must remove
    it itself, and no public call names it.
    """
    return worker_group.get_worker_group_state().placement_group_handle.placement_group


def function_trainable_class(trainable: Callable[..., Any]) -> type:
    """The Tune ``Trainable`` class Tune makes of a function trainable (``wrap_function``).

    ftune subclasses it to add a ``cleanup`` (a stopped trial aborts its Train run); ``tune.Tuner`` only
    takes the function, not a class to extend.
    """
    from ray.tune.trainable.function_trainable import wrap_function

    return wrap_function(trainable)


# ---- Ray Serve ---------------------------------------------------------------------------------------


def serve_http_replica_targets(app_name: str) -> list[tuple[str, int, str]]:
    """``(ip, port, route_prefix)`` of each running HTTP replica of ``app_name`` that listens on its own port.

    Empty without direct ingress (then Serve's controller lists its proxies, which are left out). The
    ports come from Serve's controller (``get_target_groups``); Ray 2.60 has no public call for them.
    """
    import ray
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX, RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    groups = ray.get(controller.get_target_groups.remote(app_name))
    return [
        (t.ip, t.port, g.route_prefix)
        for g in groups
        if g.app_name == app_name and g.protocol == RequestProtocol.HTTP
        for t in g.targets
        if t.name.startswith(REPLICA_ID_FULL_ID_STR_PREFIX)
    ]


def on_multiplexed_unload(model: object, unload: Callable[[], Awaitable[None]]) -> None:
    """Have ``@serve.multiplexed``'s LRU eviction await ``unload()`` when it drops ``model``.

    Serve documents that eviction calls a model's ``__del__``; its implementation
    (``_ModelMultiplexWrapper.unload_model_lru``) looks the attribute up on the instance and awaits a
    coroutine function. Set on the instance, not the class, garbage collection (which only calls a
    ``__del__`` defined on the class) never calls it.
    """
    model.__del__ = unload  # type: ignore[method-assign]
