"""An S3-compatible server (moto) on 127.0.0.1 for the tests that need one; they wrap it to log or stall requests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def start_s3_server(wrap: Callable[[Any], Any] = lambda app: app) -> tuple[Any, str]:
    """Serve moto (wrapped by ``wrap``, a WSGI middleware) on a free port; the server and its endpoint URL."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args, **kwargs) -> None:
            pass

    app = wrap(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"
