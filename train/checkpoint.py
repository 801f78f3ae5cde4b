"""Complete, world-size-independent training checkpoints of a DeepSpeed ZeRO engine over a peft model.

Layout of one checkpoint directory (all ranks' files merged by ``ray.train.report``)::

    adapter/                 PEFT adapter (adapter_config.json + adapter_model.safetensors)   rank 0
    engine_state.safetensors full fp32 trainable params + Adam moments, gathered from ZeRO      rank 0
    train_state.json         step, epoch, tokens, optimizer/scheduler counters, config hash   rank 0
    rng_rank{r}.json         Python / NumPy RNG state of rank r                               rank r
    rng_rank{r}.safetensors  torch CPU (and CUDA) RNG state of rank r                          rank r
    manifest_rank{r}.json    sha256 of every file rank r wrote, written last (the commit)     rank r

Optimizer state is gathered with DeepSpeed's tensor-fragment API (``safe_get_full_optimizer_state``)
rather than saved as per-rank ZeRO partitions, so a checkpoint loads at any world size (elastic
restarts) and is read with safetensors only, never unpickled. A checkpoint missing a manifest, or
whose files do not match it, is rejected.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ftune.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """Where training stands: enough, with the engine state, to continue exactly."""

    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    world_size: int = 1
    gradient_accumulation_steps: int = 1
    total_steps: int = 0
    config_fingerprint: str = ""
    eval_loss_before: float | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    restarts: int = 0

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        """Parse a train_state.json, ignoring unknown keys from newer versions."""
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class CorruptCheckpoint(Exception):
    """A checkpoint directory that is incomplete or does not match its manifests."""


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def gather_engine_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 trainable params and Adam moments. Collective: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tensors: dict[str, torch.Tensor] = {}
    for name, param in _trainable(engine):
        tensors[f"param/{name}"] = safe_get_full_fp32_param(param).detach().cpu().contiguous()
        for moment in MOMENTS:
            value = safe_get_full_optimizer_state(param, moment)
            if value is not None:
                tensors[f"{moment}/{name}"] = value.detach().cpu().contiguous()
    return tensors


def _optimizer_step_count(engine) -> int:
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in np_state["state"].items()}
    py_version, py_internal, py_gauss = random.getstate()
    plain = {"python": [py_version, list(py_internal), py_gauss], "numpy": np_state}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def _set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(plain["numpy"])
    np_state["state"] = {k: (np.array(v, dtype=np.uint32) if isinstance(v, list) else v) for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(engine, state: TrainState, out_dir: Path, *, rank: int) -> None:
    """Write this rank's part of a checkpoint into ``out_dir`` (collective: all ranks call it).

    The manifest is written last, so a rank interrupted mid-write leaves no manifest and the
    checkpoint is never chosen on restore.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = gather_engine_state(engine)
    written: list[Path] = []
    if rank == 0:
        from ftune.adapters import save_adapter

        save_adapter(engine.module, out_dir / "adapter")
        written += sorted(p for p in (out_dir / "adapter").rglob("*") if p.is_file())
        save_file(tensors, str(out_dir / "engine_state.safetensors"))
        meta = {
            "train_state": asdict(state),
            "optimizer_step": _optimizer_step_count(engine),
            "scheduler": _scheduler_state(engine),
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
        }
        (out_dir / "train_state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        written += [out_dir / "engine_state.safetensors", out_dir / "train_state.json"]
    plain, rng_tensors = _rng_state()
    (out_dir / f"rng_rank{rank}.json").write_text(json.dumps(plain))
    save_file(rng_tensors, str(out_dir / f"rng_rank{rank}.safetensors"))
    written += [out_dir / f"rng_rank{rank}.json", out_dir / f"rng_rank{rank}.safetensors"]
    manifest = {str(p.relative_to(out_dir)): _sha256(p) for p in written}
    (out_dir / f"manifest_rank{rank}.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _scheduler_state(engine) -> dict[str, Any]:
    scheduler = engine.lr_scheduler
    if scheduler is None:
        return {}
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def verify_checkpoint(ckpt_dir: Path) -> int:
    """Check every manifest against the files; return the world size the checkpoint was made at.

    Raises:
        CorruptCheckpoint: a manifest or a file is missing or does not match.
    """
    state_file = ckpt_dir / "train_state.json"
    if not state_file.is_file():
        raise CorruptCheckpoint(f"{ckpt_dir}: no train_state.json")
    world = int(json.loads(state_file.read_text())["train_state"]["world_size"])
    for rank in range(world):
        manifest_file = ckpt_dir / f"manifest_rank{rank}.json"
        if not manifest_file.is_file():
            raise CorruptCheckpoint(f"{ckpt_dir}: rank {rank} never finished writing (no manifest)")
        for rel, digest in json.loads(manifest_file.read_text()).items():
            path = ckpt_dir / rel
            if not path.is_file() or _sha256(path) != digest:
                raise CorruptCheckpoint(f"{ckpt_dir}: {rel} is missing or does not match its checksum")
    return world


def _ensure_optimizer_state(engine) -> None:
    """Create Adam state tensors (zero-gradient step, fully overwritten afterwards)."""
    inner = engine.optimizer.optimizer
    if any(inner.state.values()):
        return
    # (DeepSpeed links each parameter's view of the state lazily, in its own step.)
    for group in inner.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    inner.step()
    for group in inner.param_groups:
        for p in group["params"]:
            p.grad = None
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def load_checkpoint(
    engine, ckpt_dir: Path, *, rank: int, world_size: int, fingerprint: str, adopt_lr: float | None = None
) -> TrainState:
    """Restore engine, scheduler, RNG and train state from a checkpoint made at any world size.

    Args:
        adopt_lr: Continue another run's checkpoint (PBT exploit) with this peak learning rate
            instead of the saved one; the config check is skipped.

    Raises:
        CorruptCheckpoint: the checkpoint is incomplete.
        UserError: the checkpoint was made with a different training config.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved_world = verify_checkpoint(ckpt_dir)
    meta = json.loads((ckpt_dir / "train_state.json").read_text())
    state = TrainState(**meta["train_state"])
    if adopt_lr is None and state.config_fingerprint and state.config_fingerprint != fingerprint:
        raise UserError(
            f"checkpoint {ckpt_dir} was made with a different model/lora/data/train config "
            f"({state.config_fingerprint} != {fingerprint}); give the job a new name to start fresh"
        )
    tensors = load_file(str(ckpt_dir / "engine_state.safetensors"))
    _ensure_optimizer_state(engine)
    for name, param in _trainable(engine):
        value = tensors[f"param/{name}"]
        safe_set_full_fp32_param(param, value)
        param.data.copy_(value.to(param.dtype))
        for moment in MOMENTS:
            if f"{moment}/{name}" in tensors:
                safe_set_full_optimizer_state(param, tensors[f"{moment}/{name}"], moment)
    step_count = torch.tensor(float(meta["optimizer_step"]))
    for opt_state in engine.optimizer.optimizer.state.values():
        if "step" in opt_state:
            opt_state["step"] = step_count.clone()
    if engine.lr_scheduler is not None and meta["scheduler"]:
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(meta["scheduler"].get("base_lrs", [0]))})
        if adopt_lr is not None:
            scheduler.base_lrs = [adopt_lr] * len(scheduler.base_lrs)
        for group, base, multiplier in zip(engine.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * multiplier(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in engine.optimizer.param_groups]
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    if saved_world == world_size:
        rng_plain = json.loads((ckpt_dir / f"rng_rank{rank}.json").read_text())
        _set_rng_state(rng_plain, load_file(str(ckpt_dir / f"rng_rank{rank}.safetensors")))
    if adopt_lr is None:
        state.restarts += 1
    else:
        state.config_fingerprint = fingerprint
    return state
