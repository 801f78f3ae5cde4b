"""What a replica checks before any work: body size (before and while reading), its own request limit,
and the request's tokens and stop strings against its limits (no server: ASGI requests built by hand);
and tokenizing, the first work, runs off the event loop."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from serve.admission import Admission, read_body, sampling_params
from serve.config import LimitsConfig
from serve.openai_api import ApiError, ChatCompletionRequest, CompletionRequest


def request_with(headers: dict[str, str], chunks: list[bytes]) -> tuple[Request, list[bytes]]:
    """A POST whose body arrives in ``chunks``; the list returned fills with the chunks read."""
    read: list[bytes] = []
    pending = list(chunks)

    async def receive():
        chunk = pending.pop(0)
        read.append(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive), read


def refused(coroutine) -> ApiError:
    with pytest.raises(ApiError) as info:
        asyncio.run(coroutine)
    return info.value


def test_a_declared_length_over_the_limit_is_413_before_a_byte_is_read():
    request, read = request_with({"Content-Length": str(10**10)}, [b"x" * 1024])
    error = refused(read_body(request, limit=2048))
    assert (error.status, error.code) == (413, "too_large") and "10000000000 bytes" in error.message
    assert read == []


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit():
    request, read = request_with({"Transfer-Encoding": "chunked"}, [b"x" * 1000] * 10)
    error = refused(read_body(request, limit=2500))
    assert error.status == 413
    assert len(read) == 3, "reading stopped at the first chunk past the limit"


def test_a_body_within_the_limit_is_read_whole():
    request, _ = request_with({"Content-Length": "6"}, [b"abc", b"def"])
    assert asyncio.run(read_body(request, limit=6)) == b"abcdef"


@pytest.mark.parametrize("declared", ["abc", "-1", "1e9", "", "1" * 30])
def test_a_content_length_that_is_not_a_number_is_400(declared):
    request, read = request_with({"Content-Length": declared}, [b"{}"])
    assert refused(read_body(request, limit=2048)).status == 400 and read == []


def test_a_full_replica_turns_requests_away_with_a_503_and_retry_after():
    admission = Admission(limit=2)
    with admission.prepare(), admission.generate():  # one being prepared, one decoding
        with pytest.raises(ApiError) as info:
            with admission.prepare():
                pass
        assert admission.held == 2
    error = info.value
    assert (error.status, error.type, error.code) == (503, "server_error", "overloaded")
    assert error.headers == {"Retry-After": "1"}
    assert admission.held == 0
    with Admission(limit=None).prepare():  # no limit of its own: Serve's queue decides
        pass


def completion(**fields) -> CompletionRequest:
    return CompletionRequest(model="base", prompt="hi", **fields)


def test_stop_strings_are_bounded_in_number_and_length():
    limits = LimitsConfig(max_stop_sequences=2, max_stop_chars=5)
    params = sampling_params(completion(stop=["ab", "abcde"]), 3, 4, limits, context_tokens=64)
    assert params.stop == ("ab", "abcde") and params.max_tokens == 4
    for stop in (["a", "b", "c"], ["abcdef"]):
        error = refused_now(lambda s=stop: sampling_params(completion(stop=s), 3, 4, limits, 64))
        assert (error.status, error.param) == (400, "stop")


def test_token_limits_name_the_parameter():
    limits = LimitsConfig(max_tokens=8, default_max_tokens=4)
    assert refused_now(lambda: sampling_params(completion(), 3, 9, limits, 64)).param == "max_tokens"
    chat = ChatCompletionRequest(model="base", messages=[{"role": "user", "content": "x"}])
    error = refused_now(lambda: sampling_params(chat, 62, 8, limits, 64))
    assert (error.param, error.code) == ("messages", "context_length_exceeded")
    assert sampling_params(completion(), 62, None, limits, 64).max_tokens == 2  # the room left


def refused_now(call) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_tokenizing_runs_off_the_event_loop_and_its_errors_are_400s():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serve.app import LoraServer

    replica = LoraServer.__new__(LoraServer)  # only the tokenizer thread, no model
    replica._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    async def scenario():
        loop_thread = threading.current_thread()
        seen = await replica._tokenize(lambda: [threading.current_thread()], "cannot", "prompt")
        assert seen[0] is not loop_thread and seen[0].name.startswith("tokenize")

        def fails():
            raise ValueError("no such token")

        with pytest.raises(ApiError) as info:
            await replica._tokenize(fails, "the prompt cannot be tokenized", "prompt")
        assert (info.value.status, info.value.param) == (400, "prompt") and "no such token" in info.value.message

    asyncio.run(scenario())
    replica._tokenizer_thread.shutdown()
