"""The serving application on a real local Ray Serve, called over HTTP by the official openai client.

One Ray and one Serve for the whole module, with two applications:

- the main one: the two best trials of a fake sweep (``--sweep --top-k 2``) plus an adapter on a local
  S3 server (moto), an API key, room for only 2 adapters per replica (so the LRU evicts) and a short
  context (so it is cheap to exceed). Ray runs with Serve's direct ingress, so its replica also answers
  on its own port (``--direct-ingress``). The HTTP fuzzing at the end runs against it.
- ``narrow``: one batch of 2 at a time and long completions, so a test can hold the replica with one
  long request and force the next two into one batch behind it (the batch fills, and the long request
  is then cancelled by closing its connection); it also holds an adapter whose finite but huge weights
  overflow to NaN logits, and one whose file a test damages after deployment.

Every wait is a condition with a deadline, and every state a test relies on (a replica idle, a batch
formed, requests held) is arranged and then observed through ``/stats``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.waiting import wait_for

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
            "limits.max_ongoing_requests=4", "limits.max_queued_requests=4",
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


def stats(base_url: str) -> dict:
    """The replica's counters (``/stats`` beside ``/v1``)."""
    response = requests.get(
        base_url.removesuffix("/v1") + "/stats", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
    )
    response.raise_for_status()
    return response.json()


def held(counters: dict) -> int:
    """Requests a replica holds (from its stats): being prepared, queued for a batch or decoding."""
    return counters["requests"]["preparing"] + counters["requests"]["generating"]


def stats_when(base_url: str, condition, what: str) -> dict:
    """Wait until the replica's stats meet ``condition``; those stats."""

    def met():
        counters = stats(base_url)
        return counters if condition(counters) else None

    return wait_for(met, what)


def wait_idle(base_url: str) -> dict:
    """Wait until the replica holds no request; its stats then."""
    return stats_when(base_url, lambda c: held(c) == 0, "an idle replica")


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
    counters = stats(server)
    assert len(counters["adapters_loaded"]) <= 2
    churn = counters["adapter_pool"]  # three adapters through two slots: some were unloaded and reloaded
    assert churn["loads"] > 3 and churn["unloads"] >= churn["loads"] - 2 and churn["ms_per_load"] > 0
    assert churn["slot_reuses"] > 0  # the adapters share one structure: loads after evictions reuse slots


