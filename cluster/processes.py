"""Find and signal every process of one local Ray node, including orphans whose parent already died.

Each node's ``ray start --block`` runs with ``FTUNE_LOCAL_NODE=<cluster id>/<node name>`` in its
environment; the raylet, agents and Ray workers inherit it, so a node's processes are found by that
marker even when they have been re-parented (Ray workers also leave the ``ray start`` process
group, so a process-group kill would miss them).
"""

from __future__ import annotations

import signal
import time

import psutil

MARKER_ENV = "FTUNE_LOCAL_NODE"


def node_marker(cluster_id: str, node_name: str) -> str:
    """Value of ``FTUNE_LOCAL_NODE`` for one node of one cluster."""
    return f"{cluster_id}/{node_name}"


def node_processes(marker: str, root_pid: int | None = None) -> list[psutil.Process]:
    """Live processes of the node tagged ``marker``: ``root_pid``'s tree plus any marked orphan.

    The ``ray start`` process (``root_pid``) comes first so it can be signalled before its
    children and cannot react to their death.
    """
    found: dict[int, psutil.Process] = {}
    if root_pid is not None:
        try:
            root = psutil.Process(root_pid)
            if _has_marker(root, marker):
                found[root.pid] = root
                for child in root.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            pass
    for proc in psutil.process_iter():
        if proc.pid not in found and _has_marker(proc, marker):
            found[proc.pid] = proc
    return [p for p in found.values() if _running(p)]


def send(processes: list[psutil.Process], sig: int) -> None:
    """Send ``sig`` to each process, ignoring ones that already exited."""
    for proc in processes:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def stop(nodes: list[tuple[str, int | None]], grace_s: float = 10.0) -> list[int]:
    """Stop the given nodes: SIGTERM each ``ray start`` process, SIGKILL what is left after ``grace_s``.

    Only the ``ray start`` process is signalled first: it shuts its node down in order and reaps
    its children. Signalling the raylet directly as well would leave the ``ray start`` process
    blocked for up to 30 s in a drain RPC to a raylet that is already gone.

    Args:
        nodes: ``(marker, root_pid)`` of each node; all are signalled at once.
        grace_s: Seconds to wait for a clean exit.

    Returns:
        The pids that had to be SIGKILLed.
    """
    procs = [p for marker, root in nodes for p in node_processes(marker, root)]
    send([p for p in procs if p.pid in {root for _, root in nodes}], signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_running(p) for p in procs):
        time.sleep(0.2)
    # Processes started while we waited (a worker the raylet was launching) are caught here too.
    again = [p for marker, root in nodes for p in node_processes(marker, root)]
    leftovers = list({p.pid: p for p in [*procs, *again] if _running(p)}.values())
    send(leftovers, signal.SIGKILL)
    psutil.wait_procs(leftovers, timeout=5)
    return sorted(p.pid for p in leftovers)


def kill(marker: str, root_pid: int | None) -> list[int]:
    """SIGKILL every process of a node at once, as if its machine vanished; wait until gone."""
    procs = node_processes(marker, root_pid)
    send(procs, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=5)
    return sorted(p.pid for p in procs)


def _has_marker(proc: psutil.Process, marker: str) -> bool:
    try:
        return proc.environ().get(MARKER_ENV) == marker
    except psutil.Error:
        return False


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(marker: str, root_pid: int | None, timeout_s: float) -> bool:
    """Wait until no process of the node is left; True if none is."""
    deadline = time.monotonic() + timeout_s
    while node_processes(marker, root_pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
