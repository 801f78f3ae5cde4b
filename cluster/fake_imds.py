"""A stand-in for EC2's instance metadata service on 127.0.0.1, to rehearse spot interruptions.

Serves ``PUT /latest/api/token`` (IMDSv2) and ``GET /latest/meta-data/spot/instance-action``:
404 until :meth:`FakeInstanceMetadata.set_notice` is called, then the notice JSON. Used by the
tests, and by hand against a local cluster::

    python -m cluster.fake_imds --port 8111 --notice-after 30 --notice-deadline 90 &
    python -m cluster.spot_watcher --url http://127.0.0.1:8111/latest/meta-data/spot/instance-action \\
        --address 127.0.0.1:PORT --node-id NODE_ID
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from typing_extensions import Self

NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_PATH = "/latest/api/token"


@dataclass(frozen=True)
class SeenRequest:
    """One request the fake service answered."""

    method: str
    path: str
    token: str | None
    """The ``X-aws-ec2-metadata-token`` header sent, if any."""
    status: int


class FakeInstanceMetadata:
    """The fake metadata service, serving from a daemon thread.

    Args:
        port: Port on 127.0.0.1; 0 picks a free one.
        imdsv2: Answer the token call. False makes it answer 403 (an IMDSv1-only endpoint).
        require_token: Refuse GETs without a valid token with 401 (EC2's "IMDSv2 required").
    """

    def __init__(self, port: int = 0, *, imdsv2: bool = True, require_token: bool = False):
        self.imdsv2 = imdsv2
        self.require_token = require_token
        self.requests: list[SeenRequest] = []
        self.tokens: set[str] = set()
        self._body: bytes | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        # Polled every 50 ms (not the default 0.5 s): stop() returns at once.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """The instance-action URL to give the watcher."""
        return f"http://127.0.0.1:{self._server.server_address[1]}{NOTICE_PATH}"

    def start(self) -> FakeInstanceMetadata:
        """Start serving; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_notice(self, deadline_s: float = 120.0, action: str = "terminate") -> datetime:
        """Start answering with a notice for ``deadline_s`` from now; returns the notice time."""
        when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=deadline_s)
        self.set_body(json.dumps({"action": action, "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}))
        return when

    def set_body(self, body: str | None) -> None:
        """Answer 200 with exactly ``body`` (malformed notices), or 404 again with None."""
        with self._lock:
            self._body = None if body is None else body.encode()

    def notice_gets(self) -> list[SeenRequest]:
        """The GETs of the instance-action document so far."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path == NOTICE_PATH]

    def _answer(self, method: str, path: str, token: str | None) -> tuple[int, bytes]:
        with self._lock:
            if method == "PUT" and path == TOKEN_PATH:
                if not self.imdsv2:
                    status, body = 403, b""
                else:
                    issued = f"token-{len(self.tokens)}"
                    self.tokens.add(issued)
                    status, body = 200, issued.encode()
            elif method == "GET" and path == NOTICE_PATH:
                if self.require_token and token not in self.tokens:
                    status, body = 401, b""
                elif self._body is None:
                    status, body = 404, b"Not Found"
                else:
                    status, body = 200, self._body
            else:
                status, body = 404, b"Not Found"
            self.requests.append(SeenRequest(method, path, token, status))
            return status, body


def _handler(service: FakeInstanceMetadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._reply("GET")

        def do_PUT(self) -> None:
            self._reply("PUT")

        def _reply(self, method: str) -> None:
            status, body = service._answer(method, self.path, self.headers.get("X-aws-ec2-metadata-token"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted, switching to a notice after ``--notice-after`` seconds."""
    parser = argparse.ArgumentParser(prog="python -m cluster.fake_imds", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8111)
    parser.add_argument("--notice-after", type=float, default=30.0, help="seconds of 404 before the notice")
    parser.add_argument("--notice-deadline", type=float, default=120.0, help="notice time, seconds ahead")
    args = parser.parse_args(argv)
    with FakeInstanceMetadata(args.port) as service:
        print(f"serving {service.url}; notice in {args.notice_after:g} s", flush=True)
        time.sleep(args.notice_after)
        print(f"notice: terminate at {service.set_notice(args.notice_deadline).isoformat()}", flush=True)
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
