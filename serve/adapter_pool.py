"""The base model and the LoRA adapters loaded into it, as one shared peft model.

Every adapter a replica serves lives in the same ``PeftModel``, so one forward pass can apply a
different adapter to each row (peft's ``adapter_names``). Serve's ``@serve.multiplexed`` LRU decides
which adapters stay; this pool does the loading and unloading it asks for, and defers unloading an
adapter until the requests already using it have finished.

A load that fails (a damaged file) is undone before the error is raised: the base model and the
other adapters stay exactly as they were.

Slots: each adapter lives in the peft model under a slot name (``slot-0``, ``slot-1``, ...), not its
own. An evicted adapter's slot stays in the model, vacant, and the next load copies its adapter into
that slot's weights when the two have the same structure (:mod:`serve.adapter_slots`): no peft
deletion, no injection. A load that no vacant slot can take deletes the vacant slots and goes through
peft, so the model never holds more slots than it held adapters at its fullest.

Threads: forward passes, loads and deletes each hold one model lock (a ``threading.Lock``), so a load
can slip in between two decode steps but never into one. Loads and deletes are also ordered among
themselves on the event loop (an ``asyncio.Lock``: unload-then-reload of one name stays in that
order). The bookkeeping (who uses what) runs on the event loop only, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from serve.gathered_lora import GatheredLora

log = logging.getLogger(__name__)


@dataclass
class PoolCounters:
    """What a pool has loaded and unloaded since it was made (LRU churn shows as loads well above the
    number of distinct adapters)."""

    loads: int = 0
    """Adapters loaded into the peft model (failed loads not counted)."""
    unloads: int = 0
    """Adapters unloaded (evicted, at once or after their last user): deleted, or their slot left vacant."""
    slot_reuses: int = 0
    """Loads (counted in ``loads``) that copied the adapter into a vacant slot instead of peft's injection."""
    failed_loads: int = 0
    """Loads undone because the adapter's files could not be loaded."""
    load_s: float = 0.0
    """Seconds spent in successful loads (reading files, peft's injection or the copy into a slot)."""
    unload_s: float = 0.0
    """Seconds spent unloading adapters (peft's deletion and restacking, or marking the slot vacant)."""

    def as_dict(self) -> dict[str, float]:
        """The counters, plus the mean milliseconds per load and per unload."""
        out = asdict(self)
        out["ms_per_load"] = 1000 * self.load_s / self.loads if self.loads else 0.0
        out["ms_per_unload"] = 1000 * self.unload_s / self.unloads if self.unloads else 0.0
        return out


