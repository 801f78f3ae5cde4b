"""The shape of a local cluster and the ``ray start`` command line of each of its nodes."""

from __future__ import annotations

import json
import sys

import pydantic

from ftune.yaml_config import Section

HOST = "127.0.0.1"


class LocalClusterConfig(Section):
    """Shape of a local cluster; every node is a separate raylet on this machine."""

    head_cpus: int = pydantic.Field(1, ge=0)
    """CPUs of the head node (drivers, Tune/Train controllers). The head never gets GPUs."""
    cpus_per_worker: int = pydantic.Field(1, ge=1)
    """CPUs of each worker node."""
    spot_resource: float = pydantic.Field(1.0, ge=0)
    """Amount of the ``spot`` custom resource per worker; 0 makes on-demand workers."""
    object_store_mb: int = pydantic.Field(128, ge=80)
    """Object store size per node in MiB (Ray's minimum is ~75 MiB)."""
    dashboard: bool = True
    """Start the dashboard (job submission, state API, ``ray list nodes``). Without it the head
    starts ~10 fewer processes, which matters on a small CI machine."""
    health_check_period_ms: int = pydantic.Field(1000, ge=100)
    """How often the GCS health-checks each raylet (Ray's default is 3000)."""
    health_check_failure_threshold: int = pydantic.Field(5, ge=1)
    """Missed health checks before the GCS marks a node dead: a killed node is reported dead
    after about period x threshold (5 s with the defaults; ~15 s with Ray's)."""
    start_timeout_s: float = pydantic.Field(120.0, gt=0)
    """How long to wait for a node to register with the GCS."""
    stop_grace_s: float = pydantic.Field(10.0, ge=0)
    """How long ``down`` waits after SIGTERM before it SIGKILLs what is left."""


def head_command(config: LocalClusterConfig, ports: dict[str, int], temp_dir: str) -> list[str]:
    """``ray start`` arguments of the head: no GPUs, a ``head`` resource, fast failure detection."""
    system_config = {
        "health_check_period_ms": config.health_check_period_ms,
        "health_check_failure_threshold": config.health_check_failure_threshold,
    }
    return [
        *_ray_start(config.head_cpus, {"head": 1}, config.object_store_mb, "head", ports["agent"], temp_dir),
        "--head",
        "--port", str(ports["gcs"]),
        "--dashboard-host", HOST,
        "--dashboard-port", str(ports["dashboard"]),
        "--ray-client-server-port", str(ports["client"]),
        "--include-dashboard", "true" if config.dashboard else "false",
        "--system-config", json.dumps(system_config),
    ]  # fmt: skip


def worker_command(
    config: LocalClusterConfig, address: str, name: str, agent_port: int, temp_dir: str
) -> list[str]:
    """``ray start`` arguments of one worker node joining ``address``."""
    resources = {"worker": 1} | ({"spot": config.spot_resource} if config.spot_resource else {})
    return [
        *_ray_start(config.cpus_per_worker, resources, config.object_store_mb, name, agent_port, temp_dir),
        "--address", address,
    ]  # fmt: skip


def _ray_start(
    cpus: int, resources: dict, object_store_mb: int, name: str, agent_port: int, temp_dir: str
) -> list[str]:
    # Several raylets share this machine: every port is distinct or picked by the OS (0), and
    # each node has its own temp dir. Ray maps --node-ip-address 127.0.0.1 to this machine's
    # routable IP on Linux (services.resolve_ip_for_localhost); the dashboard stays on 127.0.0.1.
    return [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
        "--node-ip-address", HOST,
        "--node-name", name,
        "--num-cpus", str(cpus),
        "--num-gpus", "0",
        "--resources", json.dumps(resources),
        "--object-store-memory", str(object_store_mb * 1024 * 1024),
        "--temp-dir", temp_dir,
        "--dashboard-agent-listen-port", str(agent_port),
        "--min-worker-port", "0",
        "--max-worker-port", "0",
        "--disable-usage-stats",
    ]  # fmt: skip
