"""OpenAI request validation, response/chunk bodies and SSE framing (no server)."""

from __future__ import annotations

import json

import pytest

from serve.openai_api import (
    SSE_DONE,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    completion_body,
    json_body,
    parse_request,
    sse_event,
)


def rejected(cls, body: bytes | str) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_request(cls, body.encode() if isinstance(body, str) else body)
    assert info.value.status == 400
    assert set(info.value.body()["error"]) == {"message", "type", "param", "code"}
    return info.value


def test_valid_completion_request_with_defaults():
    req = parse_request(CompletionRequest, b'{"model": "a", "prompt": "hi", "stop": "\\n"}')
    assert (req.model, req.prompt_text, req.max_tokens, req.temperature, req.n) == ("a", "hi", None, 1.0, 1)
    assert req.stop_sequences == ["\n"]
    assert not req.stream and not req.include_usage


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "invalid request"),
        ('{"prompt": "hi"}', "model", "missing required parameter: 'model'"),
        ('{"model": "a"}', "prompt", "missing required parameter: 'prompt'"),
        ('{"model": "a", "prompt": "hi", "max_tokens": "5"}', "max_tokens", "valid integer"),
        ('{"model": "a", "prompt": "hi", "max_tokens": 0}', "max_tokens", "greater than or equal to 1"),
        ('{"model": "a", "prompt": "hi", "temperature": "hot"}', "temperature", "valid number"),
        ('{"model": "a", "prompt": "hi", "temperature": 2.5}', "temperature", "less than or equal to 2"),
        ('{"model": "a", "prompt": "hi", "top_p": 0}', "top_p", "greater than 0"),
        ('{"model": "a", "prompt": "hi", "n": 2}', "n", "only n=1 is supported"),
        ('{"model": "a", "prompt": "hi", "stream": "yes"}', "stream", "valid boolean"),
        ('{"model": "a", "prompt": "hi", "stop": 7}', "stop", "valid string"),
        ('{"model": "a", "prompt": ["x", "y"]}', "prompt", "exactly one prompt"),
        ('{"model": "a", "prompt": "hi", "logprobs": 3}', "logprobs", "unrecognized request argument"),
        ('{"model": 5, "prompt": "hi"}', "model", "valid string"),
    ],
)
def test_bad_completion_requests_are_400_with_the_parameter(body, param, fragment):
    error = rejected(CompletionRequest, body)
    assert error.param == param
    assert fragment in error.message


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"model": "a", "messages": []}', "messages"),
        ('{"model": "a", "messages": [{"role": "tool", "content": "x"}]}', "messages.0.role"),
        ('{"model": "a", "messages": [{"role": "user"}]}', "messages.0.content"),
        ('{"model": "a", "messages": "hello"}', "messages"),
        (
            '{"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 3}',
            None,
        ),
    ],
)
def test_bad_chat_requests_are_400(body, param):
    assert rejected(ChatCompletionRequest, body).param == param


def test_chat_content_parts_and_token_limit():
    req = parse_request(
        ChatCompletionRequest,
        json.dumps(
            {
                "model": "a",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    }
                ],
                "max_completion_tokens": 7,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode(),
    )
    assert req.messages[0].text == "ab"
    assert req.token_limit == 7
    assert req.include_usage


def test_sse_event_framing_and_done():
    chunk = chat_chunk("chatcmpl-1", "m", {"content": "hé\n"}, None)
    event = sse_event(chunk)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert event.count(b"\n") == 2  # the JSON itself has no raw newline that would break the event
    assert json.loads(event[len(b"data: ") :]) == chunk
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_completion_body_usage_adds_up():
    body = completion_body("cmpl-1", "m", "text", "length", prompt_tokens=5, completion_tokens=3)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["object"] == "text_completion"


def test_error_body_shape():
    error = ApiError(404, "nope", param="model", code="model_not_found")
    assert error.body() == {
        "error": {
            "message": "nope",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ('{"model": "a", "prompt": "hi", "seed": 1180591620717411303424}', "seed", "less than or equal to"),
        ('{"model": "a", "prompt": "hi", "seed": -9223372036854775809}', "seed", "greater than or equal to"),
        ('{"model": "a", "prompt": "hi", "temperature": NaN}', "temperature", "finite number"),
        ('{"model": "a", "prompt": "hi", "top_p": Infinity}', "top_p", "finite number"),
        ('{"model": "%s", "prompt": "hi"}' % ("m" * 257), "model", "at most 256 characters"),
    ],
)
def test_values_outside_openai_ranges_are_400(body, param, fragment):
    error = rejected(CompletionRequest, body)
    assert error.param == param and fragment in error.message


def test_seeds_span_openai_int64_range():
    for seed in (-(2**63), 2**63 - 1):
        body = json.dumps({"model": "a", "prompt": "x", "seed": seed}).encode()
        assert parse_request(CompletionRequest, body).seed == seed


def test_json_bodies_survive_text_no_utf_8_encoder_takes():
    body = json_body(ApiError(404, "the model '\ud800' does not exist", param="model").body())
    assert json.loads(body)["error"]["message"] == "the model '\ud800' does not exist"
