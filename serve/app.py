"""The Ray Serve application: an OpenAI-compatible FastAPI ingress on replicas serving many LoRA adapters.

    serve run configs/serve/tiny.yaml               # Ray's CLI: import_path serve.app:build_app
    ftune serve --config configs/serve/tiny.yaml    # the same, plus --adapter/--sweep and overrides

Each replica loads the base model once. A request's OpenAI ``model`` picks an adapter from the
registry fixed at deploy time (or the base model by ``base_model_id``); ``@serve.multiplexed`` loads
adapters into the replica's one peft model on first use and unloads the least recently used;
``@serve.batch`` decodes concurrent requests together, whatever adapters they use, applying each
row's adapter by gathering from the stacked adapters (serve/gathered_lora.py).
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the route signatures and
# needs real annotations (a string "Request" would make FastAPI expect a query parameter).
import asyncio
import contextvars
import hmac
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.adapter_pool import AdapterPool
from serve.config import ServingConfig, deployment_options, validate_serving_args
from serve.generation import BatchDecoder, Delta, GenerationRequest, SamplingParams
from serve.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    models_body,
    new_id,
    parse_request,
    sse_event,
    sse_stream,
    usage_chunk,
)
from serve.registry import AdapterRegistry, require_safetensors

log = logging.getLogger("ray.serve")
api = FastAPI(title="ftune", description="OpenAI-compatible serving of LoRA adapters on one base model")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(
        error_body(
            f"{request.method} {request.url.path}: {exc.detail}", type="invalid_request_error", code=code
        ),
        status_code=exc.status_code,
    )


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request %s %s failed", request.method, request.url.path)
    return JSONResponse(error_body(f"internal error: {exc}", type="server_error"), status_code=500)


def _registry(config: ServingConfig) -> AdapterRegistry:
    from ftune.builtin import ftune_home

    cache = config.storage.cache_dir or str(ftune_home() / "adapter-cache")
    return AdapterRegistry(config.adapters, cache_dir=cache, endpoint_url=config.storage.endpoint_url)


class _LoadedAdapter:
    """What ``@serve.multiplexed`` caches per adapter; its LRU eviction awaits ``__del__``."""

    def __init__(self, name: str, pool: AdapterPool):
        self.name = name

        async def unload() -> None:
            await pool.evict(name)

        # An instance attribute, not a method: Serve's LRU awaits it, while garbage collection
        # (which only calls a __del__ defined on the class) never does.
        self.__del__ = unload


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
        self.pool = AdapterPool(base)
        self.batch_stats = {"batches": 0, "requests": 0, "largest": 0, "most_adapters": 0}
        self._in_flight = 0  # requests queued or decoding
        self._last_batch_size = 0
        self.registry = _registry(cfg)

        # Both decorators take their settings at decoration time, and the config is only known here.
        # The loader is a plain function: Serve keeps its LRU state as an attribute of it.
        async def load_adapter(name: str) -> _LoadedAdapter:
            return await self._load_adapter(name)

        self._adapter = serve.multiplexed(max_num_models_per_replica=cfg.max_adapters_per_replica)(
            load_adapter
        )
        self._decode_batch = serve.batch(
            max_batch_size=cfg.batching.max_batch_size,
            batch_wait_timeout_s=cfg.batching.batch_wait_timeout_s,
            max_concurrent_batches=cfg.batching.max_concurrent_batches,
        )(self._decode)

    # ---- routes -------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness (no key needed), with the adapters loaded and batching counters of this replica."""
        return {"status": "ok", "adapters_loaded": self.pool.loaded, "batching": self.batch_stats}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """Every model id: the base model and each registered adapter."""
        self._authorize(request)
        return models_body(self.config.model_ids)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        """Complete a prompt (``stream: true`` answers with server-sent events)."""
        self._authorize(request)
        body = parse_request(CompletionRequest, await self._read_body(request))
        prompt_ids = self.tokenizer(body.prompt_text)["input_ids"]
        gen = await self._prepare(body, prompt_ids, body.max_tokens)
        rid = new_id("cmpl")
        if body.stream:
            return _sse(self._completion_events(rid, body, gen))
        text, finish, used = await self._collect(gen)
        return completion_body(rid, body.model, text, finish, len(prompt_ids), used)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """Answer a chat, rendered with the tokenizer's chat template."""
        self._authorize(request)
        body = parse_request(ChatCompletionRequest, await self._read_body(request))
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        try:
            prompt_ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
            raise ApiError(
                400, f"the model's chat template rejected the messages: {e}", param="messages"
            ) from e
        gen = await self._prepare(body, prompt_ids, body.token_limit)
        rid = new_id("chatcmpl")
        if body.stream:
            return _sse(self._chat_events(rid, body, gen))
        text, finish, used = await self._collect(gen)
        return chat_body(rid, body.model, text, finish, len(prompt_ids), used)

    # ---- request checks -----------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or invalid API key; send it as 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def _read_body(self, request: Request) -> bytes:
        body = await request.body()
        if len(body) > self.config.limits.max_request_bytes:
            raise ApiError(
                413, f"request body is {len(body)} bytes; the limit is {self.config.limits.max_request_bytes}"
            )
        return body

    async def _prepare(self, body: Any, prompt_ids: list[int], max_tokens: int | None) -> GenerationRequest:
        """Check a parsed request against the registry and limits, and load its adapter."""
        limits = self.config.limits
        if body.model == self.config.base_model_id:
            adapter = None
        elif body.model in self.registry:
            adapter = body.model
        else:
            raise ApiError(
                404,
                f"the model '{body.model}' does not exist; GET /v1/models lists the "
                f"{len(self.config.model_ids)} served here",
                param="model",
                code="model_not_found",
            )
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise ApiError(
                400,
                f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}",
                param="max_tokens",
            )
        room = self.context_tokens - len(prompt_ids)
        wanted = max_tokens if max_tokens is not None else min(limits.default_max_tokens, max(room, 1))
        if len(prompt_ids) + wanted > self.context_tokens:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.context_tokens} tokens, but the request needs "
                f"{len(prompt_ids) + wanted} ({len(prompt_ids)} in the prompt, {wanted} for the completion); "
                "shorten the prompt or lower max_tokens",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        stops = body.stop_sequences
        if len(stops) > limits.max_stop_sequences:
            raise ApiError(
                400, f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop"
            )
        if adapter is not None:
            await self._adapter(
                adapter
            )  # load now, so a load failure is an error status, not a broken stream
        params = SamplingParams(
            wanted, body.temperature, body.top_p, body.seed, tuple(stops), body.ignore_eos
        )
        return GenerationRequest(tuple(prompt_ids), params, adapter, stream=body.stream)

    # ---- adapters and generation --------------------------------------------------------------

    async def _load_adapter(self, name: str) -> _LoadedAdapter:
        """What ``@serve.multiplexed`` calls on a cache miss (``self._adapter`` is the cached form)."""
        try:
            local = await asyncio.to_thread(self.registry.local_dir, name)
            await self.pool.load(name, local)
        except Exception as e:
            raise ApiError(
                503,
                f"adapter '{name}' could not be loaded: {e}",
                type="server_error",
                code="adapter_unavailable",
            ) from e
        return _LoadedAdapter(name, self.pool)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The request's deltas, decoded in a batch with whatever else is waiting."""
        if request.adapter is not None:
            await self._adapter(request.adapter)  # refreshes its LRU slot (reloads if evicted meanwhile)
        self.pool.acquire(request.adapter)
        # Waiting for company only pays when company is likely: other requests are queued or decoding, or
        # the last batch held several (concurrent clients come back together). A lone client's request
        # finds neither and starts decoding at once.
        company = self._in_flight > 0 or self._last_batch_size > 1
        self._decode_batch.set_batch_wait_timeout_s(
            self.config.batching.batch_wait_timeout_s if company else 0.0
        )
        self._in_flight += 1
        try:
            # Serve splits batches by multiplexed model id (the routing header); we want one batch to
            # mix adapters, so the request is queued from an empty context that carries no such id.
            stream = contextvars.Context().run(self._decode_batch, request)
            async for delta in stream:
                yield delta
        finally:
            self._in_flight -= 1
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
        # delivers this one. It hands deltas over only when a caller can use them (new text for a stream,
        # or a finished request): a batch of plain completions wakes the event loop once per finished
        # request, not once per token, and leaves the thread the CPU the loop would have taken.
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()

        def produce() -> None:
            pending: list[Delta | None] = [None] * len(requests)
            try:
                while not decoder.done:
                    wanted = False
                    for i, delta in enumerate(decoder.step()):
                        if delta is not None:
                            pending[i] = delta if pending[i] is None else pending[i].then(delta)
                            wanted |= delta.finish_reason is not None or (
                                requests[i].stream and bool(delta.text)
                            )
                    if wanted:
                        loop.call_soon_threadsafe(steps.put_nowait, pending)
                        pending = [None] * len(requests)
            except BaseException as e:  # noqa: BLE001 -- re-raised on the event loop, failing this batch's requests
                loop.call_soon_threadsafe(steps.put_nowait, e)
            loop.call_soon_threadsafe(steps.put_nowait, None)

        worker = asyncio.ensure_future(asyncio.to_thread(produce))
        while (deltas := await steps.get()) is not None:
            if isinstance(deltas, BaseException):
                raise deltas
            yield [StopIteration if d is None else d for d in deltas]
        await worker

    async def _collect(self, request: GenerationRequest) -> tuple[str, str | None, int]:
        parts, finish, used = [], None, 0
        async for delta in self._generate(request):
            parts.append(delta.text)
            finish, used = delta.finish_reason, delta.completion_tokens
        return "".join(parts), finish, used

    async def _completion_events(self, rid: str, body: CompletionRequest, gen: GenerationRequest):
        used = 0
        async for delta in self._generate(gen):
            used = delta.completion_tokens
            if delta.text or delta.finish_reason:
                yield sse_event(completion_chunk(rid, body.model, delta.text, delta.finish_reason))
        if body.include_usage:
            yield sse_event(usage_chunk(rid, body.model, "text_completion", len(gen.prompt_ids), used))

    async def _chat_events(self, rid: str, body: ChatCompletionRequest, gen: GenerationRequest):
        yield sse_event(chat_chunk(rid, body.model, {"role": "assistant", "content": ""}, None))
        used = 0
        async for delta in self._generate(gen):
            used = delta.completion_tokens
            if delta.text:
                yield sse_event(chat_chunk(rid, body.model, {"content": delta.text}, None))
            if delta.finish_reason:
                yield sse_event(chat_chunk(rid, body.model, {}, delta.finish_reason))
        if body.include_usage:
            yield sse_event(usage_chunk(rid, body.model, "chat.completion.chunk", len(gen.prompt_ids), used))


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for a Serve config file's ``import_path: serve.app:build_app``.

    Validates ``args`` as a ServingConfig and checks every adapter before any replica starts.

    Raises:
        ConfigError: naming each bad key or adapter.
    """
    config = validate_serving_args(args)
    return build_application(config)


def build_application(config: ServingConfig) -> serve.Application:
    """The application for an already validated config (checks the adapters first)."""
    _registry(config).inspect()
    return LoraDeployment.options(**deployment_options(config)).bind(config.model_dump(mode="json"))


# Decorated apart from the class so that `serve.app.LoraServer` stays the class itself: replicas then
# import this module (pickling by reference) instead of receiving a by-value copy of the class.
LoraDeployment = serve.deployment(name="LoraServer")(serve.ingress(api)(LoraServer))
