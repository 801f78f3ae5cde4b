"""A multi-node Ray cluster on this machine: a head and N worker nodes, each its own ``ray start``.

Each node is a separate ``ray start --block`` process with its own raylet, object store and
``--temp-dir`` (two raylets starting at once in one temp dir race for the same socket names), so
killing one worker's process tree loses that node exactly as losing a spot instance would. The
head carries a ``head`` resource and no GPUs; workers carry ``spot`` and ``worker``. Each node
also gets its own model cache (``FTUNE_MODEL_CACHE`` under its temp dir), as each machine of a real
cluster has its own disk: a replacement node fetches an ``s3://`` base model again. Token auth
stays on. ``up`` records pids and node ids in a state file so ``down`` stops exactly what it
started.

Typical use in a test::

    with LocalCluster(cpus_per_worker=1).up(workers=2) as cluster:
        ray.init(address=cluster.address)
        ...
        cluster.kill_worker(0)              # the spot node is gone
        cluster.drain_worker(1, deadline_s=60)  # a spot interruption notice for another
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal as signals
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from typing_extensions import Self

from cluster import gcs, processes
from cluster.auth import enable_token_auth
from cluster.local_config import HOST, LocalClusterConfig, head_command, worker_command
from ftune.atomic_files import write_text_atomic
from ftune.builtin_assets import ftune_home
from ftune.errors import UserError

NODE_START_ATTEMPTS = 3
"""Launches per worker node: Ray gives a raylet 30 s (not configurable) to register with the GCS."""
RAYLET_REGISTRATION_TIMEOUT = "The current node timed out during startup"
"""What ``ray start`` prints when its raylet missed that window."""


class ClusterError(UserError):
    """A local-cluster request that cannot be done as asked (nothing running, unknown node ...)."""


@dataclass
class NodeRecord:
    """One node started by this cluster, as written to the state file."""

    name: str
    """``head`` or ``worker-<index>``: the Ray ``--node-name``."""
    index: int | None
    """Worker index (never reused); None for the head."""
    pid: int
    """pid of the node's ``ray start --block`` process (the root of its process tree)."""
    temp_dir: str
    """The node's Ray ``--temp-dir`` (sessions, logs, sockets)."""
    log_path: str
    """stdout/stderr of ``ray start``."""
    node_id: str = ""
    """Hex Ray node id, once registered."""
    resources: dict[str, float] = field(default_factory=dict)
    """Resources it was started with."""
    removed: bool = False
    """True once killed or stopped through this cluster (its processes may still be exiting)."""


