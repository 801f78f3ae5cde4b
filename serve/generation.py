"""Batched token-by-token decoding where each row has its own adapter, sampling settings and stops.

``model.generate`` applies one set of sampling settings to the whole batch and streams only
batch-size-1 output, so the decode loop is written out here: left-padded prefill, one KV-cached step
per call (what a Serve batch generator yields to its callers), per-row temperature / top-p / seeded
sampler, incremental detokenization, stop strings, and finished rows dropped from the cache. A row
whose caller went away is dropped too, and a row that fails ends alone (``Delta.error``). The
adapters themselves are applied per row (``adapter_names``) by the ``forward`` callable this module is
given (serve.adapter_pool.AdapterPool.forward).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

BASE_ADAPTER = "__base__"
"""peft's adapter name for rows that use the base model alone."""

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object, list[str]], torch.Tensor]
"""(input_ids, attention_mask, position_ids, kv_cache, adapter_names) -> logits of the last position."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens."""

    max_tokens: int
    """Tokens to generate at most (finish_reason "length" when reached)."""
    temperature: float = 0.0
    """0 is greedy; higher flattens the distribution."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Seed of this request's sampler; the same seed gives the same tokens (any int; taken modulo 2**64)."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion; they are not part of the returned text."""
    ignore_eos: bool = False
    """Keep going past the end-of-sequence token, for exactly max_tokens (benchmarks; as in vLLM)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to complete."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: str | None = None
    """Adapter name, or None for the base model."""
    stream: bool = False
    """Whether the caller reads the text as it is decoded; otherwise only the finished completion counts."""
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)
    """Set when the caller stops listening: the decoder drops the row at its next step."""


@dataclass(frozen=True)
class Delta:
    """What one decode step produced for one request."""

    text: str
    """New text since the previous step (may be empty while a stop string or a character is incomplete)."""
    finish_reason: str | None
    """None while decoding; "stop" (EOS or stop string) or "length" on the last delta."""
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    """Why this request failed, on its last delta (its neighbours in the batch carry on)."""

    @property
    def final(self) -> bool:
        """Whether this is the request's last delta (finished or failed)."""
        return self.finish_reason is not None or self.error is not None

    def then(self, later: Delta) -> Delta:
        """This delta and the ``later`` one of the same request, as one."""
        return Delta(
            self.text + later.text,
            later.finish_reason,
            later.prompt_tokens,
            later.completion_tokens,
            later.error,
        )


class RowError(Exception):
    """Decoding one request failed; only that request ends (its error becomes ``Delta.error``)."""


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add new text; returns (text safe to emit, whether a stop string was reached).

        Once a stop string is found, the text before it is emitted and nothing after it.
        """
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:size]):
                    hold = size
                    break
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """Text held back when the completion ends without a stop string."""
        held, self._held = self._held, ""
        return held


class TextStream:
    """Incremental detokenization: the text each new token adds.

    Decodes the generated ids together with a few prompt tokens and strips the prompt's text, so
    tokenizers that drop a word's leading space at the start of a sequence (SentencePiece) still
    give the right spacing; text ending in an incomplete UTF-8 character is held back.
    """

    PREFIX_TOKENS = 4

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._prefix = list(prompt_ids[-self.PREFIX_TOKENS :])
        self._prefix_text = tokenizer.decode(self._prefix, skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0

    def add(self, token_id: int | None, *, final: bool = False) -> str:
        """Append a token (None: nothing new) and return the text not returned before."""
        if token_id is not None:
            self._ids.append(token_id)
        text = self._tokenizer.decode(self._prefix + self._ids, skip_special_tokens=True)
        text = text.removeprefix(self._prefix_text)
        if text.endswith("\ufffd") and not final:
            return ""
        new, self._emitted = text[self._emitted :], max(self._emitted, len(text))
        return new


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from one row's logits: argmax at temperature 0, else top-p sampling.

    Sampling runs in float64 on logits shifted so that their maximum is 0: any positive temperature,
    however small (OpenAI allows down to 5e-324), then gives finite probabilities, the most likely token
    getting them all, where float32 logits divided by a tiny temperature give inf / inf = NaN.

    Raises:
        RowError: the logits hold NaN or +inf, or nothing but -inf (a broken model or adapter).
    """
    logits = logits.double()
    broken = torch.isnan(logits).any() | torch.isposinf(logits).any() | torch.isneginf(logits).all()
    if bool(broken):
        raise RowError("the model produced non-finite logits for this request")
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p; the most likely token always stays.
        keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
        keep[0] = True
        choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Row:
    request: GenerationRequest
    text: TextStream | None = None
    stops: StopMatcher | None = None
    generator: torch.Generator | None = None
    generated: int = 0
    finished: bool = False
    last_token: int = 0
    error: str | None = None
    """Why the row failed before its first step (reported by that step)."""


def _new_row(request: GenerationRequest, tokenizer) -> _Row:
    """A row ready to decode, or one carrying the error that prevents it (never raises)."""
    row = _Row(request)
    try:
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        row.generator = torch.Generator().manual_seed(seed % 2**64)
        row.text = TextStream(tokenizer, request.prompt_ids)
        row.stops = StopMatcher(request.params.stop)
    except Exception as e:  # noqa: BLE001 -- this row fails, the batch does not
        row.finished, row.error = True, f"could not start decoding: {e}"
    return row


