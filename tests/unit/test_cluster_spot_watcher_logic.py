"""The spot watcher's decisions: drain once on a notice with its deadline, drain on SIGTERM, retry failures."""

from __future__ import annotations

import threading
import time

import pytest

from cluster import spot_watcher
from cluster.spot_notice import NoticeError, SpotNotice, parse_instance_action
from cluster.spot_watcher import SpotWatcher
from tests.waiting import wait_for


class ScriptedNotices:
    """Returns the queued answers in order, then repeats the last one."""

    url = "fake://instance-action"

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def notice(self) -> SpotNotice | None:
        self.calls += 1
        answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class DrainCalls(list):
    """drain_node calls made; ``failures`` are raised, in order, by the next calls."""

    def __init__(self):
        super().__init__()
        self.failures: list[Exception] = []


@pytest.fixture
def drains(monkeypatch):
    """Record drain_node calls instead of talking to a GCS."""
    calls = DrainCalls()
    failures = calls.failures

    def drain_node(address, node_id, *, reason, message, deadline_s):
        if failures:
            raise failures.pop(0)
        calls.append(
            {
                "address": address,
                "node_id": node_id,
                "reason": reason,
                "message": message,
                "deadline_s": deadline_s,
            }
        )

    monkeypatch.setattr(spot_watcher.gcs, "drain_node", drain_node)
    return calls


def start(watcher: SpotWatcher) -> tuple[threading.Thread, dict]:
    """Run the watcher in a thread; the dict gets run()'s return value as "code"."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", watcher.run()), daemon=True)
    thread.start()
    return thread, result


def run_until(watcher: SpotWatcher, condition, timeout_s: float = 5.0, *, idle_cycles: int = 0) -> int | None:
    """Run the watcher in a thread until ``condition()``, then ``idle_cycles`` more loop turns;
    returns run()'s code if it returned."""
    thread, result = start(watcher)
    wait_for(condition, "the watcher to reach the condition", timeout_s)
    cycles = watcher.cycles
    wait_for(lambda: watcher.cycles >= cycles + idle_cycles or not thread.is_alive(), "idle loop turns")
    watcher.stop()
    thread.join(timeout=5)
    assert not thread.is_alive(), "run() returns once stopped"
    return result.get("code")


def notice_in(seconds: float) -> SpotNotice:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
    return parse_instance_action(200, f'{{"action": "terminate", "time": "{when}"}}')


def watcher(client, **kwargs) -> SpotWatcher:
    return SpotWatcher(client, address="127.0.0.1:1", node_id="ab" * 28, interval_s=0.01, **kwargs)


def test_no_notice_no_drain(drains):
    client = ScriptedNotices(None)
    run_until(watcher(client), lambda: client.calls >= 20)
    assert drains == []


def test_a_notice_drains_once_with_its_deadline_then_polling_stops(drains):
    client = ScriptedNotices(None, None, notice_in(90))
    w = watcher(client)
    run_until(w, lambda: len(drains) == 1, idle_cycles=10)
    assert w.cycles >= 13, "the loop kept turning after the drain"
    assert len(drains) == 1, "drained exactly once"
    assert client.calls == 3, "no polling after the drain"
    (call,) = drains
    assert call["reason"] == "PREEMPTION"
    assert call["node_id"] == "ab" * 28
    assert 88 <= call["deadline_s"] <= 90
    assert call["message"].startswith("spot interruption notice: terminate at ")


def test_exit_after_drain_returns(drains):
    code = run_until(watcher(ScriptedNotices(notice_in(60)), exit_after_drain=True), lambda: len(drains) == 1)
    assert code == 0


def test_unreadable_notice_drains_with_the_default_deadline(drains):
    client = ScriptedNotices(parse_instance_action(200, b"<html>oops</html>"))
    run_until(watcher(client, default_deadline_s=42.0), lambda: len(drains) == 1)
    assert drains[0]["deadline_s"] == 42.0


def test_endpoint_errors_are_survived(drains):
    client = ScriptedNotices(NoticeError("boom"), NoticeError("boom"), notice_in(60))
    run_until(watcher(client), lambda: len(drains) == 1)
    assert client.calls == 3


def test_failed_drain_is_retried_on_the_next_poll(drains):
    drains.failures.append(ConnectionError("GCS unreachable"))
    client = ScriptedNotices(notice_in(60))
    run_until(watcher(client), lambda: len(drains) == 1)
    assert client.calls == 2


def test_sigterm_drains_with_the_grace_period_and_exits(drains):
    client = ScriptedNotices(None)
    w = watcher(client, sigterm_deadline_s=25.0)
    thread, result = start(w)
    wait_for(lambda: client.calls >= 2, "the watcher to poll")
    w.handle_sigterm()
    thread.join(timeout=5)
    assert result.get("code") == 0, "run() returned 0 after the SIGTERM drain"
    assert [(c["deadline_s"], c["message"]) for c in drains] == [
        (25.0, "SIGTERM: instance/pod is shutting down")
    ]


def test_sigterm_after_a_notice_does_not_drain_again(drains):
    w = watcher(ScriptedNotices(notice_in(60)))
    thread, result = start(w)
    wait_for(lambda: drains, "the drain on the notice")
    w.handle_sigterm()
    thread.join(timeout=5)
    assert result.get("code") == 0, "run() returned 0 after SIGTERM"
    assert [c["message"].split(":")[0] for c in drains] == ["spot interruption notice"], "no second drain"


def test_local_node_id_needs_exactly_one_node_on_this_machine(monkeypatch):
    from cluster.gcs import NodeView

    def nodes(ip_a, ip_b):
        return lambda address: [
            NodeView("a" * 56, "head", ip_a, alive=True, is_head=True),
            NodeView("b" * 56, "worker-0", ip_b, alive=True, is_head=False),
            NodeView("c" * 56, "worker-1", "127.0.0.1", alive=False, is_head=False),
        ]

    monkeypatch.setattr(spot_watcher.gcs, "list_nodes", nodes("10.9.9.9", "127.0.0.1"))
    assert spot_watcher.local_node_id("x:1") == "b" * 56
    monkeypatch.setattr(spot_watcher.gcs, "list_nodes", nodes("127.0.0.1", "127.0.0.1"))
    with pytest.raises(LookupError, match="pass --node-id"):
        spot_watcher.local_node_id("x:1")
