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
whose files do not match it, is rejected; so is one whose files cannot be parsed or do not fit the
model: every kind of damage is a ``CorruptCheckpoint``, raised before the engine is touched. Checks
read through a pyarrow filesystem, so they work on a local directory and on object storage alike.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

from ftune.compat.deepspeed_private import link_optimizer_state
from ftune.compat.torch_private import set_last_lr
from ftune.errors import UserError

MOMENTS = ("exp_avg", "exp_avg_sq")
CHECKPOINT_NAME = re.compile(r"^checkpoint_step(\d+)(_|$)")
"""Names the training loop gives checkpoint directories: the step, then optional tags (``_jit``, ``_r1``)."""


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory name (``checkpoint_step0000060``, ``..._jit``), else None."""
    match = CHECKPOINT_NAME.match(name)
    return int(match.group(1)) if match else None


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
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Any) -> TrainState:
        """A state from its saved form, ignoring unknown keys from newer versions.

        Raises:
            ValueError: a required field is missing or has the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError(f"train_state is {type(data).__name__}, not a mapping")
        missing = [k for k in REQUIRED_STATE_FIELDS if k not in data]
        if missing:
            raise ValueError(f"train_state lacks {', '.join(missing)}")
        for key in REQUIRED_STATE_FIELDS:
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
                raise ValueError(f"train_state.{key} is {data[key]!r}, not a count")
        if data["world_size"] < 1:
            raise ValueError("train_state.world_size is 0")
        state = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        if not isinstance(state.last_eval, dict) or not isinstance(state.config_fingerprint, str):
            raise ValueError("train_state.last_eval or config_fingerprint has the wrong type")
        return state


REQUIRED_STATE_FIELDS = ("step", "epoch", "tokens_seen", "world_size", "gradient_accumulation_steps", "total_steps")
"""Fields every saved train state has (the rest have defaults)."""


class CorruptCheckpoint(Exception):
    """A checkpoint directory that is incomplete, does not match its manifests, or cannot be parsed."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The parsed ``train_state.json`` of a checkpoint."""

    state: TrainState
    """Where training stood."""
    optimizer_step: int
    """Adam's step counter."""
    scheduler: dict[str, Any]
    """The LR scheduler's state (its lambdas left out)."""
    global_steps: int
    """DeepSpeed's step counter."""
    global_samples: int
    """DeepSpeed's sample counter."""

    @classmethod
    def parse(cls, text: str, where: str) -> CheckpointMeta:
        """Parse and check a train_state.json.

        Raises:
            CorruptCheckpoint: it is not JSON, or a field is missing or of the wrong type.
        """
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"it is {type(data).__name__}, not a mapping")
            counters = {k: data[k] for k in ("optimizer_step", "global_steps", "global_samples")}
            if any(not isinstance(v, int) or isinstance(v, bool) for v in counters.values()):
                raise ValueError(f"a counter is not an integer: {counters}")
            if not isinstance(data["scheduler"], dict):
                raise ValueError("scheduler is not a mapping")
            return cls(TrainState.from_dict(data["train_state"]), scheduler=data["scheduler"], **counters)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            detail = f"no {e}" if isinstance(e, KeyError) else str(e)
            raise CorruptCheckpoint(f"{where}: train_state.json is unreadable ({type(e).__name__}: {detail})") from e


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
    return _sha256_of(pafs.LocalFileSystem(), str(path))


