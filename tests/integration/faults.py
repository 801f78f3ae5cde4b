"""Fault injection for the integration tier: find and kill real Ray Train worker processes."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil


def _local_raylet_pid() -> int | None:
    """PID of the raylet this process started with ray.init(), if it started one."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    raylets = node.all_processes.get("raylet") or []
    return raylets[0].process.pid if raylets else None


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train workers of *our* Ray instance (other instances on the machine are left alone).

    Their process title names the actor class; they are children of our raylet.
    """
    raylet = _local_raylet_pid()
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "ppid"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "RayTrainWorker" in cmdline and (raylet is None or proc.info["ppid"] == raylet):
            pids.append(proc.info["pid"])
    return sorted(pids)


def worker_output() -> str:
    """What the Ray workers of *our* local Ray instance printed (their log files; streaming to the driver is lossy)."""
    import ray

    node = ray._private.worker._global_node
    logs = Path(node.get_session_dir_path()) / "logs"
    return "".join(path.read_text(errors="replace") for path in sorted(logs.glob("worker-*.out")))


def last_step(run_dir: Path) -> int:
    """Highest step recorded in a run's metrics.jsonl so far (0 if none)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def has_registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray's Train controller has registered a checkpoint of the run (its snapshot names one).

    A checkpoint is registered when the controller next polls the workers (about every 2 s), not when
    ``ray.train.report`` returns: a fault before that resumes from the checkpoint before it.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return "checkpoint_step" in snapshot.read_text()
    except OSError:
        return False


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` (a vanished process is fine)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Background:
    """Run a callable in a thread and collect its result or exception."""

    def __init__(self, fn: Callable[[], Any]):
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in join()
            self.error = e

    def done(self) -> bool:
        """Whether the callable has returned or raised."""
        return not self._thread.is_alive()

    def join(self, timeout_s: float) -> Any:
        """Wait for the result; re-raise the callable's exception."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("background run did not finish")
        if self.error is not None:
            raise self.error
        return self.result


def curve(run_dir: Path) -> dict[int, float]:
    """step -> loss; after a restart the re-run steps overwrite the lost ones."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


_UNINTERRUPTED: dict[tuple[str, ...], Path] = {}


def uninterrupted_run(tmp_path_factory, config: Path, overrides: list[str]) -> Path:
    """Run directory of an uninterrupted run of ``config`` with ``overrides``, trained once per test session.

    A run is a function of its settings (the same seeds on the same number of workers give the same
    losses and adapter, whichever Ray runs it), so the tests that compare a faulted run with the
    uninterrupted one share it: it trains on the Ray of the first test that asks.
    """
    from ftune.config import TrainJobConfig
    from ftune.yaml_config import load_config
    from train.job import run_training

    key = (str(config), *overrides)
    if key not in _UNINTERRUPTED:
        root = tmp_path_factory.mktemp("uninterrupted")
        run_training(load_config(TrainJobConfig, config, [f"storage.path={root}", *overrides]), name="baseline")
        _UNINTERRUPTED[key] = root / "baseline"
    return _UNINTERRUPTED[key]
