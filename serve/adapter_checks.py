"""Does an adapter fit the base model it is served on? Checked at deploy time, and before a replica loads it.

peft loads whatever it is given: weights for modules the base model lacks are dropped with a warning,
targeted modules without weights silently keep their initial (zero) delta, and a file that fails to
read half-way leaves the model with an injected, empty adapter. So every adapter is compared with the
base model first, from its ``adapter_config.json`` and the header of its ``adapter_model.safetensors``
(the tensor names, dtypes and shapes; for s3:// adapters only the header bytes are fetched):

- the config is a LoRA config peft accepts, and its target modules exist in the base model;
- every weight belongs to a targeted module and has that module's shape; every targeted module has
  its weights; the rank stays within ``max_adapter_rank``;
- the file is a whole safetensors file (the header's offsets cover exactly the bytes there are).

A replica also reads the weights themselves and refuses non-finite values. The base model's layout
comes from its config on the meta device at deploy time (no weights loaded), and from the loaded
model on a replica.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "base_model.model."
"""What peft puts before a base module's name in a saved adapter's tensor names."""
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
"""Floating dtypes an adapter's weights may have, with their size in bytes."""
MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the JSON header."""
EXAMPLES = 3
"""Names shown per kind of problem."""


@dataclass(frozen=True)
class BaseModelLayout:
    """What adapters are compared with: the base model's name and the shapes of its modules."""

    name: str
    """name_or_path of the base model (as resolved for loading)."""
    linears: dict[str, tuple[int, int]]
    """Linear-like module -> (in_features, out_features)."""
    embeddings: dict[str, tuple[int, int]]
    """Embedding module -> (num_embeddings, embedding_dim)."""
    parameters: dict[str, tuple[int, ...]]
    """Every parameter's shape, for weights saved whole (modules_to_save)."""

    @classmethod
    def of(cls, model: Any, name: str) -> BaseModelLayout:
        """The layout of a base model (loaded, or built on the meta device), before peft wraps it."""
        import torch
        from transformers.pytorch_utils import Conv1D

        linears, embeddings = {}, {}
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):  # bitsandbytes' 4-bit layers are Linear subclasses
                linears[module_name] = (module.in_features, module.out_features)
            elif isinstance(module, Conv1D):  # GPT-2 style: weight is [in, out]
                linears[module_name] = tuple(module.weight.shape)
            elif isinstance(module, torch.nn.Embedding):
                embeddings[module_name] = (module.num_embeddings, module.embedding_dim)
        parameters = {n: tuple(p.shape) for n, p in model.named_parameters()}
        return cls(name, linears, embeddings, parameters)


def base_model_layout(model_cfg: Any) -> BaseModelLayout:
    """The layout of the base model of a ModelConfig, from its config alone (meta device, no weights).

    Raises:
        UserError: the model's config cannot be read.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftune.errors import UserError
    from ftune.model import resolve_model_path

    path = resolve_model_path(model_cfg, weights=False)
    try:
        config = AutoConfig.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot read the config of model.name_or_path {model_cfg.name_or_path!r} to check the adapters "
            f"against it: {e}"
        ) from e
    return BaseModelLayout.of(model, path)


TensorInfo = tuple[str, tuple[int, ...]]
"""A tensor's (dtype, shape) from a safetensors header."""


def read_safetensors_header(read: Callable[[int, int], bytes], size: int) -> dict[str, TensorInfo]:
    """Tensor name -> (dtype, shape) from a safetensors file of ``size`` bytes, reading only its header.

    Args:
        read: ``read(offset, length)`` -> the file's bytes there (a local file or an S3 range request).
        size: The file's size in bytes.

    Raises:
        ValueError: the file is not a whole safetensors file (truncated, padded or not one at all).
    """
    if size < 8:
        raise ValueError(f"it is {size} bytes long, too short for a safetensors file")
    (length,) = struct.unpack("<Q", read(0, 8))
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"its header claims {length} bytes but the file has {size} (truncated?)")
    try:
        header = json.loads(read(8, length))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"its header is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object; the file is damaged")
    header.pop("__metadata__", None)
    tensors, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            numel = math.prod(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"its header entry for {name!r} is malformed ({e!r})") from e
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"tensor {name!r} has dtype {dtype!r}; adapter weights must be floating point")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or end - begin != numel * DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor {name!r}: shape {list(shape)} does not match its {end - begin} bytes")
        tensors[name] = (dtype, shape)
        spans.append((begin, end))
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ValueError("its tensors overlap or leave gaps; the file is damaged")
        covered = end
    if 8 + length + covered != size:
        described = 8 + length + covered
        raise ValueError(f"its header describes {described} bytes but the file has {size} (truncated?)")
    return tensors


def local_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """``read_safetensors_header`` of a local file."""
    with open(path, "rb") as f:

        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return read_safetensors_header(read, path.stat().st_size)


