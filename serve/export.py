"""``ftune export``: merge a LoRA adapter into its base model, for engines that cannot load adapters.

    ftune export --adapter ~/ftune_runs/tiny/adapter --merge ~/models/tiny-merged
    ftune export --adapter runs/x/adapter --merge out/ --base meta-llama/Llama-3.2-1B --precision bf16

The output is an ordinary Hugging Face model directory (safetensors weights, config, tokenizer) whose
logits equal those of the adapter applied to the base model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from ftune.config import ModelConfig
from ftune.errors import UserError
from serve.registry import CONFIG_FILE, read_local_adapter

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_parser() -> argparse.ArgumentParser:
    """The ``ftune export`` argument parser."""
    parser = argparse.ArgumentParser(prog="ftune export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    parser.add_argument(
        "--merge", required=True, metavar="OUT", help="directory to write the merged model to"
    )
    parser.add_argument("--base", help="base model; default: base_model_name_or_path of adapter_config.json")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the merged weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    base: str | None = None,
    precision: str = "fp32",
    overwrite: bool = False,
) -> Path:
    """Merge the adapter into its base model and save the result (written to a temp dir, then renamed).

    Args:
        adapter_dir: PEFT adapter directory.
        out_dir: Output model directory.
        base: Base model; default is the adapter's base_model_name_or_path.
        precision: Weights dtype of the merged model (the merge itself runs in this dtype too).
        overwrite: Replace an existing non-empty ``out_dir``.

    Raises:
        UserError: the adapter is missing or incomplete, its base is unknown, or ``out_dir`` exists.
    """
    import torch

    from ftune.adapters import load_adapter
    from ftune.model import load_base_model, load_tokenizer

    adapter_dir, out_dir = Path(adapter_dir).expanduser(), Path(out_dir).expanduser()
    problems, adapter_config = read_local_adapter(adapter_dir)
    if problems or adapter_config is None:
        raise UserError(f"--adapter: {'; '.join(problems)}")
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir / CONFIG_FILE} names no base_model_name_or_path; pass --base")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--merge {out_dir} exists and is not empty; pass --overwrite to replace it")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model_cfg = ModelConfig(name_or_path=base)
    tokenizer_source = adapter_dir if all((adapter_dir / f).is_file() for f in TOKENIZER_FILES) else None
    tokenizer = load_tokenizer(
        model_cfg if tokenizer_source is None else ModelConfig(name_or_path=str(tokenizer_source))
    )
    merged = load_adapter(
        load_base_model(model_cfg, dtype=dtype, for_training=False), adapter_dir
    ).merge_and_unload()
    merged.config.use_cache = True

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {"adapter": str(adapter_dir.resolve()), "base": base, "precision": precision}
        (tmp / "ftune_export.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str]) -> int:
    """Entry point of ``ftune export``."""
    args = build_parser().parse_args(argv)
    out = merge_adapter(
        args.adapter, args.merge, base=args.base, precision=args.precision, overwrite=args.overwrite
    )
    print(f"merged model written to {out}")
    return 0