class BatchDecoder:
    """Decodes a batch of requests together, one token per ``step()``.

    Rows that finish are dropped from the batch (and its KV cache), so a long request does not make
    short ones keep paying for decode steps. Rows whose caller went away (``request.cancelled``) are
    dropped before the next forward pass, and a row that fails (bad logits, a detokenizer error) ends
    with ``Delta.error`` while the others carry on; only a failing forward pass fails the batch.
    """

    def __init__(
        self,
        requests: Sequence[GenerationRequest],
        forward: Forward,
        tokenizer,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        device: torch.device | str = "cpu",
    ):
        if not requests:
            raise ValueError("BatchDecoder needs at least one request")
        self._forward = forward
        self._eos = set(eos_token_ids)
        self._pad = pad_token_id
        self._device = torch.device(device)
        self._rows = [_new_row(req, tokenizer) for req in requests]
        # The row of each batch position, and the rows that failed to start (reported by the next step).
        self._active = [i for i, row in enumerate(self._rows) if not row.finished]
        self._unreported = [i for i, row in enumerate(self._rows) if row.finished]
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self.cancelled = 0
        """Rows dropped because their caller stopped listening."""
        self.failed = 0
        """Rows that ended with an error."""

    @property
    def done(self) -> bool:
        """Whether every request has finished, failed or been cancelled."""
        return not self._active and not self._unreported

    def step(self) -> list[Delta | None]:
        """Run one forward pass and return one delta per request (None for rows finished earlier).

        Raises:
            Exception: whatever the forward pass raised (it ran for every row, so every row fails).
        """
        if self.done:
            raise RuntimeError("step() after every request finished")
        out: list[Delta | None] = [None] * len(self._rows)
        for index in self._unreported:
            row = self._rows[index]
            out[index] = Delta("", None, len(row.request.prompt_ids), 0, row.error)
            self.failed += 1
        self._unreported = []
        self._drop([pos for pos, i in enumerate(self._active) if not self._cancelled(i)])
        if not self._active:
            return out
        logits = self._prefill() if self._cache is None else self._decode()
        keep = []
        for pos, index in enumerate(self._active):
            row = self._rows[index]
            out[index] = self._advance_row(row, logits[pos])
            if not row.finished:
                keep.append(pos)
        self._drop(keep)
        return out

    def _drop(self, keep: list[int]) -> None:
        """Keep only the batch positions in ``keep`` (rows, KV cache, mask and positions)."""
        if len(keep) == len(self._active):
            return
        for pos in set(range(len(self._active))) - set(keep):
            row = self._rows[self._active[pos]]
            if not row.finished:  # dropped while decoding: its caller went away
                row.finished = True
                self.cancelled += 1
        self._active = [self._active[pos] for pos in keep]
        if not keep or self._cache is None:
            return
        index = torch.tensor(keep, device=self._device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._positions = self._positions[index]

    def _cancelled(self, index: int) -> bool:
        return self._rows[index].request.cancelled.is_set()

    def _adapter_names(self) -> list[str]:
        return [self._rows[i].request.adapter or BASE_ADAPTER for i in self._active]

    def _prefill(self) -> torch.Tensor:
        from transformers import DynamicCache

        prompts = [self._rows[i].request.prompt_ids for i in self._active]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):  # left padding: every row's last token is at -1
            ids[r, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[r, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._cache = DynamicCache()
        self._mask, self._positions = mask.to(self._device), positions[:, -1:].to(self._device)
        return self._forward(
            ids.to(self._device), self._mask, positions.to(self._device), self._cache, self._adapter_names()
        )

    def _decode(self) -> torch.Tensor:
        tokens = torch.tensor([[self._rows[i].last_token] for i in self._active], device=self._device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._active), 1))], dim=1)
        self._positions = self._positions + 1
        return self._forward(tokens, self._mask, self._positions, self._cache, self._adapter_names())

    def _advance_row(self, row: _Row, logits: torch.Tensor) -> Delta:
        """``_advance``, with any failure ending this row alone."""
        try:
            return self._advance(row, logits)
        except Exception as e:  # noqa: BLE001 -- this row fails, the batch does not
            row.finished = True
            self.failed += 1
            message = str(e) if isinstance(e, RowError) else f"decoding failed: {type(e).__name__}: {e}"
            return Delta("", None, len(row.request.prompt_ids), row.generated, message)

    def _advance(self, row: _Row, logits: torch.Tensor) -> Delta:
        params = row.request.params
        token = sample_token(logits, params, row.generator)
        row.generated += 1
        row.last_token = token
        finish = None
        if token in self._eos and not params.ignore_eos:
            finish = "stop"
            new_text = row.text.add(None, final=True)
        else:
            final = row.generated >= params.max_tokens
            new_text = row.text.add(token, final=final)
            finish = "length" if final else None
        text, hit_stop = row.stops.feed(new_text)
        if hit_stop:
            finish = "stop"
        elif finish is not None:
            text += row.stops.flush()
        row.finished = finish is not None
        return Delta(text, finish, len(row.request.prompt_ids), row.generated)


def run_batch(
    decoder: BatchDecoder, streams: Sequence[bool], hand_over: Callable[[list[Delta | None]], None]
) -> None:
    """Decode a batch to the end, handing over deltas (one per request, None: nothing new) only when a
    caller can use them: new text for a stream (``streams[i]``), or a request's last delta. A request's
    deltas in between are joined, so a plain completion's caller is woken once, not once per token.
    """
    pending: list[Delta | None] = [None] * len(streams)
    while not decoder.done:
        wanted = False
        for i, delta in enumerate(decoder.step()):
            if delta is not None:
                pending[i] = delta if pending[i] is None else pending[i].then(delta)
                wanted |= delta.final or (streams[i] and bool(delta.text))
        if wanted:
            hand_over(pending)
            pending = [None] * len(streams)