class AdapterPool:
    """One base model plus the adapters currently loaded into it."""

    def __init__(self, base_model: torch.nn.Module, *, gathered: bool = True):
        """Serve ``base_model``; ``gathered``: apply mixed-adapter batches with :mod:`serve.gathered_lora`
        (two batched matmuls per layer) where the loaded adapters allow it, else with peft's per-adapter loop."""
        self._base = base_model
        self._use_gathered = gathered
        self._gathered: GatheredLora | None = None
        self._peft = None  # created by the first load; peft wraps the base model's layers in place
        self._model_lock = threading.Lock()
        self._changes = asyncio.Lock()
        self._loaded: set[str] = set()  # in the peft model and not being deleted
        self._slot_of: dict[str, str] = {}  # adapter in the peft model (evicted ones in use too) -> its slot
        self._vacant: list[str] = []  # slots in the peft model that hold no adapter now
        self._slots_made = 0
        self._loading: dict[str, asyncio.Future] = {}
        self._users: Counter[str] = Counter()
        self._doomed: set[str] = set()  # evicted while in use: unloaded when the last user releases
        self._named_layers: list[tuple[str, torch.nn.Module]] = []  # peft layers that take adapter_names
        self._adapter_layers: list[torch.nn.Module] = []  # the same layers, unnamed
        self.last_load_s = 0.0
        self.counters = PoolCounters()
        """Loads, unloads and their time (read on the event loop; written under the model lock)."""

    @property
    def loaded(self) -> list[str]:
        """Adapters loaded and not evicted (evicted ones may linger while requests still use them)."""
        return sorted(self._loaded - self._doomed)

    @property
    def resident(self) -> list[str]:
        """Adapters in the peft model right now (including evicted ones still in use)."""
        return sorted(self._slot_of)

    @property
    def vacant_slots(self) -> int:
        """Slots in the peft model that hold no adapter, kept for the next load to reuse."""
        return len(self._vacant)

    async def _change(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a model change (load, delete) in a worker thread, after the changes asked for before it."""
        async with self._changes:
            await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., None], *args: Any) -> None:
        with self._model_lock:
            fn(*args)

    async def load(self, name: str, adapter_dir: Path) -> None:
        """Make adapter ``name`` available, loading it from ``adapter_dir`` unless it is still there."""
        self._doomed.discard(name)
        if name in self._loaded:
            return
        if name not in self._loading:  # concurrent callers wait for the same load
            self._loading[name] = asyncio.ensure_future(self._change(self._load, name, Path(adapter_dir)))
        task = self._loading[name]
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(name, None)
        self._loaded.add(name)

    def _load(self, name: str, adapter_dir: Path) -> None:
        start = time.perf_counter()
        try:
            slot = self._reuse_slot(adapter_dir) if self._vacant else None
            how = "into a vacant slot" if slot is not None else "with peft"
            if slot is None:
                slot = self._inject(adapter_dir)
        except BaseException:
            self.counters.failed_loads += 1
            raise
        self._slot_of[name] = slot
        self.last_load_s = time.perf_counter() - start
        self.counters.loads += 1
        self.counters.load_s += self.last_load_s
        log.info("loaded adapter %s from %s %s in %.1f ms", name, adapter_dir, how, 1000 * self.last_load_s)

    def _inject(self, adapter_dir: Path) -> str:
        """Load an adapter through peft into a new slot (model lock held); returns the slot."""
        from ftune.adapters import load_adapter

        self._drop_vacant()  # none could take this adapter; do not let slots pile up
        slot = f"slot-{self._slots_made}"
        self._slots_made += 1
        try:
            if self._peft is None:
                self._peft = load_adapter(self._base, adapter_dir, name=slot)
            else:
                self._peft.load_adapter(str(adapter_dir), adapter_name=slot, is_trainable=False)
        except BaseException:
            self._discard(slot)
            raise
        # peft's load_adapter with is_trainable=False has put the model in eval mode already (another
        # walk over every module, which grows with the adapters loaded, would only repeat it).
        self._restack()
        return slot

    def _reuse_slot(self, adapter_dir: Path) -> str | None:
        """Copy an adapter into a vacant slot of the same structure (model lock held); returns the slot,
        or None when no vacant slot can take it. Raises, with the slot untouched, when the file is bad."""
        from serve import adapter_slots

        config = adapter_slots.read_config(adapter_dir)
        for slot in self._vacant:
            if adapter_slots.why_incompatible(self._peft.peft_config[slot], config) is None:
                break
        else:
            return None
        layers = adapter_slots.slot_layers(self._named_layers, slot)
        weights = adapter_slots.read_for_slot(adapter_dir, layers, slot, config)
        if weights is None:
            return None
        self._vacant.remove(slot)
        try:
            adapter_slots.copy_into_slot(weights, layers, slot)
            self._peft.peft_config[slot] = config
        except BaseException:
            self._delete_slot(slot)  # never serve a half-copied adapter
            raise
        if self._gathered is not None:
            self._gathered.refresh(slot)
        self.counters.slot_reuses += 1
        return slot

    def _discard(self, name: str) -> None:
        """Undo a load that failed half-way (model lock held): peft injects an adapter's layers before
        reading its weights, so a bad file would otherwise leave an empty adapter of that name behind."""
        from peft.tuners.tuners_utils import delete_adapter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            delete_adapter(self._base, name, prefix="lora_")
        configs = getattr(self._base, "peft_config", None)  # peft keeps the configs on the base model too
        if isinstance(configs, dict):
            configs.pop(name, None)
            if not configs and self._peft is None:
                del self._base.peft_config  # as before the first load
        if self._peft is not None:
            self._peft.peft_config.pop(name, None)
            self._restack()
        log.warning("loading adapter %s failed; the model is back as it was", name)

    async def evict(self, name: str) -> None:
        """Unload adapter ``name`` now, or once the requests using it have finished."""
        if name not in self._loaded:
            return
        if self._users[name]:
            self._doomed.add(name)
            return
        self._loaded.discard(name)
        await self._change(self._unload, name)

    def _unload(self, name: str) -> None:
        """Unload adapter ``name`` (model lock held): leave its slot vacant for the next load to reuse, or
        delete it from the peft model when no other adapter could be copied into it (DoRA, say)."""
        from serve import adapter_slots

        slot = self._slot_of.pop(name, None)
        if slot is None:
            return
        start = time.perf_counter()
        layers = adapter_slots.slot_layers(self._named_layers, slot)
        if adapter_slots.why_not_reusable(self._peft.peft_config[slot], layers, slot) is None:
            self._vacant.append(slot)
        else:
            self._delete_slot(slot)
        self.counters.unloads += 1
        self.counters.unload_s += time.perf_counter() - start
        log.info("unloaded adapter %s (%s)", name, "slot kept" if slot in self._vacant else "deleted")

    def _delete_slot(self, slot: str) -> None:
        """Delete a slot from the peft model (model lock held)."""
        self._delete_slots([slot])

    def _drop_vacant(self) -> None:
        """Delete every vacant slot (model lock held)."""
        slots, self._vacant = self._vacant, []
        self._delete_slots(slots)

    def _delete_slots(self, slots: list[str]) -> None:
        if not slots:
            return
        with warnings.catch_warnings():
            # peft warns when the deleted adapter was the "active" one; rows name their adapter.
            warnings.simplefilter("ignore", UserWarning)
            for slot in slots:
                self._peft.delete_adapter(slot)
        self._restack()

    def _restack(self) -> None:
        """List the layers that take adapters and restack them for gathered forwards (model lock held)."""
        self._named_layers = _named_adapter_layers(self._base)
        self._adapter_layers = [layer for _, layer in self._named_layers]
        if not self._use_gathered:
            return
        if self._gathered is None:
            self._gathered = GatheredLora()
        before = self._gathered.reason
        self._gathered.sync(self._adapter_layers, list(self._peft.peft_config))
        if self._peft.peft_config and before != self._gathered.reason and not self._gathered.supports:
            log.warning("mixed-adapter batches fall back to peft's per-adapter loop: %s", self._gathered.reason)

    @property
    def gathered(self) -> bool:
        """Whether forward passes apply the adapters by gathering (see :mod:`serve.gathered_lora`)."""
        return self._gathered is not None and self._gathered.supports

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
                await self._change(self._unload, name)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        adapter_names: list[str],
    ) -> torch.Tensor:
        """Logits of the last position for each row, each row with its adapter (blocks; use a thread).

        Where the loaded adapters allow it (vanilla LoRA on Linear layers), each LoRA layer adds its
        rows' deltas with two batched matmuls over the stacked adapters (:mod:`serve.gathered_lora`).
        Otherwise this is what ``PeftModel.forward(..., adapter_names=...)`` does, minus its per-call walk over
        every module of the model (twice), whose cost grows with each loaded adapter's submodules and
        was over a third of a decode step with 16 adapters loaded: the layers that take
        ``adapter_names`` are listed once per load/unload instead, and get the names by the same
        forward pre-hook peft uses. Every adapter named here is loaded (the pool's callers acquire it).
        """
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "past_key_values": cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        with self._model_lock:
            # Rows name adapters (or the base model); the peft model knows them by their slots.
            adapter_names = [self._slot_of.get(name, name) for name in adapter_names]
            if self.gathered:
                with self._gathered.applied(adapter_names), torch.inference_mode():
                    return self._base(**kwargs).logits[:, -1, :]
            handles = []
            if self._peft is not None and self._peft.peft_config:
                hook = partial(_add_adapter_names, adapter_names=list(adapter_names))
                handles = [
                    layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self._adapter_layers
                ]
            try:
                with torch.inference_mode():
                    # With no adapter loaded, peft's wrapped layers (if any) have no active adapter either.
                    out = self._base(**kwargs)
            finally:
                for handle in handles:
                    handle.remove()
        return out.logits[:, -1, :]


def _adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that take ``adapter_names``, in ``model.modules()`` order."""
    return [layer for _, layer in _named_adapter_layers(model)]


def _named_adapter_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers that take ``adapter_names`` with their names, in ``model.named_modules()`` order.

    The walk does not descend into such a layer: below it are only its adapters' own submodules, a
    dozen per adapter, so ``model.modules()`` would cost time in proportion to the adapters loaded.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    found, todo, seen = [], [("", model)], set()
    while todo:
        name, module = todo.pop()
        if id(module) in seen:  # a module shared by two parents is listed once, as modules() does
            continue
        seen.add(id(module))
        if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            found.append((name, module))
        else:
            children = [(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()]
            todo.extend(reversed(children))
    return found


def _add_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