def _sha256_of(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _on(ckpt: str | Path, fs: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path a checkpoint is read through (a local directory by default)."""
    return (fs, str(ckpt).rstrip("/")) if fs is not None else (pafs.LocalFileSystem(), str(Path(ckpt).resolve()))


def _is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def _read_text(fs: pafs.FileSystem, path: str, where: str) -> str:
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpoint(f"{where}: {path.rsplit('/', 1)[-1]} is not text ({e})") from e


def read_meta(ckpt: str | Path, fs: pafs.FileSystem | None = None) -> CheckpointMeta:
    """The checkpoint's parsed train_state.json.

    Raises:
        CorruptCheckpoint: it is missing or unreadable.
    """
    fs, root = _on(ckpt, fs)
    if not _is_file(fs, f"{root}/train_state.json"):
        raise CorruptCheckpoint(f"{root}: no train_state.json")
    return CheckpointMeta.parse(_read_text(fs, f"{root}/train_state.json", root), root)


def _manifest(fs: pafs.FileSystem, root: str, rank: int) -> dict[str, str]:
    path = f"{root}/manifest_rank{rank}.json"
    if not _is_file(fs, path):
        raise CorruptCheckpoint(f"{root}: rank {rank} never finished writing (no manifest)")
    try:
        manifest = json.loads(_read_text(fs, path, root))
    except ValueError as e:
        raise CorruptCheckpoint(f"{root}: manifest_rank{rank}.json is unreadable ({e})") from e
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise CorruptCheckpoint(f"{root}: manifest_rank{rank}.json is not a mapping of file to checksum")
    return manifest


def _check_files(fs: pafs.FileSystem, root: str, manifest: dict[str, str]) -> None:
    for rel, digest in manifest.items():
        path = f"{root}/{rel}"
        if ".." in Path(rel).parts or not _is_file(fs, path) or _sha256_of(fs, path) != digest:
            raise CorruptCheckpoint(f"{root}: {rel} is missing or does not match its checksum")


def save_checkpoint(engine, state: TrainState, out_dir: Path, *, rank: int) -> None:
    """Write this rank's part of a checkpoint into ``out_dir`` (collective: all ranks call it).

    The manifest is written last, so a rank interrupted mid-write leaves no manifest: restore rejects
    that checkpoint (``CorruptCheckpoint``) and falls back to the newest older one that verifies
    (``train.restore.restore``).
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


def verify_checkpoint(ckpt: str | Path, fs: pafs.FileSystem | None = None) -> int:
    """Check every manifest against the files; return the world size the checkpoint was made at.

    Args:
        ckpt: The checkpoint directory: a local path, or a path inside ``fs``.
        fs: The filesystem holding it (None: the local one).

    Raises:
        CorruptCheckpoint: a manifest or a file is missing, unreadable or does not match.
    """
    fs, root = _on(ckpt, fs)
    world = read_meta(root, fs).state.world_size
    manifests = [_manifest(fs, root, rank) for rank in range(world)]
    for manifest in manifests:
        _check_files(fs, root, manifest)
    required = [("train_state.json", 0), ("engine_state.safetensors", 0), ("adapter/adapter_config.json", 0)]
    required += [(f"rng_rank{rank}.{ext}", rank) for rank in range(world) for ext in ("json", "safetensors")]
    for rel, rank in required:
        if rel not in manifests[rank]:
            raise CorruptCheckpoint(f"{root}: manifest_rank{rank}.json does not list {rel}")
    return world


def verify_adapter(ckpt: str | Path, fs: pafs.FileSystem | None = None) -> None:
    """Check just the checkpoint's adapter files against rank 0's manifest (cheaper than the whole checkpoint).

    Raises:
        CorruptCheckpoint: the manifest lists no complete adapter, or a file does not match it.
    """
    fs, root = _on(ckpt, fs)
    adapter = {rel: digest for rel, digest in _manifest(fs, root, 0).items() if rel.startswith("adapter/")}
    if not {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter.keys():
        raise CorruptCheckpoint(f"{root}: manifest_rank0.json lists no complete adapter")
    _check_files(fs, root, adapter)


def newest_readable_meta(fs: pafs.FileSystem, run_path: str) -> tuple[str, CheckpointMeta] | None:
    """(name, train state) of the newest checkpoint directory in a run directory whose train_state.json
    parses, or None. Reads one small file per damaged checkpoint, never the weights."""
    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and checkpoint_step(i.base_name) is not None]
    for name in sorted(names, key=lambda n: (checkpoint_step(n), n), reverse=True):
        try:
            return name, read_meta(f"{run_path}/{name}", fs)
        except CorruptCheckpoint:
            continue
    return None


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
    link_optimizer_state(engine.optimizer)


def load_checkpoint(
    engine, ckpt_dir: Path, *, rank: int, world_size: int, fingerprint: str, adopt_lr: float | None = None
) -> TrainState:
    """Restore engine, scheduler, RNG and train state from a checkpoint made at any world size.

    Everything is read and checked before the engine is changed, so a rejected checkpoint leaves it as it was.

    Args:
        adopt_lr: Continue another run's checkpoint (PBT exploit) with this peak learning rate
            instead of the saved one; the config check is skipped.

    Raises:
        CorruptCheckpoint: the checkpoint is incomplete, unreadable, or does not fit the model.
        UserError: the checkpoint was made with a different training config.
    """
    ckpt_dir = Path(ckpt_dir).resolve()  # the form every message names it in
    saved_world = verify_checkpoint(ckpt_dir)
    meta = read_meta(ckpt_dir)
    state = meta.state
    if adopt_lr is None and state.config_fingerprint and state.config_fingerprint != fingerprint:
        raise UserError(
            f"checkpoint {ckpt_dir} was made with a different model/lora/data/train config "
            f"({state.config_fingerprint} != {fingerprint}); give the job a new name to start fresh"
        )
    tensors = _engine_tensors(engine, ckpt_dir)
    rng = _read_rng(ckpt_dir, rank) if saved_world == world_size else None
    _apply_engine_state(engine, tensors, meta.optimizer_step)
    _apply_scheduler(engine, meta.scheduler, adopt_lr)
    engine.global_steps = meta.global_steps
    engine.global_samples = meta.global_samples
    if rng is not None:
        _set_rng_state(*rng)
    if adopt_lr is None:
        state.restarts += 1
    else:
        state.config_fingerprint = fingerprint
    return state


def _engine_tensors(engine, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The saved parameters and moments, checked against the model's trainable parameters."""
    try:
        tensors = load_file(str(ckpt_dir / "engine_state.safetensors"))
    except Exception as e:  # safetensors raises its own error type for a damaged header
        raise CorruptCheckpoint(f"{ckpt_dir}: engine_state.safetensors is unreadable ({e})") from e
    for name, param in _trainable(engine):
        for key in (f"param/{name}", *(f"{m}/{name}" for m in MOMENTS)):
            if key not in tensors:
                if key.startswith("param/"):
                    raise CorruptCheckpoint(f"{ckpt_dir}: engine_state.safetensors has no {key}")
                continue
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise CorruptCheckpoint(f"{ckpt_dir}: {key} has shape {tuple(tensors[key].shape)}, the model's "
                                        f"parameter {tuple(param.shape)}")
    return tensors


def _read_rng(ckpt_dir: Path, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        plain = json.loads((ckpt_dir / f"rng_rank{rank}.json").read_text())
        tensors = load_file(str(ckpt_dir / f"rng_rank{rank}.safetensors"))
        if not {"python", "numpy"} <= plain.keys() or "torch_cpu" not in tensors:
            raise ValueError("an RNG state is missing")
        return plain, tensors
    except Exception as e:  # JSON, key or safetensors errors: all mean the same damage
        raise CorruptCheckpoint(f"{ckpt_dir}: rng_rank{rank} is unreadable ({e})") from e


def _apply_engine_state(engine, tensors: dict[str, torch.Tensor], optimizer_step: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _ensure_optimizer_state(engine)
    for name, param in _trainable(engine):
        value = tensors[f"param/{name}"]
        safe_set_full_fp32_param(param, value)
        param.data.copy_(value.to(param.dtype))
        for moment in MOMENTS:
            if f"{moment}/{name}" in tensors:
                safe_set_full_optimizer_state(param, tensors[f"{moment}/{name}"], moment)
    step_count = torch.tensor(float(optimizer_step))
    for opt_state in engine.optimizer.optimizer.state.values():
        if "step" in opt_state:
            opt_state["step"] = step_count.clone()


def _apply_scheduler(engine, saved: dict[str, Any], adopt_lr: float | None) -> None:
    scheduler = engine.lr_scheduler
    if scheduler is None or not saved:
        return
    scheduler.load_state_dict({**saved, "lr_lambdas": [None] * len(saved.get("base_lrs", [0]))})
    if adopt_lr is not None:
        scheduler.base_lrs = [adopt_lr] * len(scheduler.base_lrs)
    for group, base, multiplier in zip(engine.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(scheduler.last_epoch)
    set_last_lr(scheduler, [group["lr"] for group in engine.optimizer.param_groups])