class LocalCluster:
    """Start, inspect, break and stop a local multi-node Ray cluster.

    Args:
        config: Shape of the cluster; keyword arguments override its fields.
        state_path: JSON file to record the cluster in (the CLI uses :func:`default_state_path`).
            Without one the cluster lives only as long as this process: it is stopped at exit.
    """

    def __init__(self, config: LocalClusterConfig | None = None, *, state_path: Path | None = None, **fields):
        base = config.model_dump() if config is not None else {}
        self.config = LocalClusterConfig(**{**base, **fields})
        self.state_path = Path(state_path) if state_path is not None else None
        self.cluster_id = ""
        self.base_dir = ""
        self.port = 0
        self.dashboard_port = 0
        self.nodes: list[NodeRecord] = []
        self._popen: dict[str, subprocess.Popen] = {}
        self._timers: list[threading.Timer] = []
        self._next_index = 0
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- lifecycle

    @property
    def address(self) -> str:
        """GCS address for ``ray.init(address=...)`` and ``ray start --address``."""
        self._require_up()
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard / job-submission address (``ray job submit --address``)."""
        self._require_up()
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def is_up(self) -> bool:
        """True between ``up`` and ``down``."""
        return bool(self.port)

    def up(self, workers: int) -> LocalCluster:
        """Start the head and ``workers`` worker nodes; return once all are alive in the GCS.

        Raises:
            ClusterError: this object is already up, or the state file names a running cluster.
            RuntimeError: a node did not come up (the message ends with its log).
        """
        if workers < 0:
            raise ClusterError(f"--workers must be >= 0, got {workers}")
        if self.is_up:
            raise ClusterError(f"this cluster is already up at {self.address}")
        if self.state_path is not None and self.state_path.exists():
            running = LocalCluster.load(self.state_path)
            if running.head_is_running():
                raise ClusterError(
                    f"a local cluster is already running at {running.address} "
                    f"(state file {self.state_path}); stop it with `ftune cluster local down`"
                )
            running.down()  # stale: clean whatever is left of it
        enable_token_auth()
        self.base_dir = tempfile.mkdtemp(prefix="ftr-", dir="/tmp")  # short: unix socket paths
        self.cluster_id = Path(self.base_dir).name
        self.port = _free_port()
        self.dashboard_port = _free_port()
        if self.state_path is None:
            atexit.register(self.down)
        try:
            head = self._spawn("head", None, head_command(self.config, self._ports(), self._node_dir("head")))
            self._await_nodes([head])
            self._start_workers(workers)
        except BaseException:
            self.down()
            raise
        self._save()
        return self

    def add_worker(self) -> NodeRecord:
        """Start one more worker node and wait until it is alive; returns its record."""
        self._require_up()
        (record,) = self._start_workers(1)
        self._save()
        return record

    def kill_worker(self, node: int | str, signal: int = signals.SIGKILL) -> str:
        """Kill one worker node; returns its node id.

        Args:
            node: Worker index, node name (``worker-1``) or hex node id.
            signal: SIGKILL kills the node's whole process tree at once (a lost spot instance;
                the GCS reports it dead after its health checks fail). Any other signal goes to
                the node's ``ray start`` process only, as Kubernetes signals a pod's PID 1: with
                SIGTERM, Ray 2.60 drains the node with reason PREEMPTION and shuts it down.
        """
        with self._lock:
            record = self._worker(node)
            marker = processes.node_marker(self.cluster_id, record.name)
            if signal == signals.SIGKILL:
                processes.kill(marker, record.pid)
            else:
                root = [p for p in processes.node_processes(marker, record.pid) if p.pid == record.pid]
                if not root:
                    raise ClusterError(f"node {record.name} is not running (its ray start process is gone)")
                processes.send(root, signal)
            self._reap(record.name, wait=signal == signals.SIGKILL)
            record.removed = True
            self._save()
            return record.node_id

    def drain_worker(
        self,
        node: int | str,
        reason: str = "PREEMPTION",
        deadline_s: float | None = 120.0,
        message: str = "ftune local cluster: simulated spot interruption",
        kill_at_deadline: bool = False,
    ) -> str:
        """Drain one worker node through the GCS, as the spot watcher does on a notice.

        The node stops taking new work, Ray Train sees it in ``get_preemption_info()``, and once
        idle its raylet exits (death reason ``AUTOSCALER_DRAIN_PREEMPTED``). Returns its node id.

        Args:
            node: Worker index, node name or hex node id.
            reason: ``PREEMPTION`` or ``IDLE_TERMINATION``.
            deadline_s: Seconds until the node would be reclaimed; None for no deadline.
            message: Drain reason message.
            kill_at_deadline: Also SIGKILL the node when the deadline passes, as the cloud
                would (a timer in this process; cancelled by ``down``).
        """
        record = self._worker(node)
        gcs.drain_node(self.address, record.node_id, reason=reason, message=message, deadline_s=deadline_s)
        if kill_at_deadline:
            if deadline_s is None:
                raise ValueError("kill_at_deadline needs a deadline_s")
            timer = threading.Timer(deadline_s, self._kill_if_running, args=(record.name,))
            timer.daemon = True
            timer.start()
            self._timers.append(timer)
        return record.node_id

    def down(self) -> None:
        """Stop every process of every node (workers first), delete temp dirs and the state file."""
        with self._lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            workers = [r for r in self.nodes if r.index is not None]
            heads = [r for r in self.nodes if r.index is None]
            for group in (workers, heads):
                processes.stop(
                    [(processes.node_marker(self.cluster_id, r.name), r.pid) for r in group],
                    grace_s=self.config.stop_grace_s,
                )
                for record in group:
                    self._reap(record.name, wait=True)
                    record.removed = True
            if self.base_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            if self.state_path is not None:
                self.state_path.unlink(missing_ok=True)
            gcs.forget_clients()
            self.port = 0
        atexit.unregister(self.down)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ----------------------------------------------------------------- inspection

    def list_nodes(self) -> list[gcs.NodeView]:
        """Every node of the cluster as the GCS sees it (alive, draining, dead)."""
        return gcs.list_nodes(self.address)

    def node(self, node: int | str) -> gcs.NodeView:
        """The GCS view of one node (worker index, node name, hex id, or ``head``)."""
        record = self._record(node)
        for view in self.list_nodes():
            if view.node_id == record.node_id:
                return view
        raise ClusterError(f"the GCS does not know node {record.name} ({record.node_id})")

    def wait_for_state(self, node: int | str, state: str, timeout_s: float = 30.0) -> gcs.NodeView:
        """Wait until a node is ``ALIVE``, ``DRAINING`` or ``DEAD``; returns its view.

        Raises:
            TimeoutError: it is not in that state after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.node(node)
            if view.state == state:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {view.name} is {view.state}, not {state}, after {timeout_s} s")
            time.sleep(0.2)

    def pids(self, node: int | str) -> list[int]:
        """pids of the live processes of one node (its ``ray start`` process first)."""
        record = self._record(node)
        marker = processes.node_marker(self.cluster_id, record.name)
        return [p.pid for p in processes.node_processes(marker, record.pid)]

    def head_is_running(self) -> bool:
        """True if the head's GCS port accepts connections."""
        return bool(self.port) and _port_open(self.port)

    # ----------------------------------------------------------------- state file

    @classmethod
    def load(cls, state_path: Path) -> LocalCluster:
        """Re-attach to the cluster recorded in ``state_path`` (for ``down``/``status``).

        Raises:
            ClusterError: no readable state file.
        """
        state_path = Path(state_path)
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClusterError(
                f"no local cluster recorded in {state_path}; start one with `ftune cluster local up`"
            ) from None
        except ValueError as e:
            raise ClusterError(f"{state_path} is not a valid cluster state file ({e}); delete it") from e
        cluster = cls(LocalClusterConfig(**state["config"]), state_path=state_path)
        cluster.cluster_id = state["cluster_id"]
        cluster.base_dir = state["base_dir"]
        cluster.port = state["port"]
        cluster.dashboard_port = state["dashboard_port"]
        cluster.nodes = [NodeRecord(**n) for n in state["nodes"]]
        cluster._next_index = state["next_index"]
        return cluster

    def _save(self) -> None:
        if self.state_path is None or not self.is_up:
            return
        state = {
            "cluster_id": self.cluster_id,
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "base_dir": self.base_dir,
            "port": self.port,
            "dashboard_port": self.dashboard_port,
            "next_index": self._next_index,
            "config": self.config.model_dump(),
            "nodes": [asdict(n) for n in self.nodes],
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.state_path, json.dumps(state, indent=2) + "\n")

    # ----------------------------------------------------------------- internals

    def _ports(self) -> dict[str, int]:
        return {
            "gcs": self.port,
            "dashboard": self.dashboard_port,
            "client": _free_port(),
            "agent": _free_port(),
        }

    def _node_dir(self, name: str) -> str:
        return os.path.join(self.base_dir, name)

    def _start_workers(self, count: int) -> list[NodeRecord]:
        """Start ``count`` worker nodes and wait for them, relaunching (as a cloud autoscaler does) any
        whose raylet missed Ray's fixed 30 s registration window, which a busy machine can make it miss."""
        started: list[NodeRecord] = []
        pending = [self._spawn_worker() for _ in range(count)]
        for attempt in range(NODE_START_ATTEMPTS):
            failed = self._await_nodes(pending, relaunchable=attempt + 1 < NODE_START_ATTEMPTS)
            started += [r for r in pending if r not in failed]
            if not failed:
                return started
            for record in failed:
                self._remove_failed(record)
            pending = [self._spawn_worker() for _ in failed]
        return started  # not reached: the last attempt raises

    def _remove_failed(self, record: NodeRecord) -> None:
        """Kill what is left of a worker whose start failed and forget it."""
        with self._lock:
            processes.kill(processes.node_marker(self.cluster_id, record.name), record.pid)
            self._reap(record.name, wait=True)
            record.removed = True
            self.nodes.remove(record)

    def _spawn_worker(self) -> NodeRecord:
        index = self._next_index
        self._next_index += 1
        name = f"worker-{index}"
        command = worker_command(self.config, self.address, name, _free_port(), self._node_dir(name))
        return self._spawn(name, index, command)

    def _spawn(self, name: str, index: int | None, command: list[str]) -> NodeRecord:
        temp_dir = self._node_dir(name)
        os.makedirs(temp_dir, exist_ok=True)
        log_path = os.path.join(self.base_dir, f"{name}.log")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_USAGE_STATS_ENABLED": "0",
                processes.MARKER_ENV: processes.node_marker(self.cluster_id, name),
                # The node's own disk; Ray's worker processes inherit it from the raylet.
                "FTUNE_MODEL_CACHE": os.path.join(temp_dir, "model_cache"),
            }
        )
        if index is None:
            # On SIGTERM Ray 2.60's `ray start` drains its node and waits (30 s by default) for the raylet
            # to go idle and exit. A head never goes idle (it hosts Ray's own actors), so the head stops at
            # once; a worker keeps the drain (a SIGTERMed worker is a preempted spot node, see kill_worker).
            env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # survives the CLI; no terminal signals
            )
        resources = json.loads(command[command.index("--resources") + 1])
        record = NodeRecord(name, index, proc.pid, temp_dir, log_path, resources=resources)
        with self._lock:
            self._popen[name] = proc
            self.nodes.append(record)
        return record

    def _await_nodes(self, records: list[NodeRecord], relaunchable: bool = False) -> list[NodeRecord]:
        """Wait until every record's node is alive in the GCS and note its node id.

        Returns the nodes that gave up waiting for their raylet to register (only if ``relaunchable``;
        otherwise, like any other failed start, that raises).
        """
        deadline = time.monotonic() + self.config.start_timeout_s
        pending = {r.name: r for r in records}
        failed: list[NodeRecord] = []
        while pending:
            for record in list(pending.values()):
                code = self._popen[record.name].poll()
                if code is not None and relaunchable and RAYLET_REGISTRATION_TIMEOUT in _tail(record.log_path):
                    failed.append(pending.pop(record.name))
                elif code is not None:
                    raise RuntimeError(
                        f"node {record.name} exited with code {code} while starting; "
                        f"{record.log_path} ends with:\n{_tail(record.log_path)}"
                    )
            if time.monotonic() > deadline:
                names = ", ".join(pending)
                raise RuntimeError(
                    f"nodes {names} did not register within {self.config.start_timeout_s} s; "
                    f"see the logs under {self.base_dir}"
                )
            if _port_open(self.port):
                try:
                    alive = {v.name: v for v in gcs.list_nodes(self.address, timeout_s=5) if v.alive}
                except Exception:  # noqa: BLE001 - the GCS is still starting; ask again
                    alive = {}
                for name in [n for n in pending if n in alive]:
                    pending.pop(name).node_id = alive[name].node_id
            if pending:
                time.sleep(0.25)
        return failed

    def _record(self, node: int | str) -> NodeRecord:
        for record in self.nodes:
            if isinstance(node, int) and not isinstance(node, bool):
                if record.index == node:
                    return record
            elif node in (record.name, record.node_id):
                return record
        known = ", ".join(f"{r.name} ({r.node_id[:8]})" for r in self.nodes)
        raise ClusterError(f"no node {node!r} in this cluster; nodes: {known}")

    def _worker(self, node: int | str) -> NodeRecord:
        self._require_up()
        record = self._record(node)
        if record.index is None:
            raise ClusterError("that is the head node; stop the whole cluster with down()")
        return record

    def _kill_if_running(self, name: str) -> None:
        try:
            if self.is_up and self.pids(name):
                self.kill_worker(name)
        except ClusterError:  # the cluster went down meanwhile
            pass

    def _reap(self, name: str, wait: bool) -> None:
        proc = self._popen.get(name)
        if proc is None:
            return
        try:
            proc.wait(timeout=5) if wait else proc.poll()
        except subprocess.TimeoutExpired:
            pass

    def _require_up(self) -> None:
        if not self.is_up:
            raise ClusterError("the local cluster is not up; call up() first")


def default_state_path() -> Path:
    """Where the CLI records its local cluster: ``$FTUNE_HOME/cluster/local.json``."""
    return ftune_home() / "cluster" / "local.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
