"""Load the base model and tokenizer through transformers' from_pretrained, with optional 4-bit QLoRA."""

from __future__ import annotations

import logging

import torch

from ftune.config import ModelConfig, Precision
from ftune.errors import UserError

log = logging.getLogger(__name__)


def is_s3_model(name_or_path: str) -> bool:
    """Whether the model is kept in S3 (each node fetches it into its own cache: ``ftune.model_cache``)."""
    return name_or_path.startswith("s3://")


def resolve_model_path(cfg: ModelConfig, *, weights: bool = True) -> str:
    """The path or hub id from_pretrained gets.

    ``builtin:`` names are built locally if missing; ``s3://`` models are fetched into the node's
    model cache (once per node) and their local copy returned.

    Args:
        cfg: Model section of the config.
        weights: False when only the config and tokenizer are needed: an s3:// model then fetches
            only its small files, unless the whole model is cached already.
    """
    from ftune.builtin_assets import resolve_builtin

    if is_s3_model(cfg.name_or_path):
        from ftune.model_cache import fetch_model

        return str(fetch_model(cfg.name_or_path, endpoint_url=cfg.endpoint_url, weights=weights))
    try:
        return resolve_builtin(cfg.name_or_path)
    except ValueError as e:
        raise UserError(f"model.name_or_path: {e}") from e


def resolve_precision(precision: Precision, use_gpu: bool) -> torch.dtype:
    """The training dtype: bf16 on GPUs that support it, fp32 on CPU, unless set explicitly."""
    if precision == "auto":
        if use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_tokenizer(cfg: ModelConfig, *, padding_side: str = "right"):
    """Load the tokenizer with AutoTokenizer; a missing pad token falls back to eos."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg, weights=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(_load_hint(cfg.name_or_path, path, e)) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_base_model(cfg: ModelConfig, *, dtype: torch.dtype, for_training: bool = True):
    """Load the frozen base model; with ``load_in_4bit`` its linear weights are NF4 (QLoRA).

    Args:
        cfg: Model section of the config.
        dtype: Compute dtype (and storage dtype of non-quantized weights).
        for_training: Disable the KV cache, which training does not use.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model_path(cfg)
    quantization = None
    if cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.bnb_4bit_double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=dtype,
            quantization_config=quantization,
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights
            device_map={"": torch.cuda.current_device()} if quantization and torch.cuda.is_available() else None,
        )
    except (OSError, ValueError) as e:
        raise UserError(_load_hint(cfg.name_or_path, path, e)) from e
    if is_s3_model(cfg.name_or_path):  # adapters record where the base model is, not a node's cache path
        model.config.name_or_path = model.name_or_path = cfg.name_or_path
    if for_training:
        model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _load_hint(name: str, path: str, error: Exception) -> str:
    return (
        f"could not load model {name!r} (from {path!r}): {error}\n"
        "Check model.name_or_path: it must be a local directory saved with save_pretrained, an s3:// prefix "
        "holding one, or a hub id "
        "this machine can reach (set HF_HUB_OFFLINE=1 and use a local copy where there is no network)."
    )
