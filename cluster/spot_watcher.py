"""Drain this Ray node, reason PREEMPTION, when its spot instance is about to be reclaimed.

Runs next to the raylet on every spot worker (``cluster/aws-spot.yaml`` starts it after ``ray start``):

    python -m cluster.spot_watcher [--url URL] [--interval S] [--node-id ID] [--address HOST:PORT]
                                   [--supervise]

* polls EC2's ``spot/instance-action`` (IMDSv2, IMDSv1 fallback); on a notice it drains the node
  once with the notice's time as deadline, then stays idle (or exits with ``--exit-after-drain``);
  a poll that fails, whatever the endpoint answered, is logged and counts as "no notice";
* on SIGTERM (the instance or pod is shutting down) it drains with ``--sigterm-deadline-s`` and exits;
  on SIGINT it exits without draining (the watcher is being replaced, not the node);
* with ``--supervise`` it runs the watcher as a child process and restarts it whenever it fails
  (crash, kill), with a backoff; SIGTERM and SIGINT are passed on to the child;
* with ``--drain-now [--wait]`` it drains at once and exits, with ``--wait`` only once the node is
  gone or the deadline passed (a Kubernetes ``preStop`` hook: the pod is not signalled meanwhile).

A drained node takes no new work, Ray Train's ``get_preemption_info()`` reports it (Train polls
the GCS's draining nodes), and its raylet exits once idle. This is ``ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION`` done from Python, with the node found automatically.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time

import psutil

from cluster import gcs
from cluster.spot_notice import (
    DEFAULT_DEADLINE_S,
    DEFAULT_URL,
    InstanceMetadataClient,
    NoticeError,
    SpotNotice,
)

logger = logging.getLogger("cluster.spot_watcher")


class SpotWatcher:
    """Polls for an interruption notice and drains the local Ray node on one (or on SIGTERM).

    Args:
        client: Where notices come from (``InstanceMetadataClient`` or a test double).
        address: GCS address; None finds the local cluster as ``ray drain-node`` does.
        node_id: Hex id of the node to drain; None picks the alive node whose IP is this machine's.
        interval_s: Seconds between polls (EC2 recommends 5).
        sigterm_deadline_s: Drain deadline on SIGTERM: the pod's terminationGracePeriodSeconds
            or the instance's shutdown grace, minus a margin.
        default_deadline_s: Deadline for a notice whose time cannot be read.
        exit_after_drain: Return after draining on a notice instead of idling until SIGTERM.
    """

    def __init__(
        self,
        client: InstanceMetadataClient,
        *,
        address: str | None = None,
        node_id: str | None = None,
        interval_s: float = 5.0,
        sigterm_deadline_s: float = 30.0,
        default_deadline_s: float = DEFAULT_DEADLINE_S,
        exit_after_drain: bool = False,
    ):
        self.client = client
        self.address = address
        self.node_id = node_id
        self.interval_s = interval_s
        self.sigterm_deadline_s = sigterm_deadline_s
        self.default_deadline_s = default_deadline_s
        self.exit_after_drain = exit_after_drain
        self.drained = False
        self.cycles = 0
        """Loop turns completed (polls, and idle turns after a drain): shows the loop is alive."""
        self._failures = 0
        self._wake = threading.Event()
        self._sigterm = False
        self._stop = False

    def run(self) -> int:
        """Poll until drained-and-done, SIGTERM or :meth:`stop`; returns the exit code."""
        logger.info("watching %s every %.1f s", self.client.url, self.interval_s)
        while not self._stop:
            if self._sigterm:
                return self._drain_on_sigterm()
            notice = None if self.drained else self._poll()
            if notice is not None:
                logger.warning("%s", notice.describe())
                deadline_s = notice.deadline_s(default_s=self.default_deadline_s)
                if self.drain_now(deadline_s, notice.describe()) and self.exit_after_drain:
                    return 0
            self.cycles += 1
            self._wake.wait(self.interval_s)
            self._wake.clear()
        return 0

    def _poll(self) -> SpotNotice | None:
        """One read of the notice; a failure of any kind is logged and counts as no notice this poll."""
        try:
            notice = self.client.notice()
        except Exception as e:  # noqa: BLE001 - whatever the endpoint sends, the watcher must keep watching
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:  # don't flood the log
                logger.warning(
                    "cannot read the interruption notice (%d in a row): %s",
                    self._failures,
                    e,
                    exc_info=not isinstance(e, NoticeError),  # an unexpected failure: keep its traceback
                )
            return None
        self._failures = 0
        return notice

    def drain_now(self, deadline_s: float, message: str) -> bool:
        """Drain the node (at most once); returns True once it is drained."""
        if self.drained:
            return True
        try:
            address = resolve_address(self.address)
            node_id = self.node_id or local_node_id(address)
            gcs.drain_node(address, node_id, reason="PREEMPTION", message=message, deadline_s=deadline_s)
        except Exception as e:  # noqa: BLE001 - log and retry next poll; the watcher must not die
            logger.error("could not drain the node (will retry): %s", e)
            return False
        self.drained = True
        self.address, self.node_id = address, node_id
        logger.warning("drained node %s: reason PREEMPTION, deadline in %.0f s", node_id, deadline_s)
        return True

    def wait_until_gone(self, timeout_s: float) -> bool:
        """After a drain, wait until the GCS reports the node dead (its raylet exits once idle).

        A Kubernetes preStop hook blocks pod termination while it runs, so waiting here gives
        Ray Train the drain window to checkpoint before the pod gets SIGTERM. Returns False if
        the node is still alive after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        said = False
        while time.monotonic() < deadline:
            try:
                views = {v.node_id: v for v in gcs.list_nodes(resolve_address(self.address), timeout_s=5)}
                if self.node_id not in views or not views[self.node_id].alive:
                    return True
                if not said:
                    logger.info("node %s is still alive; waiting until it is gone (%.0f s at most)",
                                self.node_id, timeout_s)  # fmt: skip
                    said = True
            except Exception as e:  # noqa: BLE001 - the GCS may be going away too; keep waiting
                logger.info("cannot read the node's state yet: %s", e)
            time.sleep(1.0)
        return False

    def _drain_on_sigterm(self) -> int:
        # The GCS may be briefly unreachable while everything shuts down: retry for a few seconds.
        give_up = time.monotonic() + min(10.0, self.sigterm_deadline_s)
        while not self.drain_now(self.sigterm_deadline_s, "SIGTERM: instance/pod is shutting down"):
            if time.monotonic() > give_up:
                return 1
            time.sleep(1.0)
        return 0

    def handle_sigterm(self, *_) -> None:
        """Signal handler: drain (from the main loop) and exit."""
        self._sigterm = True
        self._wake.set()

    def stop(self, *_) -> None:
        """Make :meth:`run` return without draining (SIGINT, tests, embedding)."""
        self._stop = True
        self._wake.set()


