"""The Ray Serve application: an OpenAI-compatible FastAPI ingress on replicas serving many LoRA adapters.

    serve run configs/serve/tiny.yaml               # Ray's CLI: import_path serve.app:build_app
    ftune serve --config configs/serve/tiny.yaml    # the same, plus --adapter/--sweep and overrides

Each replica loads the base model once. A request's OpenAI ``model`` picks an adapter from the
registry fixed at deploy time (or the base model by ``base_model_id``); ``@serve.multiplexed`` loads
adapters into the replica's one peft model on first use and unloads the least recently used;
``@serve.batch`` decodes concurrent requests together, whatever adapters they use, applying each
row's adapter by gathering from the stacked adapters (serve/gathered_lora.py).

Before any work a request passes the key, the replica's own limit (an OpenAI 503 with Retry-After
beyond it) and the body size (serve/admission.py); tokenizing runs on a thread, off the event loop.
A row that fails while decoding ends alone (a 500 for that request; its batch carries on), and a row
whose client went away is dropped from its batch. An adapter that does not fit the base model is
refused for good with a 400, and a failed load leaves the model as it was. /healthz says only healthy
or unhealthy; /stats (with the key) has the counters; FastAPI's docs are off unless ``docs`` is set.
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the route signatures and
# needs real annotations (a string "Request" would make FastAPI expect a query parameter).
import asyncio
import contextvars
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from ray import serve as ray_serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ftune.compat.ray_private import on_multiplexed_unload
from ftune.lean_imports import skip_bitsandbytes
from serve.adapter_checks import BaseModelLayout, base_model_layout
from serve.adapter_pool import AdapterPool
from serve.admission import Admission, authorize, read_body, sampling_params
from serve.config import ServingConfig, admitted_requests, deployment_options, validate_serving_args
from serve.generation import BatchDecoder, Delta, GenerationRequest, run_batch
from serve.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_events,
    completion_body,
    completion_events,
    error_body,
    json_body,
    models_body,
    new_id,
    parse_request,
    sse_stream,
)
from serve.registry import WEIGHTS_FILE, AdapterRegistry, check_local_adapter, require_safetensors

log = logging.getLogger("ray.serve")
# FastAPI's own docs routes are off: the routes below serve them only when the config asks for them.
api = FastAPI(
    title="ftune",
    description="OpenAI-compatible serving of LoRA adapters on one base model",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_body(body), status_code=status, media_type="application/json", headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    return _json(exc.body(), exc.status, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return _json(error_body(message, type="invalid_request_error", code=code), exc.status_code)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request %s %s failed", request.method, request.url.path)
    return _json(error_body(f"internal error: {exc}", type="server_error"), 500)


def _registry(config: ServingConfig) -> AdapterRegistry:
    from ftune.builtin_assets import ftune_home

    cache = config.storage.cache_dir or str(ftune_home() / "adapter-cache")
    return AdapterRegistry(config.adapters, cache_dir=cache, endpoint_url=config.storage.endpoint_url)


class _LoadedAdapter:
    """What ``@serve.multiplexed`` caches per adapter; its LRU eviction awaits ``__del__``."""

    def __init__(self, name: str, pool: AdapterPool):
        self.name = name

        async def unload() -> None:
            await pool.evict(name)

        on_multiplexed_unload(self, unload)


def _sse(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(
        sse_stream(events, log), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


class LoraServer:
    """One replica: base model, adapter pool, batcher and the OpenAI routes."""

    def __init__(self, config: dict[str, Any]):
        import torch

        from ftune.model import load_base_model, load_tokenizer, resolve_model_path, resolve_precision

        self.config = cfg = ServingConfig.model_validate(config)
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id():  # a replica's process, not a script's
            skip_bitsandbytes(quantized=cfg.model.load_in_4bit)
        torch.set_num_threads(cfg.resources.torch_threads)
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env)
            if not self.api_key:  # fail closed: never serve unauthenticated when a key is configured
                raise RuntimeError(
                    f"api_key_env is {cfg.api_key_env!r} but that variable is not set in the replica's "
                    "environment; set it where Ray runs (or in runtime_env.env_vars)"
                )
        use_gpu = cfg.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.tokenizer = load_tokenizer(cfg.model, padding_side="left")
        require_safetensors(resolve_model_path(cfg.model))
        base = load_base_model(cfg.model, dtype=resolve_precision(cfg.precision, use_gpu), for_training=False)
        if not cfg.model.load_in_4bit:  # a 4-bit model is already placed by its device_map
            base.to(self.device)
        base.eval()
        self.context_tokens = (
            cfg.limits.max_context_tokens
            or getattr(base.config, "max_position_embeddings", None)
            or self.tokenizer.model_max_length
        )
        eos = base.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.layout = BaseModelLayout.of(base, resolve_model_path(cfg.model))  # before peft wraps its layers
        self.pool = AdapterPool(base)
        self.admission = Admission(admitted_requests(cfg.limits))
        self.batch_stats = {"batches": 0, "requests": 0, "largest": 0, "most_adapters": 0, "cancelled": 0}
        self.batch_stats["failed_rows"] = 0
        self._last_batch_size = 0
        self._refused: dict[str, str] = {}  # adapter -> why it cannot be served (until redeployed)
        self._forward_failure: str | None = None  # the last batch's forward pass failed: unhealthy
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.registry = _registry(cfg)

        # Both decorators take their settings at decoration time, and the config is only known here.
        # The loader is a plain function: Serve keeps its LRU state as an attribute of it.
        async def load_adapter(name: str) -> _LoadedAdapter:
            return await self._load_adapter(name)

        self._adapter = ray_serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(
            load_adapter
        )
        self._decode_batch = ray_serve.batch(
            max_batch_size=cfg.batching.max_batch_size,
            batch_wait_timeout_s=cfg.batching.batch_wait_timeout_s,
            max_concurrent_batches=cfg.batching.max_concurrent_batches,
        )(self._decode)

    # ---- routes -------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> Response:
        """Liveness, without the key: healthy, or unhealthy (503) while the last forward pass failed."""
        if self._forward_failure is not None:
            return _json({"status": "unhealthy"}, 503)
        return _json({"status": "healthy"})

    @api.get("/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """This replica's counters (key needed): adapters and their loads/unloads, batching, requests held,
        rows cancelled/failed."""
        authorize(request, self.api_key)
        return {
            "adapters_loaded": self.pool.loaded,
            "adapters_refused": sorted(self._refused),
            "adapter_pool": self.pool.counters.as_dict(),
            "batching": self.batch_stats,
            "requests": {
                "preparing": self.admission.preparing,
                "generating": self.admission.generating,
                "limit": self.admission.limit,
            },
        }

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict[str, Any]:
        """The OpenAPI schema, when ``docs`` is on."""
        self._require_docs()
        return request.app.openapi()

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        """Swagger UI, when ``docs`` is on."""
        self._require_docs()
        return get_swagger_ui_html(openapi_url=_root(request) + "/openapi.json", title="ftune")

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> HTMLResponse:
        """ReDoc, when ``docs`` is on."""
        self._require_docs()
        return get_redoc_html(openapi_url=_root(request) + "/openapi.json", title="ftune")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """Every model id: the base model and each registered adapter."""
        authorize(request, self.api_key)
        return models_body(self.config.model_ids)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        """Complete a prompt (``stream: true`` answers with server-sent events)."""
        authorize(request, self.api_key)
        with self.admission.prepare():
            body = parse_request(CompletionRequest, await self._read_body(request))
            encode = lambda: self.tokenizer(body.prompt_text)["input_ids"]  # noqa: E731
            prompt_ids = await self._tokenize(encode, "the prompt cannot be tokenized", "prompt")
            gen = await self._prepare(body, prompt_ids, body.max_tokens)
        rid = new_id("cmpl")
        if body.stream:
            return _sse(completion_events(rid, body, self._generate(gen), len(prompt_ids)))
        text, finish, used = await self._collect(gen)
        return completion_body(rid, body.model, text, finish, len(prompt_ids), used)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """Answer a chat, rendered with the tokenizer's chat template."""
        authorize(request, self.api_key)
        with self.admission.prepare():
            body = parse_request(ChatCompletionRequest, await self._read_body(request))
            messages = [{"role": m.role, "content": m.text} for m in body.messages]
            encode = lambda: self.tokenizer.apply_chat_template(  # noqa: E731
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            why = "the model's chat template rejected the messages"  # e.g. roles out of order
            prompt_ids = await self._tokenize(encode, why, "messages")
            gen = await self._prepare(body, prompt_ids, body.token_limit)
        rid = new_id("chatcmpl")
        if body.stream:
            return _sse(chat_events(rid, body, self._generate(gen), len(prompt_ids)))
        text, finish, used = await self._collect(gen)
        return chat_body(rid, body.model, text, finish, len(prompt_ids), used)

    # ---- request checks -----------------------------------------------------------------------

    def _require_docs(self) -> None:
        if not self.config.docs:
            raise StarletteHTTPException(404, "Not Found")

    async def _read_body(self, request: Request) -> bytes:
        return await read_body(request, self.config.limits.max_request_bytes)

    async def _tokenize(self, encode: Callable[[], list[int]], why: str, param: str) -> list[int]:
        """Run the tokenizer on its thread, off the event loop; text it cannot encode is a 400."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, encode)
        except Exception as e:  # noqa: BLE001 -- text the tokenizer cannot encode, a chat template's error
            raise ApiError(400, f"{why}: {e}", param=param) from e

    async def _prepare(self, body: Any, prompt_ids: list[int], max_tokens: int | None) -> GenerationRequest:
        """Check a parsed request against the registry and limits, and load its adapter."""
        adapter = self._adapter_of(body.model)
        params = sampling_params(body, len(prompt_ids), max_tokens, self.config.limits, self.context_tokens)
        if adapter is not None:
            await self._adapter(adapter)  # load now: a load failure is an error status, not a broken stream
        gen = GenerationRequest(tuple(prompt_ids), params, adapter, stream=body.stream)
        # However the request ends (a disconnect cancels its task), its row stops decoding.
        asyncio.current_task().add_done_callback(lambda _: gen.cancelled.set())
        return gen

    def _adapter_of(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base model)."""
        if model == self.config.base_model_id:
            return None
        if model in self.registry:
            return model
        raise ApiError(
            404,
            f"the model '{model}' does not exist; GET /v1/models lists the {len(self.config.model_ids)} "
            "served here",
            param="model",
            code="model_not_found",
        )

    # ---- adapters and generation --------------------------------------------------------------

    async def _load_adapter(self, name: str) -> _LoadedAdapter:
        """What ``@serve.multiplexed`` calls on a cache miss (``self._adapter`` is the cached form).

        An adapter that cannot be served (it does not fit the base model, its file is damaged) is refused
        with a 400 from then on; one that cannot be fetched right now is a 503, retried by the next request.
        """
        import torch

        if name in self._refused:
            raise _refusal(name, self._refused[name])
        try:
            local = await asyncio.to_thread(self.registry.local_dir, name)
        except Exception as e:  # noqa: BLE001 -- S3 unreachable, a download cut short: worth a retry
            message = f"adapter '{name}' could not be fetched: {e}"
            raise ApiError(503, message, type="server_error", code="adapter_unavailable") from e
        check = partial(check_local_adapter, base=self.layout, max_rank=self.config.max_adapter_rank)
        problems, _ = await asyncio.to_thread(check, local, read_weights=True)
        try:
            if not problems:
                await self.pool.load(name, local)
        except (MemoryError, torch.OutOfMemoryError) as e:  # no room now; an eviction may make some
            message = f"no memory to load adapter '{name}' now"
            raise ApiError(503, message, type="server_error", code="adapter_unavailable") from e
        except Exception as e:  # noqa: BLE001 -- the pool undid the load; the same files would fail again
            problems = [f"loading {WEIGHTS_FILE} failed: {type(e).__name__}: {e}"]
        if problems:
            self._refused[name] = "; ".join(problems)
            log.error("adapter %s (%s) cannot be served: %s", name, local, self._refused[name])
            raise _refusal(name, self._refused[name])
        return _LoadedAdapter(name, self.pool)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The request's deltas, decoded in a batch with whatever else is waiting.

        Raises:
            ApiError: 500 when this request's row failed while decoding (the rest of its batch did not).
        """
        with self.admission.generate():
            if request.adapter is not None:
                await self._adapter(request.adapter)  # refreshes its LRU slot (reloads if evicted meanwhile)
            self.pool.acquire(request.adapter)
            # Waiting for company only pays when company is likely: other requests are queued or decoding,
            # or the last batch held several (concurrent clients come back together). A lone client's
            # request finds neither and starts decoding at once.
            company = self.admission.generating > 1 or self._last_batch_size > 1
            self._decode_batch.set_batch_wait_timeout_s(
                self.config.batching.batch_wait_timeout_s if company else 0.0
            )
            try:
                # Serve splits batches by multiplexed model id (the routing header); we want one batch to
                # mix adapters, so the request is queued from an empty context that carries no such id.
                stream = contextvars.Context().run(self._decode_batch, request)
                async for delta in stream:
                    if delta.error is not None:
                        raise ApiError(
                            500, f"decoding this request failed: {delta.error}", type="server_error",
                            code="decode_failed",
                        )  # fmt: skip
                    yield delta
            finally:
                request.cancelled.set()  # the caller is done: a row still decoding is dropped
                await self.pool.release(request.adapter)

    async def _decode(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        """The batch handler: lists of one delta per request (StopIteration for rows finished before)."""
        stats = self.batch_stats
        self._last_batch_size = len(requests)
        stats["batches"] += 1
        stats["requests"] += len(requests)
        stats["largest"] = max(stats["largest"], len(requests))
        stats["most_adapters"] = max(stats["most_adapters"], len({r.adapter for r in requests}))
        decoder = BatchDecoder(
            requests,
            self.pool.forward,
            self.tokenizer,
            eos_token_ids=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            device=self.device,
        )
        # The decode loop runs on a worker thread, so the next step is computed while the event loop
        # delivers this one; a batch of plain completions wakes the event loop once per finished request,
        # not once per token (see run_batch), and leaves the thread the CPU the loop would have taken.
        steps: asyncio.Queue = asyncio.Queue()
        hand_over = partial(asyncio.get_running_loop().call_soon_threadsafe, steps.put_nowait)

        def produce() -> None:
            try:
                run_batch(decoder, [r.stream for r in requests], hand_over)
            except BaseException as e:  # noqa: BLE001 -- re-raised on the event loop, failing the whole batch
                hand_over(e)
            hand_over(None)

        worker = asyncio.ensure_future(asyncio.to_thread(produce))
        while (deltas := await steps.get()) is not None:
            if isinstance(deltas, BaseException):
                self._forward_failure = f"{type(deltas).__name__}: {deltas}"
                raise deltas
            yield [StopIteration if d is None else d for d in deltas]
        await worker
        self._forward_failure = None
        stats["cancelled"] += decoder.cancelled
        stats["failed_rows"] += decoder.failed

    async def _collect(self, request: GenerationRequest) -> tuple[str, str | None, int]:
        parts, finish, used = [], None, 0
        async for delta in self._generate(request):
            parts.append(delta.text)
            finish, used = delta.finish_reason, delta.completion_tokens
        return "".join(parts), finish, used


def _refusal(name: str, why: str) -> ApiError:
    return ApiError(
        400,
        f"the model '{name}' cannot be served, its adapter is unusable: {why}. Fix the adapter and "
        "redeploy; GET /v1/models lists the others",
        param="model",
        code="adapter_invalid",
    )


def _root(request: Request) -> str:
    """Where this application is mounted (its route prefix), for links in the docs pages."""
    return request.scope.get("root_path", "").rstrip("/")


def build_app(args: dict[str, Any]) -> ray_serve.Application:
    """The application for a Serve config file's ``import_path: serve.app:build_app``.

    Validates ``args`` as a ServingConfig and checks every adapter before any replica starts.

    Raises:
        ConfigError: naming each bad key or adapter.
    """
    config = validate_serving_args(args)
    return build_application(config)


def build_application(config: ServingConfig) -> ray_serve.Application:
    """The application for an already validated config (checks the adapters first).

    Each adapter is compared with the base model, whose layout comes from its config alone.

    Raises:
        ConfigError: listing every adapter that is missing, damaged, not LoRA, made for another model or
            of too high a rank.
        UserError: the base model's config cannot be read.
    """
    registry = _registry(config)
    if registry.names:
        registry.inspect(base_model_layout(config.model), config.max_adapter_rank)
    return LoraDeployment.options(**deployment_options(config)).bind(config.model_dump(mode="json"))


# Decorated apart from the class so that `serve.app.LoraServer` stays the class itself: replicas then
# import this module (pickling by reference) instead of receiving a by-value copy of the class.
LoraDeployment = ray_serve.deployment(name="LoraServer")(ray_serve.ingress(api)(LoraServer))
