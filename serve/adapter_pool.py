"""The base model and the LoRA adapters loaded into it, as one shared peft model.

Every adapter a replica serves lives in the same ``PeftModel``, so one forward pass can apply a
different adapter to each row (peft's ``adapter_names``). Serve's ``@serve.multiplexed`` LRU decides
which adapters stay; this pool does the loading and unloading it asks for, and defers unloading an
adapter until the requests already using it have finished.

Everything that touches the model (forward passes, loading, deleting) runs in a worker thread under
one asyncio lock, in the order it was requested; the bookkeeping (who uses what) runs on the event
loop only, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


class AdapterPool:
    """One base model plus the adapters currently loaded into it."""

    def __init__(self, base_model: torch.nn.Module):
        self._base = base_model
        self._peft = None  # created by the first load; peft wraps the base model's layers in place
        self._lock = asyncio.Lock()
        self._loaded: set[str] = set()  # adapters new requests may use
        self._users: Counter[str] = Counter()
        self._doomed: set[str] = set()  # evicted while in use: deleted when the last user releases
        self.last_load_s = 0.0

    @property
    def loaded(self) -> list[str]:
        """Adapters new requests may use."""
        return sorted(self._loaded)

    @property
    def resident(self) -> list[str]:
        """Adapters in the peft model right now (including evicted ones still in use)."""
        return sorted(self._peft.peft_config) if self._peft is not None else []

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread with exclusive use of the model."""
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    async def load(self, name: str, adapter_dir: Path) -> None:
        """Make adapter ``name`` available, loading it from ``adapter_dir`` unless it is still there."""
        self._doomed.discard(name)
        if name in self._loaded:
            return
        self._loaded.add(name)  # reserve the name now so a concurrent load does not load it twice
        try:
            await self.run(self._load, name, Path(adapter_dir))
        except BaseException:
            self._loaded.discard(name)
            raise

    def _load(self, name: str, adapter_dir: Path) -> None:
        from ftune.adapters import load_adapter

        start = time.perf_counter()
        if self._peft is None:
            self._peft = load_adapter(self._base, adapter_dir, name=name)
        else:
            self._peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        self._peft.eval()
        self.last_load_s = time.perf_counter() - start
        log.info("loaded adapter %s from %s in %.1f ms", name, adapter_dir, 1000 * self.last_load_s)

    async def evict(self, name: str) -> None:
        """Unload adapter ``name`` now, or once the requests using it have finished."""
        if name not in self._loaded:
            return
        if self._users[name]:
            self._doomed.add(name)
            return
        self._loaded.discard(name)
        await self.run(self._delete, name)

    def _delete(self, name: str) -> None:
        if self._peft is None or name not in self._peft.peft_config:
            return
        with warnings.catch_warnings():
            # peft warns when the deleted adapter was the "active" one; rows name their adapter.
            warnings.simplefilter("ignore", UserWarning)
            self._peft.delete_adapter(name)
        log.info("unloaded adapter %s", name)

    def acquire(self, name: str | None) -> None:
        """Mark adapter ``name`` as used by one more request (None: the base model, nothing to do)."""
        if name is None:
            return
        if name not in self._loaded:
            raise RuntimeError(f"adapter {name!r} is not loaded")
        self._users[name] += 1

    async def release(self, name: str | None) -> None:
        """Undo one ``acquire``; unloads the adapter if it was evicted and this was its last user."""
        if name is None:
            return
        self._users[name] -= 1
        if self._users[name] <= 0:
            del self._users[name]
            if name in self._doomed:
                self._doomed.discard(name)
                self._loaded.discard(name)
                await self.run(self._delete, name)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        adapter_names: list[str],
    ) -> torch.Tensor:
        """Logits of the last position for each row, each row with its adapter (call inside ``run``)."""
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        with torch.inference_mode():
            if self._peft is None or not self._peft.peft_config:
                # No adapter loaded: peft's wrapped layers (if any) have no active adapter either.
                out = self._base(**kwargs)
            else:
                out = self._peft(**kwargs, adapter_names=adapter_names)
        return out.logits[:, -1, :]