class Supervisor:
    """Runs a watcher command as a child process and restarts it when it fails (systemd's
    ``Restart=on-failure``): a watcher that died would leave its node blind to the next notice.

    Exit code 0 is a deliberate end (drained on SIGTERM, ``--exit-after-drain``) and ends supervision;
    anything else (a crash, a kill) restarts the child after a backoff that doubles up to
    ``max_backoff_s`` and starts over once a child has run for ``healthy_s``. A signal handled with
    :meth:`pass_on` goes to the child and ends supervision once the child exits.

    Args:
        command: The child's command line.
        backoff_s: First wait before a restart.
        max_backoff_s: Longest wait before a restart.
        healthy_s: A child that ran this long resets the backoff.
    """

    def __init__(
        self,
        command: list[str],
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        healthy_s: float = 300.0,
    ):
        self.command = command
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_s = healthy_s
        self.starts = 0
        """Children started so far."""
        self.child: subprocess.Popen | None = None
        """The current child process."""
        self._passed_on: int | None = None
        self._wake = threading.Event()

    def run(self) -> int:
        """Run and restart the child until it exits 0 or a signal was passed on.

        Returns:
            The child's last exit code (128 + N for a child killed by signal N); 0 after SIGINT.
        """
        delay = self.backoff_s
        while self._passed_on is None:
            started = time.monotonic()
            self.child = subprocess.Popen(self.command)
            self.starts += 1
            if self._passed_on is not None:  # a signal arrived while it was being started
                self.child.send_signal(self._passed_on)
            code = self.child.wait()
            if self._passed_on == signal.SIGINT:
                return 0
            if code == 0 or self._passed_on is not None:
                return code if code >= 0 else 128 - code
            if time.monotonic() - started >= self.healthy_s:
                delay = self.backoff_s
            logger.error("the spot watcher exited with code %d; restarting it in %.3g s", code, delay)
            self._wake.wait(delay)
            delay = min(2 * delay, self.max_backoff_s)
        return 0

    def pass_on(self, signum: int, *_) -> None:
        """Signal handler: send ``signum`` to the child and restart it no more."""
        self._passed_on = signum
        self._wake.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signum)


