"""The IMDS client and the watcher against a misbehaving metadata service on 127.0.0.1.

Each answer a real HTTP server can give badly (401 without a token, a token call that stalls past the
timeout, a body shorter than its Content-Length, bytes that are not UTF-8 or not JSON, a bad status
line, a reset connection) is one poll that yields a notice, None or a NoticeError, never another
exception; the next poll reads the notice; and a watcher polling through all of them still drains.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster import spot_watcher
from cluster.spot_notice import InstanceMetadataClient, NoticeError, SpotNotice
from cluster.spot_watcher import SpotWatcher
from tests.waiting import wait_for

NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_PATH = "/latest/api/token"
NOTICE = b'{"action": "terminate", "time": "2030-01-01T00:00:00Z"}'
STALL_S = 30.0
"""How long a stalled answer waits at most; teardown releases it at once."""

Reply = Callable[[BaseHTTPRequestHandler], None]


def answer(status: int, body: bytes = b"") -> Reply:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return reply


def truncated(status: int, body: bytes, claimed: int) -> Reply:
    """Announce ``claimed`` bytes, send ``body`` (fewer), hang up."""

    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(claimed))
        handler.end_headers()
        handler.wfile.write(body)
        handler.close_connection = True

    return reply


def raw(data: bytes) -> Reply:
    """Send ``data`` as the whole response (no status line of ours), then hang up."""

    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(data)
        handler.close_connection = True

    return reply


def reset(handler: BaseHTTPRequestHandler) -> None:
    """Close the connection with a TCP reset, answering nothing."""
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()
    handler.close_connection = True


class MisbehavingIMDS:
    """A metadata service whose token and notice answers the test sets, one ``Reply`` each.

    ``require_token`` answers a GET without a token it issued with 401, as an instance with IMDSv2
    required does, whatever the notice reply is. ``token_replies`` are used in order, the last one
    repeating; ``stall_token`` makes the token call wait (up to STALL_S) before answering.
    """

    def __init__(self, *, require_token: bool = True):
        self.require_token = require_token
        self.notice: Reply = answer(404, b"Not Found")
        self.token_replies: list[Reply] = [answer(200, b"token-1")]
        self.stall_token = False
        self.issued = {"token-1"}
        self.seen: list[tuple[str, str, str | None]] = []
        self.released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda *args: None  # resets and hang-ups are the point here
        # Polled every 50 ms (not the default 0.5 s): stop() returns at once.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{NOTICE_PATH}"

    def __enter__(self) -> MisbehavingIMDS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()

    def puts(self) -> int:
        return sum(1 for method, _, _ in self.seen if method == "PUT")

    def _reply_to(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        token = handler.headers.get("X-aws-ec2-metadata-token")
        self.seen.append((method, handler.path, token))
        if method == "PUT" and handler.path == TOKEN_PATH:
            if self.stall_token:
                self.released.wait(STALL_S)
            reply = self.token_replies[0] if len(self.token_replies) == 1 else self.token_replies.pop(0)
        elif method == "GET" and handler.path == NOTICE_PATH:
            reply = answer(401) if self.require_token and token not in self.issued else self.notice
        else:
            reply = answer(404, b"Not Found")
        reply(handler)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                service._reply_to(self, "GET")

            def do_PUT(self) -> None:
                service._reply_to(self, "PUT")

            def log_message(self, *args) -> None:
                pass

        return Handler


@pytest.fixture
def imds():
    with MisbehavingIMDS() as service:
        yield service


def test_a_failed_token_call_is_retried_in_the_same_poll_when_imdsv2_is_required(imds):
    imds.notice = answer(200, NOTICE)
    imds.token_replies = [answer(500, b"busy"), answer(200, b"token-1")]
    client = InstanceMetadataClient(imds.url, timeout_s=2.0)
    notice = client.notice()
    assert notice is not None and notice.action == "terminate", "the notice is read in the first poll"
    assert [(m, t) for m, p, t in imds.seen if p == NOTICE_PATH] == [("GET", None), ("GET", "token-1")]


def test_polls_read_the_notice_as_soon_as_the_token_call_works_again(imds):
    imds.notice = answer(200, NOTICE)
    imds.token_replies = [answer(500, b"busy")] * 3 + [answer(200, b"token-1")]
    client = InstanceMetadataClient(imds.url, timeout_s=2.0)
    for polls in (1, 2):
        with pytest.raises(NoticeError, match="401"):
            client.notice()
        assert imds.puts() == polls + 1, "each poll asks for a token again once IMDSv1 is refused"
    assert client.notice().action == "terminate", "the first poll after the token call recovers reads it"


def test_a_token_call_past_the_timeout_blinds_one_poll_only(imds):
    imds.notice = answer(200, NOTICE)
    imds.stall_token = True
    client = InstanceMetadataClient(imds.url, timeout_s=0.3)
    with pytest.raises(NoticeError):
        client.notice()
    imds.stall_token = False
    assert client.notice().action == "terminate"


def test_imdsv1_is_used_while_the_token_call_stalls_where_it_is_allowed():
    with MisbehavingIMDS(require_token=False) as imds:
        imds.notice = answer(200, NOTICE)
        imds.stall_token = True
        client = InstanceMetadataClient(imds.url, timeout_s=0.3)
        assert client.notice().action == "terminate"
        assert client.notice().action == "terminate"
        assert imds.puts() == 1, "an IMDSv1 endpoint is not asked for a token on every poll"


@pytest.mark.parametrize(
    "token_reply",
    [answer(200, b"\xff\xfe\x00bad"), answer(200, b"tok\nen"), answer(200, b""), truncated(200, b"tok", 40)],
    ids=["not-utf8", "newline", "empty", "truncated"],
)
def test_an_unusable_token_falls_back_to_imdsv1_for_the_poll(token_reply):
    with MisbehavingIMDS(require_token=False) as imds:
        imds.token_replies = [token_reply]
        client = InstanceMetadataClient(imds.url, timeout_s=2.0)
        assert client.notice() is None
        assert [t for m, p, t in imds.seen if p == NOTICE_PATH] == [None]


BAD_NOTICE_ANSWERS = {
    "truncated-200": truncated(200, NOTICE[:20], len(NOTICE) + 50),
    "truncated-404": truncated(404, b"Not", 100),
    "bad-status-line": raw(b"garbage that is not HTTP\r\n\r\n"),
    "no-status-line": raw(b""),
    "reset": reset,
    "http-500": answer(500, b"oops"),
}


@pytest.mark.parametrize("reply", BAD_NOTICE_ANSWERS.values(), ids=BAD_NOTICE_ANSWERS.keys())
def test_a_broken_answer_is_a_notice_error_and_the_next_poll_reads_the_notice(imds, reply):
    client = InstanceMetadataClient(imds.url, timeout_s=2.0)
    imds.notice = reply
    with pytest.raises(NoticeError):
        client.notice()
    imds.notice = answer(200, NOTICE)
    assert client.notice().action == "terminate"


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe\x00\x80garbage", b'{"action": "terminate", "time": ', b"[" * 100_000, b"\x00" * 64],
    ids=["not-utf8", "cut-json", "deeply-nested", "nul-bytes"],
)
def test_an_unreadable_200_is_a_notice_with_the_default_deadline(imds, body):
    imds.notice = answer(200, body)
    notice = InstanceMetadataClient(imds.url, timeout_s=2.0).notice()
    assert notice is not None and notice.action == "unknown" and notice.time is None
    assert notice.describe().startswith("spot interruption notice: unknown at unknown time")


def test_the_watcher_polls_through_every_broken_answer_then_drains(imds, monkeypatch):
    drains: list[dict] = []
    monkeypatch.setattr(
        spot_watcher.gcs, "drain_node", lambda address, node_id, **kwargs: drains.append(kwargs)
    )
    client = InstanceMetadataClient(imds.url, timeout_s=1.0)
    watcher = SpotWatcher(client, address="127.0.0.1:1", node_id="ab" * 28, interval_s=0.01)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        for name, reply in BAD_NOTICE_ANSWERS.items():
            imds.notice = reply
            seen = len(imds.seen)
            wait_for(lambda: len(imds.seen) >= seen + 2, f"two polls answered {name}", 10)
            assert thread.is_alive(), f"the watcher died on {name}"
            assert drains == [], f"{name} is not a notice"
        imds.notice = answer(200, json.dumps({"action": "stop", "time": "2030-01-01T00:00:00Z"}).encode())
        wait_for(lambda: drains, "the drain after the notice", 10)
    finally:
        watcher.stop()
        thread.join(timeout=10)
    assert not thread.is_alive(), "the watcher stops when asked"
    assert len(drains) == 1 and drains[0]["message"].startswith("spot interruption notice: stop at 2030")


class Unexpected:
    """A client whose reads fail with an error no client is meant to raise, then find a notice."""

    url = "fake://instance-action"

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def notice(self) -> SpotNotice | None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("a bug in the client")
        return SpotNotice("terminate", None, "{}")


def test_the_watcher_survives_an_unexpected_error_from_its_client(monkeypatch):
    drains: list[dict] = []
    monkeypatch.setattr(
        spot_watcher.gcs, "drain_node", lambda address, node_id, **kwargs: drains.append(kwargs)
    )
    client = Unexpected(failures=3)
    watcher = SpotWatcher(client, address="127.0.0.1:1", node_id="ab" * 28, interval_s=0.01)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: drains, "the drain after three failed reads", 10)
    finally:
        watcher.stop()
        thread.join(timeout=10)
    assert client.calls == 4 and len(drains) == 1
