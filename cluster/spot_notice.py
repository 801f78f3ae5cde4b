"""Read the cloud's spot interruption notice: EC2's ``spot/instance-action`` over IMDSv2 (v1 fallback).

EC2 answers 404 until the instance is scheduled for interruption, then 200 with
``{"action": "terminate", "time": "2026-11-21T12:00:00Z"}``, about two minutes ahead.

Whatever the endpoint does (refuse, stall, reset, truncate, send garbage) the client answers with a
notice, None or a ``NoticeError``, never another exception: the watcher polling it must outlive any
answer, and a poll that fails is retried at the next interval.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://169.254.169.254/latest/meta-data/spot/instance-action"
DEFAULT_DEADLINE_S = 120.0
"""Used when a notice's time cannot be read: EC2's interruption warning is two minutes."""
TOKEN_TTL_S = 21600
"""IMDSv2 session token lifetime requested (the maximum EC2 allows)."""
TOKEN_RETRY_S = 300.0
"""After the token call fails (IMDSv1-only endpoint), how long to poll with IMDSv1 before asking for a
token again. A 401 (IMDSv2 required) asks again at once, within the same poll."""
_TRANSPORT_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)
"""What reading one answer can raise: unreachable, timeout, reset, truncated body (``IncompleteRead``),
bad status line, header or encoding (``ValueError``)."""


class NoticeError(Exception):
    """The endpoint answered neither a notice nor 404 (IMDS unreachable, 5xx, 401 ...)."""


@dataclass(frozen=True)
class SpotNotice:
    """An interruption notice: this instance will be reclaimed."""

    action: str
    """``terminate``, ``stop`` or ``hibernate``; ``unknown`` when the body could not be read."""
    time: datetime | None
    """When the instance is reclaimed (UTC); None when the body could not be read."""
    raw: str
    """The body as received, for the drain message and logs."""

    def deadline_s(self, now: float | None = None, default_s: float = DEFAULT_DEADLINE_S) -> float:
        """Seconds left until the instance is reclaimed (>= 0); ``default_s`` if the time is unknown."""
        if self.time is None:
            return default_s
        now = time.time() if now is None else now
        return max(0.0, self.time.timestamp() - now)

    def describe(self) -> str:
        """One line for logs and the drain reason message."""
        when = self.time.strftime("%Y-%m-%dT%H:%M:%SZ") if self.time else f"unknown time ({self.raw[:80]!r})"
        return f"spot interruption notice: {self.action} at {when}"


def parse_instance_action(status: int, body: bytes | str) -> SpotNotice | None:
    """Turn the endpoint's answer into a notice, None for "no notice".

    A 200 always means a notice, even with a body we cannot read: draining on an unreadable
    notice (with the default deadline) is safer than ignoring it.

    Raises:
        NoticeError: any status other than 200 and 404.
    """
    if status == 404:
        return None
    if status != 200:
        raise NoticeError(f"instance-action endpoint answered HTTP {status}")
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        logger.warning("unreadable spot notice (not JSON): %r", text[:200])
        return SpotNotice("unknown", None, text)
    if not isinstance(data, dict):
        logger.warning("unreadable spot notice (not a JSON object): %r", text[:200])
        return SpotNotice("unknown", None, text)
    action = str(data.get("action") or "unknown")
    return SpotNotice(action, _parse_time(data.get("time"), text), text)


def _parse_time(value: object, text: str) -> datetime | None:
    if not isinstance(value, str):
        logger.warning("spot notice without a readable 'time': %r", text[:200])
        return None
    try:
        # fromisoformat only takes a trailing "Z" from Python 3.11 on.
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        logger.warning("spot notice with an unreadable 'time' %r", value)
        return None
    return parsed.astimezone(timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class InstanceMetadataClient:
    """Polls EC2's instance-action document, IMDSv2 first and IMDSv1 when the token call fails.

    An instance that requires IMDSv2 answers IMDSv1 with 401: the client then asks for a token again
    at once, so one failed token call never leaves it unable to read a notice beyond the poll it
    failed in.

    Args:
        url: The instance-action URL; the token URL is ``/latest/api/token`` on the same host.
        timeout_s: Per-request timeout.
    """

    def __init__(self, url: str = DEFAULT_URL, timeout_s: float = 2.0):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        self.token_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/latest/api/token", "", ""))
        self.timeout_s = timeout_s
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_failed_at: float | None = None
        # The metadata service is link-local: never go through an HTTP(S)_PROXY from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def notice(self) -> SpotNotice | None:
        """The current notice, None if there is none.

        Raises:
            NoticeError: the endpoint could not be read (this poll only: the next one starts afresh).
        """
        status, body = self._get(self._session_token())
        if status == 401:
            # The token expired or was revoked, or IMDSv2 is required and the last token call
            # failed: ask for a fresh one now rather than polling blind with IMDSv1.
            self._token, self._token_failed_at = None, None
            token = self._session_token()
            if token is None:
                raise NoticeError(
                    "instance-action answered HTTP 401 (IMDSv2 required) and the token call failed"
                )
            status, body = self._get(token)
        return parse_instance_action(status, body)

    def _get(self, token: str | None) -> tuple[int, bytes]:
        headers = {} if token is None else {"X-aws-ec2-metadata-token": token}
        return self._send(urllib.request.Request(self.url, headers=headers, method="GET"))

    def _session_token(self) -> str | None:
        now = time.monotonic()
        if self._token is not None and now < self._token_expires:
            return self._token
        if self._token_failed_at is not None and now - self._token_failed_at < TOKEN_RETRY_S:
            return None
        request = urllib.request.Request(
            self.token_url, headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}, method="PUT"
        )
        try:
            status, body = self._send(request)
        except NoticeError as e:
            status, body = 0, str(e).encode()
        token = body.decode("ascii", errors="replace").strip() if status == 200 else ""
        if not (token and token.isascii() and token.isprintable() and " " not in token):
            reason = f"HTTP {status}" if status else body.decode(errors="replace")
            logger.info("IMDSv2 token call failed (%s); using IMDSv1", reason[:200])
            self._token, self._token_failed_at = None, now
            return None
        self._token = token
        self._token_expires = now + TOKEN_TTL_S - 60
        self._token_failed_at = None
        return self._token

    def _send(self, request: urllib.request.Request) -> tuple[int, bytes]:
        """Status and complete body of one request.

        Raises:
            NoticeError: no complete answer (unreachable, timeout, reset, truncated or malformed).
        """
        try:
            return self._exchange(request)
        except urllib.error.URLError as e:
            raise NoticeError(f"cannot reach {request.full_url}: {e.reason}") from e
        except _TRANSPORT_ERRORS as e:
            raise NoticeError(f"unreadable answer from {request.full_url}: {type(e).__name__}: {e}") from e

    def _exchange(self, request: urllib.request.Request) -> tuple[int, bytes]:
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.read()