def resolve_address(address: str | None) -> str:
    """``address`` itself, else the local cluster (``RAY_ADDRESS``, then ``ray start``'s record)."""
    if address:
        return address
    from ftune.compat.ray_private import local_cluster_address

    return local_cluster_address()


def local_node_id(address: str) -> str:
    """The alive Ray node whose IP is one of this machine's.

    Raises:
        LookupError: none or several (several raylets on one machine: pass ``--node-id``).
    """
    local_ips = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    mine = [n for n in gcs.list_nodes(address) if n.alive and n.ip in local_ips]
    if len(mine) == 1:
        return mine[0].node_id
    found = ", ".join(f"{n.name} ({n.node_id[:12]}, {n.ip})" for n in mine) or "none"
    raise LookupError(f"expected one alive Ray node on this machine, found {found}; pass --node-id")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.spot_watcher", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="instance-action URL (default: EC2 IMDS)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    parser.add_argument("--node-id", default=None, help="hex Ray node id (default: the node on this machine)")
    parser.add_argument("--address", default=None, help="GCS host:port (default: the local cluster)")
    parser.add_argument("--sigterm-deadline-s", type=float, default=30.0,
                        help="drain deadline on SIGTERM / --drain-now (grace period minus a margin)")  # fmt: skip
    parser.add_argument("--default-deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help="deadline for a notice whose time cannot be read")  # fmt: skip
    parser.add_argument("--exit-after-drain", action="store_true", help="exit after draining on a notice")
    parser.add_argument("--drain-now", action="store_true", help="drain at once and exit (preStop hook)")
    parser.add_argument("--wait", action="store_true",
                        help="with --drain-now: return only once the node is gone or the deadline passed")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=2.0, help="HTTP timeout per request")
    parser.add_argument("--supervise", action="store_true",
                        help="run the watcher as a child process, restarted whenever it fails")  # fmt: skip
    return parser


def supervise(argv: list[str]) -> int:
    """Run ``python -m cluster.spot_watcher ARGV`` (without ``--supervise``) under a :class:`Supervisor`."""
    child_argv = [a for a in argv if a != "--supervise"]
    supervisor = Supervisor([sys.executable, "-m", "cluster.spot_watcher", *child_argv])
    signal.signal(signal.SIGTERM, supervisor.pass_on)
    signal.signal(signal.SIGINT, supervisor.pass_on)
    return supervisor.run()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cluster.spot_watcher``."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s spot_watcher: %(message)s")
    if args.supervise:
        if args.drain_now:
            _parser().error("--supervise watches for notices; it does not go with --drain-now")
        return supervise(argv)
    watcher = SpotWatcher(
        InstanceMetadataClient(args.url, timeout_s=args.timeout),
        address=args.address,
        node_id=args.node_id,
        interval_s=args.interval,
        sigterm_deadline_s=args.sigterm_deadline_s,
        default_deadline_s=args.default_deadline_s,
        exit_after_drain=args.exit_after_drain,
    )
    if args.drain_now:
        if not watcher.drain_now(args.sigterm_deadline_s, "preStop: pod is terminating"):
            return 1
        if args.wait and not watcher.wait_until_gone(args.sigterm_deadline_s):
            logger.warning("node still alive at the drain deadline; letting the pod stop")
        return 0
    signal.signal(signal.SIGTERM, watcher.handle_sigterm)
    signal.signal(signal.SIGINT, watcher.stop)
    return watcher.run()


if __name__ == "__main__":
    sys.exit(main())
