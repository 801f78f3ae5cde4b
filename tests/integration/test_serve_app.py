"""The serving application on a real local Ray Serve, called over HTTP by the official openai client.

One deployment for the whole module: the two best trials of a fake sweep (``--sweep --top-k 2``) plus
an adapter on a local S3 server (moto), an API key, room for only 2 adapters per replica (so the LRU
evicts), small queue limits (so overload is reachable) and a short context (so it is cheap to exceed).
Ray runs with Serve's direct ingress, so the replica also answers on its own port (``--direct-ingress``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import requests

pytestmark = pytest.mark.integration

API_KEY = "test-key-123"
KEY_ENV = "FTUNE_TEST_SERVE_KEY"
PROMPT = "Write one sentence about the sea."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    return write_random_adapters(
        tiny_model_dir, tmp_path_factory.mktemp("adapters"), {"a": 11, "b": 22, "c": 33}
    )


@pytest.fixture(scope="module")
def environment():
    """The API key, fake AWS credentials and direct ingress, set before Ray starts so Serve inherits them."""
    from serve.deploy import DIRECT_INGRESS_ENV, DRAINING_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, API_KEY)
        mp.setenv(DIRECT_INGRESS_ENV, "1")
        mp.setenv(DRAINING_ENV, "0")  # no load balancer to wait for when the module's Serve shuts down
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
            mp.setenv(name, value)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield


@pytest.fixture(scope="module")
def s3_endpoint(adapters, environment):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="adapters")
    for path in adapters["c"].iterdir():
        client.upload_file(str(path), "adapters", f"prod/c/{path.name}")
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def sweep_dir(adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    rows = [
        {"trial": "t9", "eval_loss": 0.9, "status": "ERROR", "adapter_path": None},
        {"trial": "t1", "eval_loss": 1.1, "status": "TERMINATED", "adapter_path": str(adapters["a"])},
        {"trial": "t2", "eval_loss": 1.3, "status": "TERMINATED", "adapter_path": str(adapters["b"])},
    ]
    (root / "leaderboard.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def server(sweep_dir, s3_endpoint, tiny_model_dir, ftune_home, environment):
    import ray
    from ray import serve

    from serve.cli import plan_from_args
    from serve.deploy import deploy

    plan = plan_from_args(
        [
            "--sweep", str(sweep_dir), "--top-k", "2",
            "--adapter", "remote=s3://adapters/prod/c",
            "--base", str(tiny_model_dir),
            "--api-key-env", KEY_ENV,
            "--port", str(free_port()),
            "--direct-ingress",
            f"storage.endpoint_url={s3_endpoint}",
            "max_adapters_per_replica=2",
            "limits.max_tokens=64", "limits.default_max_tokens=16", "limits.max_context_tokens=128",
            "limits.max_ongoing_requests=4", "limits.max_queued_requests=2",
            "batching.max_batch_size=4", "batching.batch_wait_timeout_s=0.05",
        ]
    )  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        base_url = deploy(plan.config, host=plan.host, port=plan.port, direct_ingress=plan.direct_ingress)
        yield base_url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=60)


def complete(client, model, prompt=PROMPT, **kwargs):
    """A completion of exactly max_tokens (ignore_eos), so outputs are long enough to compare."""
    kwargs = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}, **kwargs}
    return client.completions.create(model=model, prompt=prompt, **kwargs)


@pytest.fixture(scope="module")
def greedy(client):
    """Each model's greedy completion of PROMPT, asked one at a time."""
    return {
        model: complete(client, model).choices[0].text for model in ("base", "trial-t1", "trial-t2", "remote")
    }


def post(server, path, body, key=API_KEY, raw=False):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if raw else json.dumps(body)
    return requests.post(
        server + path, data=data, headers={**headers, "Content-Type": "application/json"}, timeout=60
    )


def test_models_lists_base_sweep_trials_and_s3_adapter(client):
    assert [m.id for m in client.models.list().data] == ["base", "trial-t1", "trial-t2", "remote"]


def test_each_adapter_has_its_own_deterministic_output(client, greedy):
    assert len(set(greedy.values())) == 4, greedy
    for model, text in greedy.items():
        again = complete(client, model)
        assert again.choices[0].text == text
        assert again.choices[0].finish_reason == "length"
        assert (
            again.usage.completion_tokens == 12 and again.usage.total_tokens == again.usage.prompt_tokens + 12
        )
        natural = complete(client, model, extra_body={})  # may end at the end-of-sequence token
        assert text.startswith(natural.choices[0].text)
        if natural.choices[0].finish_reason == "stop":
            assert natural.usage.completion_tokens <= 12
        else:
            assert natural.choices[0].finish_reason == "length" and natural.usage.completion_tokens == 12