def adapter_problems(
    config: dict[str, Any], tensors: dict[str, TensorInfo], base: BaseModelLayout, max_rank: int
) -> list[str]:
    """Why an adapter (its config and its weights' header) does not fit ``base`` (empty if it fits)."""
    import warnings

    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # keys of newer peft versions are dropped with a warning
            lora = PeftConfig.from_peft_type(**config)
    except Exception as e:  # noqa: BLE001 -- peft raises TypeError, ValueError or KeyError for bad configs
        return [f"adapter_config.json is not a LoRA config peft accepts: {e}"]
    modules = {**base.linears, **base.embeddings}
    targeted = {m for m in modules if check_target_module_exists(lora, m)}
    if not targeted:
        return [f"its target_modules {_names(lora.target_modules)} match no layer of {base.name!r}"]
    weights, problems = _weights_by_module(tensors, base)
    missing = sorted(targeted - set(weights))
    extra = sorted(set(weights) - targeted)
    if missing:
        problems.append(f"has no weights for {len(missing)} targeted layers ({_names(missing)})")
    if extra:
        problems.append(f"has weights for {len(extra)} layers its config does not target ({_names(extra)})")
    misfits, ranks = [], {}
    for module in sorted(targeted & set(weights)):
        fan_in, fan_out = modules[module]
        rank, misfit = _lora_rank(weights[module], fan_in, fan_out)
        configured = lora.rank_pattern.get(get_pattern_key(lora.rank_pattern.keys(), module), lora.r)
        if misfit is None and rank != configured:
            misfit = f"rank {rank} but its config says r={configured}"
        if misfit:
            misfits.append(f"{module}: {misfit}")
        else:
            ranks[module] = rank
    if misfits:
        problems.append(
            f"has weights that do not fit {len(misfits)} layers (made for another model?): {_names(misfits)}"
        )
    if ranks and max(ranks.values()) > max_rank:
        problems.append(
            f"has rank {max(ranks.values())}, above max_adapter_rank ({max_rank}); raise max_adapter_rank "
            "or serve a lower-rank adapter"
        )
    return problems


def _weights_by_module(
    tensors: dict[str, TensorInfo], base: BaseModelLayout
) -> tuple[dict[str, dict[str, tuple[int, ...]]], list[str]]:
    """LoRA weights grouped by base module ({module: {"A": shape, "B": shape, ...}}), and stray names."""
    weights: dict[str, dict[str, tuple[int, ...]]] = {}
    unknown, wrong = [], []
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
                ".lora_embedding_A": "A", ".lora_embedding_B": "B"}  # fmt: skip
    for name, (_, shape) in tensors.items():
        key = name.removeprefix(PREFIX)
        part = next((s for s in suffixes if key.endswith(s)), None)
        if part is not None:
            weights.setdefault(key.removesuffix(part), {})[suffixes[part]] = shape
        elif key not in base.parameters:  # modules_to_save are saved whole under their own names
            unknown.append(key)
        elif base.parameters[key] != shape:
            wrong.append(f"{key} {list(shape)} vs {list(base.parameters[key])}")
    problems = []
    if unknown:
        problems.append(f"has {len(unknown)} weights for no parameter of the base model ({_names(unknown)})")
    if wrong:
        problems.append(f"has {len(wrong)} whole weights of the wrong shape ({_names(wrong)})")
    return weights, problems


def _lora_rank(parts: dict[str, tuple[int, ...]], fan_in: int, fan_out: int) -> tuple[int, str | None]:
    """(rank, None) when a layer's LoRA weights fit a layer of fan_in -> fan_out, else (0, why not)."""
    a, b = parts.get("A"), parts.get("B")
    if a is None or b is None:
        return 0, f"lora_{'A' if a is None else 'B'} is missing"
    if len(a) != 2 or len(b) != 2 or a[1] != fan_in or b != (fan_out, a[0]):
        return 0, f"lora_A {list(a)} and lora_B {list(b)} for a layer of {fan_in} -> {fan_out}"
    if "bias" in parts and parts["bias"] != (fan_out,):
        return 0, f"lora_B bias {list(parts['bias'])} for {fan_out} outputs"
    return a[0], None


def weights_problems(path: Path) -> list[str]:
    """Why the weights in a local adapter_model.safetensors cannot be used (unreadable or not finite)."""
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own SafetensorError, or OSError
        return [f"{path.name} cannot be read: {e}"]
    broken = [name.removeprefix(PREFIX) for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    return [f"has NaN or infinite values in {len(broken)} weights ({_names(broken)})"] if broken else []


def other_base_model(config: dict[str, Any], base: BaseModelLayout) -> str | None:
    """A warning when the adapter names a base model that looks like another one (else None).

    Not a problem by itself: a local copy of the same model has another path. The layer shapes decide.
    """
    named = config.get("base_model_name_or_path")
    if not named or Path(named).expanduser().name.lower() == Path(base.name).expanduser().name.lower():
        return None
    return f"was trained on {named!r} but is served on {base.name!r} (their layers match)"


def _names(names) -> str:
    names = sorted(names) if not isinstance(names, str) else [names]
    more = f" and {len(names) - EXAMPLES} more" if len(names) > EXAMPLES else ""
    return ", ".join(str(n) for n in names[:EXAMPLES]) + more
