"""The OpenAI wire format: request models, response and stream-chunk bodies, error bodies, SSE framing.

Requests are validated strictly (wrong types are errors, not coerced; unknown fields are rejected as
OpenAI does; numbers stay within OpenAI's ranges), and every problem becomes an ``ApiError`` carrying
the HTTP status and OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import pydantic
from pydantic import Field

SSE_DONE = b"data: [DONE]\n\n"
"""Last event of every stream."""
INT64 = (-(2**63), 2**63 - 1)
"""OpenAI's range of ``seed``."""


class ApiError(Exception):
    """An error answered with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers
        """Extra response headers (Retry-After)."""

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {message, type, param, code}}``."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_body(body: Any) -> bytes:
    """A JSON response body, non-ASCII escaped: text echoed from a request (even a lone surrogate) cannot
    break its encoding."""
    return json.dumps(body, separators=(",", ":")).encode()


STRICT = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
"""Wrong types are errors, unknown fields too, and numbers are finite."""


class StreamOptions(pydantic.BaseModel):
    """``stream_options`` of a request."""

    model_config = STRICT
    include_usage: bool = False


class _Request(pydantic.BaseModel):
    model_config = STRICT

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @pydantic.field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send separate requests for more choices")
        return n

    @property
    def stop_sequences(self) -> list[str]:
        """``stop`` as a list, empty strings dropped."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    echo: Literal[False] = False

    @pydantic.field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("send exactly one prompt per request (a string, or a list holding one string)")
        return prompt

    @property
    def prompt_text(self) -> str:
        """The prompt string."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(pydantic.BaseModel):
    """A text part of a message's content list."""

    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(pydantic.BaseModel):
    """One message of a chat."""

    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @pydantic.model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; set only one")
        return self

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens``, whichever is set."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(cls: type[pydantic.BaseModel], body: bytes) -> Any:
    """Validate a JSON request body against ``cls``.

    Raises:
        ApiError: 400 for invalid JSON, a missing field, a wrong type or value, or an unknown field.
    """
    try:
        return cls.model_validate_json(body)
    except pydantic.ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        kind = err["type"]
        if kind == "json_invalid":
            raise ApiError(
                400, f"request body is not valid JSON: {err['msg']}", code="invalid_json"
            ) from None
        if kind == "missing":
            raise ApiError(
                400, f"missing required parameter: '{loc}'", param=loc, code="missing_required_parameter"
            ) from None
        if kind == "extra_forbidden":
            raise ApiError(
                400, f"unrecognized request argument supplied: {loc}", param=loc, code="unknown_parameter"
            ) from None
        message = err["msg"].removeprefix("Value error, ")
        if not loc:
            raise ApiError(400, f"invalid request: {message}", code="invalid_value") from None
        shown = json.dumps(err.get("input"))[:80]
        raise ApiError(
            400, f"invalid '{loc}': {message} (got {shown})", param=loc, code="invalid_value"
        ) from None


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the union member it tried ("str", "list[str]", "function-after[...]") to loc.
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict"})


def new_id(prefix: str) -> str:
    """A response id such as ``cmpl-1f3a...``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    id: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A ``text_completion`` response."""
    return {
        "id": id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_body(
    id: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """A ``chat.completion`` response."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(id: str, model: str, text: str, finish_reason: str | None) -> dict[str, Any]:
    """One ``text_completion`` stream chunk."""
    return {
        "id": id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }


def chat_chunk(id: str, model: str, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta`` is {role} first, then {content}, then {} at the end."""
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(
    id: str, model: str, object: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, only usage."""
    return {
        "id": id,
        "object": object,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def models_body(model_ids: list[str], owner: str = "ftune") -> dict[str, Any]:
    """``GET /v1/models``."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": owner} for m in model_ids],
    }


def sse_event(data: dict[str, Any]) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def completion_events(
    id: str, body: CompletionRequest, deltas: AsyncIterator[Any], prompt_tokens: int
) -> AsyncIterator[bytes]:
    """The events of a streamed completion, from the decoder's deltas (text, finish_reason, tokens so far)."""
    used = 0
    async for delta in deltas:
        used = delta.completion_tokens
        if delta.text or delta.finish_reason:
            yield sse_event(completion_chunk(id, body.model, delta.text, delta.finish_reason))
    if body.include_usage:
        yield sse_event(usage_chunk(id, body.model, "text_completion", prompt_tokens, used))


async def chat_events(
    id: str, body: ChatCompletionRequest, deltas: AsyncIterator[Any], prompt_tokens: int
) -> AsyncIterator[bytes]:
    """The events of a streamed chat completion: the role first, then the content, then the finish."""
    yield sse_event(chat_chunk(id, body.model, {"role": "assistant", "content": ""}, None))
    used = 0
    async for delta in deltas:
        used = delta.completion_tokens
        if delta.text:
            yield sse_event(chat_chunk(id, body.model, {"content": delta.text}, None))
        if delta.finish_reason:
            yield sse_event(chat_chunk(id, body.model, {}, delta.finish_reason))
    if body.include_usage:
        yield sse_event(usage_chunk(id, body.model, "chat.completion.chunk", prompt_tokens, used))


async def sse_stream(events: AsyncIterator[bytes], log: logging.Logger) -> AsyncIterator[bytes]:
    """``events`` then ``data: [DONE]``; an error after the headers were sent becomes an error event."""
    try:
        async for event in events:
            yield event
    except ApiError as e:
        yield sse_event(e.body())
    except Exception as e:
        log.exception("stream failed")
        yield sse_event(error_body(f"internal error: {e}", type="server_error"))
    yield SSE_DONE