def test_http_output_equals_in_process_decoding(greedy, adapters, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from serve.adapter_pool import AdapterPool
    from serve.generation import BatchDecoder, GenerationRequest, SamplingParams

    pool = AdapterPool(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    asyncio.run(pool.load("a", adapters["a"]))
    request = GenerationRequest(
        tuple(tiny_tokenizer(PROMPT)["input_ids"]), SamplingParams(max_tokens=12, ignore_eos=True), "a"
    )
    decoder = BatchDecoder([request], pool.forward, tiny_tokenizer, eos_token_ids=[1], pad_token_id=2)
    text = ""
    while not decoder.done:
        text += decoder.step()[0].text
    assert greedy["trial-t1"] == text


def test_lru_eviction_and_reload_keep_outputs_right(client, greedy, server):
    for model in ["remote", "trial-t1", "trial-t2", "remote", "base", "trial-t1"]:
        assert complete(client, model).choices[0].text == greedy[model]
    health = requests.get(server.removesuffix("/v1") + "/healthz", timeout=10).json()
    assert len(health["adapters_loaded"]) <= 2


def test_concurrent_requests_for_different_adapters_share_batches(client, greedy, server):
    models = ["trial-t1", "trial-t2", "base", "trial-t1"]  # max_ongoing_requests: nothing is turned away
    health = server.removesuffix("/v1") + "/healthz"

    def burst() -> list[str]:
        results: dict[int, str] = {}

        def call(i, model):
            results[i] = complete(client, model).choices[0].text

        threads = [threading.Thread(target=call, args=(i, m)) for i, m in enumerate(models)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [results.get(i) for i in range(len(models))]

    # Whether the arrivals land in one batch window depends on thread scheduling on a busy machine,
    # so try a few bursts; every burst must give each request its own adapter's output.
    for _ in range(3):
        assert burst() == [greedy[m] for m in models]
        if requests.get(health, timeout=10).json()["batching"]["most_adapters"] >= 2:
            break
    else:
        pytest.fail("no batch ever held two different adapters")


def test_the_replica_answers_on_its_own_port_like_through_the_proxy(server, greedy):
    from openai import OpenAI

    from serve.deploy import replica_urls

    urls = replica_urls()
    assert urls and server not in urls, urls
    direct = OpenAI(base_url=urls[0], api_key=API_KEY, max_retries=0, timeout=60)
    assert complete(direct, "trial-t2").choices[0].text == greedy["trial-t2"]
    streamed = "".join(c.choices[0].text for c in complete(direct, "base", stream=True) if c.choices)
    assert streamed == greedy["base"]
    assert post(urls[0], "/completions", {"model": "base", "prompt": PROMPT}, key=None).status_code == 401


def test_chat_completion_uses_the_chat_template(client, tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    reply = client.chat.completions.create(
        model="trial-t2", messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt_ids = tiny_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert reply.usage.prompt_tokens == len(prompt_ids["input_ids"])
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.object == "chat.completion"


def test_streaming_completion_equals_the_plain_one(client, greedy):
    stream = complete(client, "trial-t1", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy["trial-t1"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_streaming_chat_chunks(client):
    messages = [{"role": "user", "content": "Count to three."}]
    options = {"max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(model="remote", messages=messages, **options)
    chunks = list(client.chat.completions.create(model="remote", messages=messages, stream=True, **options))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_raw_sse_framing_ends_with_done(server):
    body = {"model": "base", "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    response = requests.post(
        server + "/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        stream=True,
        timeout=60,
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_stop_sequence_cuts_the_text(client, greedy):
    full = greedy["trial-t2"]
    stop = full[4:7]
    assert stop.strip() and full.find(stop) >= 1, f"pick another slice of {full!r}"
    cut = complete(client, "trial-t2", stop=[stop, "\u2603never"])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    first = complete(client, "trial-t1", temperature=1.0, seed=5).choices[0].text
    assert complete(client, "trial-t1", temperature=1.0, seed=5).choices[0].text == first
    assert complete(client, "trial-t1", temperature=1.0, top_p=0.9, seed=6).choices[0].text != first


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/completions", b"{not json", 400, None),
        ("/completions", {"model": "base"}, 400, "prompt"),
        ("/completions", {"prompt": "hi"}, 400, "model"),
        ("/completions", {"model": "base", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/completions", {"model": "base", "prompt": "hi", "temperature": [1]}, 400, "temperature"),
        ("/completions", {"model": "base", "prompt": "hi", "n": 3}, 400, "n"),
        ("/completions", {"model": "base", "prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
        ("/completions", {"model": "base", "prompt": "word " * 200}, 400, "prompt"),
        (
            "/completions",
            {"model": "base", "prompt": "hi", "max_tokens": 64, "stop": ["a", "b", "c", "d", "e"]},
            400,
            "stop",
        ),
        ("/completions", {"model": "/etc/passwd", "prompt": "hi"}, 404, "model"),
        ("/completions", {"model": "../trial-t1", "prompt": "hi"}, 404, "model"),
        (
            "/chat/completions",
            {"model": "trial-t1", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages.0.role",
        ),
        (
            "/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model",
        ),
        (
            "/chat/completions",
            {"model": "base", "messages": [{"role": "user", "content": "x " * 200}]},
            400,
            "messages",
        ),
    ],
)
def test_bad_requests_get_4xx_with_an_openai_error_and_the_server_keeps_serving(
    server, client, greedy, path, body, status, param
):
    response = post(server, path, body, raw=isinstance(body, bytes))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert complete(client, "base").choices[0].text == greedy["base"]


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        complete(client, "no-such-model")
    with pytest.raises(openai.BadRequestError, match="context length"):
        complete(client, "base", prompt="word " * 200)


def test_api_key_is_required(server):
    body = {"model": "base", "prompt": "hi", "max_tokens": 2}
    for key in (None, "wrong-key"):
        response = post(server, "/completions", body, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert requests.get(server + "/models", timeout=10).status_code == 401
    assert requests.get(server.removesuffix("/v1") + "/healthz", timeout=10).status_code == 200


def test_overload_is_turned_away_at_once_not_queued(server, client, greedy):
    # 4 ongoing + 2 queued are accepted; the rest must get 503 without waiting for a turn.
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    answers: list[tuple[int, float]] = []

    def call():
        status = post(server, "/completions", body).status_code
        answers.append((status, time.monotonic()))

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = [at for status, at in answers if status == 200]
    rejected = [at for status, at in answers if status == 503]
    assert served and rejected and len(served) + len(rejected) == 16, answers
    assert max(rejected) < min(served), "a rejected request waited for a served one to finish"
    assert complete(client, "base").choices[0].text == greedy["base"]
