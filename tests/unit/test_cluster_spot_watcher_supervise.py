"""The watcher is supervised: restarted with a backoff when it fails, stopped (not drained) when replaced.

Covers ``Supervisor`` with scripted children, ``python -m cluster.spot_watcher --supervise`` against
the fake IMDS (its child killed and restarted), and the start command in ``cluster/aws-spot.yaml``
run by bash with a stand-in ``python``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.fake_imds import FakeInstanceMetadata
from cluster.spot_watcher import Supervisor
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


def script(tmp_path: Path, body: str) -> list[str]:
    """A child command running ``body``; ``RUNS`` in it is a file gaining one line per start."""
    path = tmp_path / "child.py"
    path.write_text(f"RUNS = {str(tmp_path / 'runs')!r}\n" + textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_a_failing_child_is_restarted_with_a_doubling_backoff_until_it_exits_0(tmp_path, caplog):
    command = script(
        tmp_path,
        """
        import sys
        with open(RUNS, "a") as f:
            f.write("run\\n")
        sys.exit(0 if open(RUNS).read().count("run") == 5 else 3)
        """,
    )
    supervisor = Supervisor(command, backoff_s=0.01, max_backoff_s=0.04)
    with caplog.at_level(logging.ERROR, logger="cluster.spot_watcher"):
        assert supervisor.run() == 0
    assert supervisor.starts == 5
    waits = [r.getMessage().rsplit(" in ", 1)[1] for r in caplog.records if "restarting" in r.getMessage()]
    assert waits == ["0.01 s", "0.02 s", "0.04 s", "0.04 s"]
    assert all("exited with code 3" in r.getMessage() for r in caplog.records)


def test_a_killed_child_is_restarted(tmp_path):
    command = script(
        tmp_path,
        """
        import os, signal
        with open(RUNS, "a") as f:
            f.write("run\\n")
        if open(RUNS).read().count("run") == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    supervisor = Supervisor(command, backoff_s=0.01)
    assert supervisor.run() == 0
    assert supervisor.starts == 2


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 7), (signal.SIGINT, 0)])
def test_a_passed_on_signal_reaches_the_child_and_ends_supervision(tmp_path, signum, code):
    command = script(
        tmp_path,
        """
        import signal, sys
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
        signal.signal(signal.SIGINT, lambda *_: sys.exit(9))
        with open(RUNS, "a") as f:
            f.write("run\\n")
        while True:
            signal.pause()
        """,
    )
    supervisor = Supervisor(command, backoff_s=0.01)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", supervisor.run()), daemon=True)
    thread.start()
    try:
        wait_for(lambda: (tmp_path / "runs").exists(), "the child to start", 20)
        supervisor.pass_on(signum)
        thread.join(timeout=20)
    finally:
        if supervisor.child is not None and supervisor.child.poll() is None:
            supervisor.child.kill()
    assert result.get("code") == code, "SIGTERM: the child's code; SIGINT: a quiet 0"
    assert supervisor.starts == 1, "no restart after a passed-on signal, whatever the child's code"


def test_the_supervised_watcher_comes_back_after_a_kill_and_sigint_stops_it_without_draining():
    with FakeInstanceMetadata() as imds:
        command = [sys.executable, "-m", "cluster.spot_watcher", "--supervise", "--url", imds.url,
                   "--interval", "0.05", "--address", "127.0.0.1:1", "--node-id", "ab" * 28]  # fmt: skip
        supervisor = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            parent = psutil.Process(supervisor.pid)
            first = wait_for(parent.children, "the watcher child", 30)[0]
            wait_for(lambda: imds.notice_gets(), "the first watcher to poll", 30)
            first.kill()
            second = wait_for(
                lambda: [c for c in parent.children() if c.pid != first.pid], "a restarted watcher", 30
            )[0]
            polls = len(imds.notice_gets())
            wait_for(lambda: len(imds.notice_gets()) > polls, "the restarted watcher to poll", 30)
            supervisor.send_signal(signal.SIGINT)
            assert supervisor.wait(timeout=30) == 0
            assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
            output = supervisor.communicate(timeout=30)[0]
    assert "restarting it in 1 s" in output, output
    assert "drain" not in output, "SIGINT stops the watcher without draining"


FAKE_PYTHON = """#!{python}
import os, signal, sys
log = open(os.environ["FAKE_PYTHON_LOG"], "a", buffering=1)
log.write(f"start {{os.getpid()}} {{' '.join(sys.argv[1:])}}\\n")

def stop(signum, frame):
    log.write(f"signal {{os.getpid()}} {{signal.Signals(signum).name}}\\n")
    sys.exit(0)

signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
while True:
    signal.pause()
"""


def test_the_aws_start_command_supervises_the_watcher_and_replaces_it_with_sigint(tmp_path):
    """Run the YAML's command twice with bash, ``python`` standing in for the real one."""
    commands = yaml.safe_load((REPO / "cluster" / "aws-spot.yaml").read_text())["worker_start_ray_commands"]
    (command,) = [c for c in commands if "cluster.spot_watcher" in c]
    assert "/tmp/ftune_spot_watcher" in command
    command = command.replace("/tmp/ftune_spot_watcher", str(tmp_path / "ftune_spot_watcher"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "fake.log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_PYTHON_LOG": str(log)}

    def starts() -> list[list[str]]:
        return [line.split()[1:] for line in log.read_text().splitlines() if line.startswith("start ")]

    pids = []
    try:
        for n in (1, 2):
            subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, check=True, timeout=30)
            wait_for(lambda: log.exists() and len(starts()) == n, f"start number {n}", 30)
            pids.append(starts()[-1][0])
            assert (tmp_path / "ftune_spot_watcher.pid").read_text().strip() == pids[-1]
        assert starts()[-1][1:4] == ["-m", "cluster.spot_watcher", "--supervise"]
        wait_for(lambda: f"signal {pids[0]} " in log.read_text(), "the first watcher to be stopped", 30)
        assert f"signal {pids[0]} SIGINT" in log.read_text(), "replaced with SIGINT: SIGTERM would drain"
        assert f"signal {pids[1]} " not in log.read_text(), "the new watcher keeps running"
    finally:
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
