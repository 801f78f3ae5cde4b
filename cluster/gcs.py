"""Ask a Ray cluster's GCS about its nodes and tell it to drain one (what ``ray drain-node`` does).

Uses the same ``ray._raylet.GcsClient`` calls as ``ray drain-node`` (ray/scripts/scripts.py) and as
Ray Train's preemption watcher (``ray._private.state.state.get_draining_nodes``), without
``ray.init``: a watcher on a node must not become a driver of the cluster it drains.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

from cluster.auth import enable_token_auth
from ftune.compat import ray_private

# ray.core.generated.autoscaler_pb2.DrainNodeReason, without the DRAIN_NODE_REASON_ prefix.
DRAIN_REASONS = ("PREEMPTION", "IDLE_TERMINATION")


@dataclass(frozen=True)
class NodeView:
    """One node as the GCS reports it."""

    node_id: str
    """Hex node id."""
    name: str
    """``--node-name`` it was started with (the IP when none was given)."""
    ip: str
    """Node manager address."""
    alive: bool
    """False once the GCS has marked the node dead."""
    is_head: bool
    """True for the head node."""
    resources: dict[str, float] = field(default_factory=dict)
    """Total resources (``CPU``, ``spot``, ``head`` ...)."""
    draining_deadline_ms: int | None = None
    """Set while the node is draining: the drain deadline in UNIX ms, 0 when none was given."""
    death_reason: str = ""
    """For a dead node: Ray's reason, e.g. ``AUTOSCALER_DRAIN_PREEMPTED``, ``UNEXPECTED_TERMINATION``."""
    death_message: str = ""
    """For a dead node: the reason message (for a drained node, the drain's reason message)."""

    @property
    def state(self) -> str:
        """``ALIVE``, ``DRAINING`` or ``DEAD``."""
        if not self.alive:
            return "DEAD"
        return "DRAINING" if self.draining_deadline_ms is not None else "ALIVE"


def gcs_client(address: str):
    """A ``GcsClient`` for ``address`` (``host:port``), with token auth on; one per address."""
    enable_token_auth()
    return _client(address)


def forget_clients() -> None:
    """Drop cached clients (a cluster went down; a new one may reuse its port)."""
    _client.cache_clear()


@functools.lru_cache(maxsize=16)
def _client(address: str):
    return ray_private.gcs_client(address)


def list_nodes(address: str, timeout_s: float = 10.0) -> list[NodeView]:
    """Every node the GCS knows (alive and dead), with drain state and death reason."""
    from ray.core.generated import common_pb2, gcs_pb2

    client = gcs_client(address)
    infos = client.get_all_node_info(timeout=timeout_s)
    draining = client.get_draining_nodes(timeout=timeout_s)
    views = []
    for node_id, info in infos.items():
        hex_id = node_id.hex()
        alive = info.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE
        death = info.death_info
        views.append(
            NodeView(
                node_id=hex_id,
                name=info.node_name,
                ip=info.node_manager_address,
                alive=alive,
                is_head=info.is_head_node,
                resources=dict(info.resources_total),
                draining_deadline_ms=draining.get(hex_id) if alive else None,
                death_reason="" if alive else common_pb2.NodeDeathInfo.Reason.Name(death.reason),
                death_message="" if alive else death.reason_message,
            )
        )
    return views


def drain_node(
    address: str,
    node_id: str,
    *,
    reason: str = "PREEMPTION",
    message: str,
    deadline_s: float | None,
    timeout_s: float = 10.0,
) -> None:
    """Tell the GCS that node ``node_id`` is going away (``ray drain-node`` equivalent).

    The GCS stops scheduling new work there and publishes the drain, which Ray Train's
    ``get_preemption_info()`` reads. Ray does not kill the node at the deadline; the cloud does.

    Args:
        address: GCS address ``host:port``.
        node_id: Hex id of the node to drain.
        reason: ``PREEMPTION`` (cannot be rejected) or ``IDLE_TERMINATION``.
        message: Free text stored as the reason message (shown as the node's death message).
        deadline_s: Seconds until the node is force-killed; None for no deadline.
        timeout_s: RPC timeout.

    Raises:
        ValueError: unknown reason or negative deadline.
        RuntimeError: the GCS rejected the request.
    """
    from ray.core.generated import autoscaler_pb2

    if reason not in DRAIN_REASONS:
        raise ValueError(f"drain reason {reason!r} is not one of {', '.join(DRAIN_REASONS)}")
    if deadline_s is not None and deadline_s < 0:
        raise ValueError(f"drain deadline must be >= 0 seconds, got {deadline_s}")
    # Ray reads a 0 timestamp as "no deadline", so a deadline of 0 s becomes "now" (>= 1 ms).
    deadline_ms = 0 if deadline_s is None else max(1, int((time.time() + deadline_s) * 1000))
    accepted, rejection = gcs_client(address).drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value(f"DRAIN_NODE_REASON_{reason}"),
        message,
        deadline_ms,
        timeout=timeout_s,
    )
    if not accepted:
        raise RuntimeError(f"the GCS rejected draining node {node_id}: {rejection}")
