"""What a replica checks before it does any work for a request: the API key, whether it has room for one
more completion, the body's size (from Content-Length before reading, and while reading a chunked one),
and what the parsed request asks for (tokens, context, stop strings) against the replica's limits.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from starlette.requests import Request

from serve.config import LimitsConfig
from serve.generation import SamplingParams
from serve.openai_api import ApiError, ChatCompletionRequest

RETRY_AFTER_S = 1
"""Retry-After of a 503 for a full replica: a batch frees its slots within a few decode steps."""


def authorize(request: Request, api_key: str | None) -> None:
    """Check the Bearer token (nothing to check when no key is configured).

    Raises:
        ApiError: 401 for a missing or wrong key.
    """
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(
            401,
            "missing or invalid API key; send it as 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
        )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes.

    Raises:
        ApiError: 413 when Content-Length (before anything is read) or the bytes read so far (a chunked
            body) exceed ``limit``; 400 for a Content-Length that is not a number.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not re.fullmatch(r"[0-9]{1,20}", declared.strip()):
            raise ApiError(400, "Content-Length is not a number of bytes", code="invalid_content_length")
        if int(declared) > limit:
            message = f"request body is {int(declared)} bytes; the limit is {limit}"
            raise ApiError(413, message, code="too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="too_large")
    return bytes(body)


class Admission:
    """The completions a replica holds, and the 503 for those beyond ``limit``.

    Requests count while they are prepared (body, tokens, adapter) and while they wait for or sit in a
    batch. Counters only move on the event loop.

    Args:
        limit: Completions held at once; None: no limit of the replica's own.
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.preparing = 0
        """Requests being read, tokenized or having their adapter loaded."""
        self.generating = 0
        """Requests queued for a batch or decoding."""

    @property
    def held(self) -> int:
        """Completions this replica holds now."""
        return self.preparing + self.generating

    @contextmanager
    def prepare(self) -> Iterator[None]:
        """Count one request being prepared, or turn it away when the replica is full.

        Raises:
            ApiError: 503 with Retry-After when ``limit`` completions are already held.
        """
        if self.limit is not None and self.held >= self.limit:
            raise ApiError(
                503,
                f"this replica is busy with {self.held} requests (its limit); retry in a moment",
                type="server_error",
                code="overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1

    @contextmanager
    def generate(self) -> Iterator[None]:
        """Count one request queued for a batch or decoding."""
        self.generating += 1
        try:
            yield
        finally:
            self.generating -= 1


def sampling_params(
    body: Any, prompt_tokens: int, max_tokens: int | None, limits: LimitsConfig, context_tokens: int
) -> SamplingParams:
    """A parsed request's sampling settings, checked against the replica's limits.

    Args:
        body: The CompletionRequest or ChatCompletionRequest.
        prompt_tokens: Tokens in the prompt (or the rendered chat).
        max_tokens: The completion's token limit the request gives (None: the server's default).
        limits: The replica's limits.
        context_tokens: Prompt plus completion tokens the model takes.

    Raises:
        ApiError: 400 naming the parameter: max_tokens above the limit, a prompt that leaves no room,
            too many or too long stop strings.
    """
    if max_tokens is not None and max_tokens > limits.max_tokens:
        message = f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}"
        raise ApiError(400, message, param="max_tokens")
    room = context_tokens - prompt_tokens
    wanted = max_tokens if max_tokens is not None else min(limits.default_max_tokens, max(room, 1))
    if prompt_tokens + wanted > context_tokens:
        raise ApiError(
            400,
            f"this model's maximum context length is {context_tokens} tokens, but the request needs "
            f"{prompt_tokens + wanted} ({prompt_tokens} in the prompt, {wanted} for the completion); "
            "shorten the prompt or lower max_tokens",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    stops = body.stop_sequences
    if len(stops) > limits.max_stop_sequences:
        raise ApiError(400, f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop")
    if any(len(stop) > limits.max_stop_chars for stop in stops):
        message = f"a stop string may have at most {limits.max_stop_chars} characters"
        raise ApiError(400, message, param="stop")
    return SamplingParams(wanted, body.temperature, body.top_p, body.seed, tuple(stops), body.ignore_eos)
