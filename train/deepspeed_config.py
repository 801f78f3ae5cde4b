"""Generate the DeepSpeed JSON from the typed config, merged with an optional user file and validated.

The batch arithmetic lives here once: global batch = micro-batch x gradient accumulation x workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ftune.config import TrainConfig, TrainJobConfig
from ftune.errors import ConfigError
from ftune.mapping import deep_merge

# Keys the typed config owns; a user file may leave them out or set them to "auto".
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_optimization.stage",
    "bf16.enabled",
    "fp16.enabled",
)


def gradient_accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """Micro-batches each worker accumulates per optimizer step to keep the global batch fixed."""
    per_pass = train.micro_batch_size * world_size
    if train.global_batch_size % per_pass:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of "
            f"micro_batch_size x workers = {train.micro_batch_size} x {world_size}"
        )
    accum = train.global_batch_size // per_pass
    assert train.micro_batch_size * accum * world_size == train.global_batch_size
    return accum


def load_user_config(path: str | None) -> dict[str, Any]:
    """Read a user DeepSpeed JSON (relative paths are relative to the working directory)."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"deepspeed.config_file: {path!r} does not exist (e.g. configs/deepspeed/zero2.json)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in data:
            raise ConfigError(
                f"{path}: remove {key!r}: the optimizer and LR schedule come from train.lr, "
                "train.lr_schedule and train.warmup_ratio"
            )
    return data


def build_deepspeed_config(
    cfg: TrainJobConfig, world_size: int, dtype: torch.dtype, user: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The DeepSpeed config for ``world_size`` workers.

    Raises:
        ConfigError: the user file contradicts a value the typed config owns.
    """
    t, d = cfg.train, cfg.deepspeed
    accum = gradient_accumulation_steps(t, world_size)
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "overlap_comm": d.overlap_comm,
        "contiguous_gradients": d.contiguous_gradients,
        "reduce_bucket_size": d.reduce_bucket_size,
        "allgather_bucket_size": d.reduce_bucket_size,
    }
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    generated: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    user = dict(user if user is not None else load_user_config(d.config_file))
    source = d.config_file or "deepspeed config"
    for dotted in OWNED_KEYS:
        theirs, ours = _get(user, dotted), _get(generated, dotted)
        if theirs not in (None, "auto") and theirs != ours:
            raise ConfigError(
                f"{source}: {dotted}={theirs!r} contradicts the typed config ({ours!r} for "
                f"{world_size} worker(s)); set it to \"auto\" or remove it"
            )
    merged = deep_merge(_drop_auto(user), generated)
    assert (
        merged["train_micro_batch_size_per_gpu"] * merged["gradient_accumulation_steps"] * world_size
        == merged["train_batch_size"]
    )
    return merged


def _get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _drop_auto(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in data.items() if v != "auto"}