def test_concurrent_requests_for_different_adapters_share_batches(client, greedy, server):
    models = ["trial-t1", "trial-t2", "base", "trial-t1"]
    # Nothing is turned away, by construction: the replica admits more than the burst, and it is idle
    # before each burst (a request of the previous test or burst may still be finishing).
    assert stats(server)["requests"]["limit"] >= len(models)

    def burst() -> list:
        results: dict[int, object] = {}

        def call(i, model):
            try:
                results[i] = complete(client, model).choices[0].text
            except Exception as e:  # noqa: BLE001 -- compared below, with the others
                results[i] = repr(e)

        threads = [threading.Thread(target=call, args=(i, m)) for i, m in enumerate(models)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [results.get(i) for i in range(len(models))]

    # Whether the arrivals land in one batch window depends on thread scheduling, so this observes the
    # batches of a few bursts (a batch forced to mix adapters is tested on the narrow application);
    # every burst must give each request its own adapter's output.
    for _ in range(3):
        wait_idle(server)
        assert burst() == [greedy[m] for m in models]
        if stats(server)["batching"]["most_adapters"] >= 2:
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
    assert requests.get(server.removesuffix("/v1") + "/stats", timeout=10).status_code == 401


def test_without_a_key_only_health_answers_and_it_names_nothing(server):
    root = server.removesuffix("/v1")
    health = requests.get(root + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "healthy"}
    for path in ("/docs", "/redoc", "/openapi.json"):  # FastAPI serves them unless told not to
        response = requests.get(root + path, timeout=10)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_a_tiny_temperature_samples_the_most_likely_token(client, greedy):
    # 1e-45 is within OpenAI's 0..2; dividing raw logits by it gave inf, then NaN probabilities (a 500).
    assert complete(client, "base", temperature=1e-45, seed=3).choices[0].text == greedy["base"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"seed": 2**70}, "seed"),  # reached torch's manual_seed inside the batch: a 500 for the batch
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": ["x" * 129]}, "stop"),  # stop strings are matched at every token
        ({"model": "m" * 257}, "model"),
    ],
)
def test_values_beyond_openai_ranges_are_400s(server, body, param):
    response = post(server, "/completions", {"model": "base", "prompt": "hi", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_non_finite_numbers_and_lone_surrogates_are_400s(server):
    for raw, param, code in [
        (b'{"model": "base", "prompt": "hi", "temperature": NaN}', "temperature", "invalid_value"),
        (b'{"model": "base", "prompt": "hi", "top_p": Infinity}', "top_p", "invalid_value"),
        (b'{"model": "base", "prompt": "\\ud800 hi"}', None, "invalid_json"),  # no tokenizer encodes it
        (b'{"model": "\\udfff", "prompt": "hi"}', None, "invalid_json"),  # nor can a message echo it
    ]:
        response = post(server, "/completions", raw, raw=True)
        assert response.status_code == 400, (raw, response.status_code, response.text)
        assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code), raw


def raw_exchange(base_url: str, head: bytes, body_chunks=()) -> tuple[int, bytes]:
    """Send raw request bytes (a head, then chunks), and read the status and body of the answer."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the whole body was sent
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_bodies_over_the_limit_are_refused_before_they_are_read(server):
    path = urlsplit(server).path + "/completions"
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode()
    # Content-Length says 10 GB and nothing follows: reading the body first would wait forever.
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**10}\r\n".encode() + auth + b"\r\n"
    status, body = raw_exchange(server, head)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    # A chunked body (no Content-Length) is cut off once it passes the limit (1 MB by default).
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n".encode() + auth + b"\r\n"
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    status, body = raw_exchange(server, head, [chunk] * 20 + [b"0\r\n\r\n"])
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"


# ---- the narrow application: one batch of 2 at a time, long completions -------------------------

NARROW_WAIT_S = 2.0
"""The narrow app's batch window: requests that find others there wait this long for the batch to fill."""
LONG = {"model": "base", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
"""A completion the tiny model takes seconds to decode: held until its client closes the connection."""


@pytest.fixture(scope="module")
def narrow_adapters(tiny_model_dir, adapters, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    root = tmp_path_factory.mktemp("narrow")
    # Finite weights (so they pass every check) whose products overflow to inf, then NaN logits.
    overflow = write_random_adapters(tiny_model_dir, root, {"overflow": 44}, scale=1e30)["overflow"]
    fragile = shutil.copytree(adapters["a"], root / "fragile")  # damaged by a test, after deployment
    return {"overflow": overflow, "fragile": fragile, "t1": adapters["a"]}


@pytest.fixture(scope="module")
def narrow(server, narrow_adapters, tiny_model_dir):
    """The base URL of the narrow application, on the module's Serve (no second Ray)."""
    from serve.config import validate_serving_args
    from serve.deploy import deploy

    config = validate_serving_args(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "adapters": {name: str(path) for name, path in narrow_adapters.items()},
            "api_key_env": KEY_ENV,
            "docs": True,
            "batching": {"max_batch_size": 2, "batch_wait_timeout_s": NARROW_WAIT_S,
                         "max_concurrent_batches": 1},
            # Admits 3: one long request and a batch of 2 waiting behind it.
            "limits": {"max_tokens": 1000, "max_context_tokens": 1024, "max_ongoing_requests": 2,
                       "max_queued_requests": 1},
        }  # fmt: skip
    )
    return deploy(config, port=urlsplit(server).port, app_name="narrow", route_prefix="/narrow")


class HeldRequest:
    """A request on its own connection that the test ends by closing it, as a client that goes away."""

    def __init__(self, base_url: str, body: dict, path: str = "/completions"):
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        self.conn.request("POST", parts.path + path, json.dumps(body), headers)

    def first_event(self) -> bytes:
        """Wait for the stream's first event: its row is decoding."""
        response = self.conn.getresponse()
        assert response.status == 200, response.read()
        return response.readline()

    def close(self) -> None:
        self.conn.close()


def in_threads(calls) -> tuple[list[threading.Thread], dict[int, requests.Response]]:
    """Start each call (a function of no arguments) on a thread; their results land in the dict."""
    results: dict[int, requests.Response] = {}

    def run(i, call):
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results


def hold_the_replica(narrow: str, *bodies: dict) -> tuple[HeldRequest, list[threading.Thread], dict]:
    """One long request decoding, then ``bodies`` sent behind it (forming the next batch); observed."""
    before = wait_idle(narrow)
    long = HeldRequest(narrow, {**LONG, "stream": True})
    long.first_event()
    threads, results = in_threads([lambda b=b: post(narrow, "/completions", b) for b in bodies])
    queued = lambda c: c["requests"]["generating"] == 1 + len(bodies)  # noqa: E731
    stats_when(narrow, queued, f"{len(bodies)} requests queued for a batch behind the long one")
    return long, threads, {"results": results, "before": before}


def test_a_row_that_fails_in_a_batch_fails_alone(narrow, greedy):
    broken = {"model": "overflow", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 1}
    neighbour = {"model": "base", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    # Loaded first, so that both requests of the pair reach the batch queue equally fast.
    assert post(narrow, "/completions", {**broken, "max_tokens": 1}).status_code == 500
    long, threads, held_state = hold_the_replica(narrow, broken, neighbour)
    long.close()  # the batch of the two behind it runs now
    for t in threads:
        t.join()
    failed, served = held_state["results"][0], held_state["results"][1]
    after = wait_idle(narrow)
    before = held_state["before"]["batching"]
    # Forced into one batch: two batches for three requests (the long one alone, then the pair).
    assert after["batching"]["batches"] - before["batches"] == 2
    assert after["batching"]["requests"] - before["requests"] == 3
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "decode_failed", failed.text
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["text"] == greedy["base"]
    assert after["batching"]["failed_rows"] == before["failed_rows"] + 1


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_stops_its_row_and_frees_the_replica(narrow, greedy, stream):
    before = wait_idle(narrow)["batching"]
    long = HeldRequest(narrow, {**LONG, "stream": stream})
    if stream:
        long.first_event()
    else:  # no event before the end: its batch is observed starting instead
        started = lambda c: c["batching"]["batches"] == before["batches"] + 1  # noqa: E731
        stats_when(narrow, started, "the long request's batch to start")
    long.close()
    dropped = lambda c: c["batching"]["cancelled"] > before["cancelled"]  # noqa: E731
    after = stats_when(narrow, dropped, "the row of the closed connection to be dropped from its batch")
    # The row stopped before its 1000 tokens, and the replica holds nothing: the next request is served.
    assert after["batching"]["cancelled"] == before["cancelled"] + 1
    wait_idle(narrow)
    short = {"model": "base", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    assert post(narrow, "/completions", short).json()["choices"][0]["text"] == greedy["base"]


def test_a_full_replica_turns_requests_away_with_an_openai_503(narrow):
    short = {"model": "base", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    long, threads, held_state = hold_the_replica(narrow, short, short)
    try:
        assert stats(narrow)["requests"]["limit"] == 3
        turned_away = post(narrow, "/completions", short)
        assert held(stats(narrow)) == 3, "the replica was not full the whole time"
    finally:
        long.close()
        for t in threads:
            t.join()
    assert turned_away.status_code == 503, turned_away.text
    assert turned_away.headers["retry-after"] == "1"
    error = turned_away.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "overloaded" and error["message"]
    assert [r.status_code for r in held_state["results"].values()] == [200, 200]


def test_a_damaged_adapter_is_refused_for_good_and_the_model_stays_as_it_was(narrow, narrow_adapters, greedy):
    from serve.registry import WEIGHTS_FILE

    short = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    def text(model: str) -> str:
        return post(narrow, "/completions", {"model": model, **short}).json()["choices"][0]["text"]

    t1 = text("t1")
    weights = narrow_adapters["fragile"] / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])  # cut short after deployment, as a partial copy
    for _ in range(2):  # refused for good: a 400, not a 503 a client would retry
        response = post(narrow, "/completions", {"model": "fragile", **short})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "adapter_invalid" and error["param"] == "model"
        assert "truncated" in error["message"]
    assert stats(narrow)["adapters_refused"] == ["fragile"]
    # Base output equals that of a replica that never saw a failed load (the main application's), and
    # the adapter loaded before is untouched.
    assert text("base") == greedy["base"]
    assert text("t1") == t1 == greedy["trial-t1"]


def test_docs_are_served_when_the_config_asks_for_them(narrow):
    root = narrow.removesuffix("/v1")
    schema = requests.get(root + "/openapi.json", timeout=10)
    assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
    page = requests.get(root + "/docs", timeout=10)
    assert page.status_code == 200 and "/narrow/openapi.json" in page.text


# ---- HTTP fuzzing of the main application ----------------------------------------------------------

FUZZ_EXAMPLES = 300
"""Fuzzed requests per endpoint family; seeded (derandomize), so a failure repeats on every run."""
TIMEOUT_S = 30
"""A fuzzed request without an answer by then counts as hung."""


def fuzz_strategies():
    """(method, path, headers, body bytes) of requests to the OpenAI routes: well-typed requests with values
    at the edges of their ranges (most of them decode), then anything: wrong types, unknown fields,
    broken JSON and bytes, odd headers."""
    from hypothesis import strategies as st

    odd_texts = st.sampled_from(["", "\x00", "\u2028", "a" * 300])
    texts = st.text(st.characters(codec="utf-8"), max_size=20) | odd_texts
    numbers = st.integers() | st.floats() | st.sampled_from([0, -1, 2**63, 2**64, 1e-45, 1e308, 64, 65])
    values = st.recursive(
        st.none() | st.booleans() | numbers | texts,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
        max_leaves=6,
    )
    edges = {
        "max_tokens": st.integers(1, 16),
        "temperature": st.floats(0, 2) | st.sampled_from([0.0, 1e-45, 5e-324, 2.0]),
        "top_p": st.floats(0, 1, exclude_min=True) | st.sampled_from([5e-324, 1e-9, 1.0]),
        "stop": st.lists(texts.filter(lambda t: len(t) <= 128), max_size=4) | st.text(max_size=5),
        "seed": st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-(2**63), 2**63 - 1, 0]),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "user": texts,
        "ignore_eos": st.booleans(),
    }
    anything = {name: values for name in [*edges, "n", "echo", "max_completion_tokens", "logprobs"]}
    models = st.sampled_from(["base", "trial-t1", "trial-t2", "remote"])
    parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), min_size=1, max_size=2)
    roles = st.sampled_from(["system", "user", "assistant"])
    message = st.fixed_dictionaries({"role": roles, "content": texts | parts})

    def request(model, prompt, messages, optional):
        completion = st.fixed_dictionaries({"model": model, "prompt": prompt}, optional=optional)
        return completion | st.fixed_dictionaries({"model": model, "messages": messages}, optional=optional)

    well_typed = request(models, texts, st.lists(message, min_size=1, max_size=3), edges)
    loose = request(models | values, texts | values, st.lists(values, max_size=2) | values, anything)
    unknown = st.dictionaries(texts, values, max_size=3)
    with_unknown = st.builds(lambda known, extra: {**extra, **known}, well_typed, unknown)
    as_json = st.builds(lambda v: json.dumps(v).encode(), well_typed | loose | with_unknown | values)
    bodies = as_json | st.binary(max_size=64) | st.builds(lambda b, cut: b[:cut], as_json, st.integers(0, 40))
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip)
    keys = st.sampled_from([f"Bearer {API_KEY}"] * 8 + ["", "Bearer", f"bearer  {API_KEY} ", "Basic x"])
    headers = st.fixed_dictionaries(
        {"Authorization": keys | header_text},
        optional={
            "Content-Type": st.sampled_from(["application/json", "text/plain", ""]) | header_text,
            "Content-Encoding": st.sampled_from(["gzip", "br"]),
            "X-Fuzz": header_text,
        },
    )
    paths = st.sampled_from(["/completions", "/chat/completions"])
    posts = st.tuples(st.just("POST"), paths, headers, bodies)
    # Well-typed bodies go to the route they were made for more often than not.
    routed = st.builds(
        lambda body, key: ("POST", "/chat/completions" if "messages" in body else "/completions",
                           {"Authorization": f"Bearer {API_KEY}"} if key else {}, json.dumps(body).encode()),
        well_typed, st.booleans() | st.just(True),
    )  # fmt: skip
    gets = st.tuples(st.sampled_from(["GET", "POST", "DELETE"]), st.just("/models"), headers, st.just(b""))
    return routed | posts | gets


def check_answer(response: requests.Response) -> str | None:
    """Why an answer to a fuzzed request is wrong (None if it is fine): a 5xx, an error hidden in a 200
    stream, or a body that is not what OpenAI's API answers."""
    if response.status_code >= 500:
        return f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        error = response.json().get("error", {})
        return None if error.get("message") and error.get("type") else f"no error body: {response.text[:200]}"
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = response.text.split("\n\n")
        if events[-2:] != ["data: [DONE]", ""] or any('"error"' in e for e in events):
            return f"a broken or failed stream: {response.text[-300:]}"
        return None
    body = response.json()
    return None if body.get("object") in {"list", "text_completion", "chat.completion"} else f"odd: {body}"


def test_http_fuzzing_finds_no_5xx_and_no_hang_while_a_real_client_is_served(server, greedy):
    from hypothesis import HealthCheck, Phase, given, settings

    problems, counts = [], {"requests": 0, "5xx": 0, "hung": 0, "4xx": 0, "200": 0}
    stop = threading.Event()
    alongside: list[str] = []

    def well_formed_client():
        body = {"model": "base", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        while not stop.is_set():
            response = post(server, "/completions", body)
            ok = response.status_code == 200 and response.json()["choices"][0]["text"] == greedy["base"]
            alongside.append("ok" if ok else f"{response.status_code}: {response.text[:200]}")

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(fuzz_strategies())
    def fuzz(case):
        method, path, headers, body = case
        counts["requests"] += 1
        try:
            response = requests.request(method, server + path, data=body, headers=headers, timeout=TIMEOUT_S)
        except requests.Timeout:
            counts["hung"] += 1
            problems.append(f"hung: {case!r}")
            return
        counts["5xx" if response.status_code >= 500 else "4xx" if response.status_code >= 400 else "200"] += 1
        why = check_answer(response)
        if why:
            problems.append(f"{why} <- {case!r}")

    client = threading.Thread(target=well_formed_client)
    client.start()
    started = time.monotonic()
    try:
        fuzz()
    finally:
        stop.set()
        client.join()
    elapsed = time.monotonic() - started
    print(f"\nHTTP fuzzing: {counts} in {elapsed:.0f} s, {len(alongside)} well-formed requests alongside")
    assert not problems, f"{len(problems)} of {counts['requests']} fuzzed requests went wrong: {problems[:5]}"
    assert alongside and all(a == "ok" for a in alongside), [a for a in alongside if a != "ok"][:5]
    assert stats(server)["batching"]["failed_rows"] == 0
