"""GPU training throughput: tokens/s, peak memory and MFU of LoRA and QLoRA on Llama-size models.

Models are built from the configs of real checkpoints (Llama-3.2-1B, Llama-3-8B shapes) with random
weights, saved in HF format and loaded back through ``ftune.model`` / ``ftune.adapters`` inside the same
DeepSpeed ZeRO-2 engine the training job uses (``train.loop.build_engine``), on one GPU (a single-rank
process group). bf16, sdpa attention, full 2048-token sequences, one optimizer step per micro-batch.

    python bench/train_gpu.py                                 # 1b and 8b, LoRA and QLoRA
    python bench/train_gpu.py --model 1b --method lora --micro-batch 8 --gradient-checkpointing
    python bench/train_gpu.py --model tiny --device cpu --seq-len 64 --no-record   # the bench itself, on CPU

MFU is given two ways, N = the base model's matmul parameters, against the GPU's dense bf16 peak
(``--peak-tflops``, else the table below): the usual 6·N FLOPs per token (what a full fine-tune
would do: forward 2N, backward 4N), and 4·N (forward 2N + backward through the activations 2N; frozen
weights get no weight gradient), the work LoRA really does. Both leave out attention's sequence-length
term and the adapters' own FLOPs, and do not credit gradient checkpointing's recomputation. Goal:
>= 45 % MFU (4·N) at >= 1B parameters. Without CUDA it says so and exits 0, unless ``--device cpu``
(a check that the bench runs; its MFU means nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import RESULTS, goal, machine_line, markdown_table, record_section  # noqa: E402

MFU_GOAL = 0.45
MFU_GOAL_MIN_PARAMS = 1e9

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s; the first name found in the device name wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


@dataclass(frozen=True)
class ModelShape:
    """LlamaConfig arguments of a public checkpoint, and the micro-batch that fits an 80 GB GPU."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    micro_batch: int


MODELS = {
    "1b": ModelShape(2048, 8192, 16, 32, 8, 128256, True, micro_batch=4),  # meta-llama/Llama-3.2-1B
    "8b": ModelShape(4096, 14336, 32, 32, 8, 128256, False, micro_batch=2),  # meta-llama/Meta-Llama-3-8B
    "100m": ModelShape(768, 2048, 12, 12, 4, 32000, False, micro_batch=8),  # smoke-test size
    "tiny": ModelShape(64, 176, 2, 4, 2, 512, False, micro_batch=2),  # the bench's own test, on CPU
}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name, or None when it is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def build_llama(name: str, cache: Path, device: str = "cuda") -> Path:
    """A random-weight Llama of this shape, saved as bf16 safetensors under ``cache`` (built once).

    Initialised on ``device``: a 1B model's random init takes a minute on a CPU, a second on a GPU.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = MODELS[name]
    path = cache / f"llama-{name}-random"
    if (path / "config.json").exists():
        return path
    config = LlamaConfig(
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    tmp = path.with_name(path.name + ".partial")
    rng_devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.device(device), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(path)
    return path


def init_single_rank(device: str = "cuda") -> None:
    """A one-process NCCL (gloo on CPU) group, which DeepSpeed's engine needs (as Ray Train sets up)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    if device != "cuda":
        dist.init_process_group("gloo", rank=0, world_size=1)
        return
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))


def job_config(
    model_dir: Path,
    method: str,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool,
    steps: int,
    device: str = "cuda",
):
    """The TrainJobConfig of one measurement: bf16, sdpa, LoRA r=16 on all linear layers, ZeRO-2, one GPU
    (fp32 on one CPU process with ``device="cpu"``)."""
    from ftune.config import TrainJobConfig

    return TrainJobConfig.model_validate(
        {
            "model": {
                "name_or_path": str(model_dir),
                "load_in_4bit": method == "qlora",
                "attn_implementation": "sdpa",
            },
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "data": {"max_seq_len": seq_len},
            "train": {
                "micro_batch_size": micro_batch,
                "global_batch_size": micro_batch,
                "max_steps": steps,
                "precision": "bf16" if device == "cuda" else "fp32",
                "gradient_checkpointing": gradient_checkpointing,
                "warmup_ratio": 0.0,
            },
            "scaling": {"num_workers": 1, "use_gpu": device == "cuda"},
            "tracking": {"wandb": "disabled"},
        }
    )


def matmul_parameters(config) -> int:
    """N for MFU: the weights every token is multiplied by (attention, MLP, LM head), from a LlamaConfig.

    The input embedding is a lookup, not a matmul; a tied embedding counts once, as the LM head.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    return layers * per_layer + config.vocab_size * h


def measure(cfg, *, warmup: int, steps: int) -> dict[str, Any]:
    """Build the engine, run warm-up + timed optimizer steps on random tokens; tokens/s and peak memory."""
    import torch

    from train.loop import build_engine

    cuda = cfg.scaling.use_gpu
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    engine, _ = build_engine(cfg, 1, warmup + steps, user_deepspeed={})
    engine.train()
    config = engine.module.get_base_model().config
    mb, seq = cfg.train.micro_batch_size, cfg.data.max_seq_len
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (warmup + steps, mb, seq), device=device, generator=generator)
    mask = torch.ones(mb, seq, dtype=torch.long, device=device)
    times, losses = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids[i], attention_mask=mask, labels=ids[i]).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))  # syncs, like the training loop's loss bookkeeping
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "CPU",
        "params": matmul_parameters(config),
        "step_s": step_s,
        "tokens_per_s": mb * seq / step_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One (model, method) in this process: a fresh CUDA context, so peak memory is this run's alone."""
    from ftune.builtin_assets import ftune_home

    name, method = args.model[0], args.method[0]
    init_single_rank(args.device)
    model_dir = build_llama(name, args.cache or ftune_home() / "bench-models", args.device)
    micro_batch = args.micro_batch or MODELS[name].micro_batch
    steps = args.warmup + args.steps
    cfg = job_config(
        model_dir, method, micro_batch, args.seq_len, args.gradient_checkpointing, steps, args.device
    )
    return {"micro_batch": micro_batch, **measure(cfg, warmup=args.warmup, steps=args.steps)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", choices=sorted(MODELS), help="repeatable; default 1b and 8b"
    )
    parser.add_argument(
        "--method", action="append", choices=["lora", "qlora"], help="repeatable; default both"
    )
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: per model, see MODELS)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument(
        "--peak-tflops", type=float, help="dense bf16 peak of this GPU when its name is not known"
    )
    parser.add_argument(
        "--cache", type=Path, help="random-weight models are saved here (default $FTUNE_HOME/bench-models)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--out", type=Path, help="also write the report (markdown) to this file")
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: run the bench on one CPU process (fp32) to check it works; its MFU means nothing",
    )
    parser.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child_args(args: argparse.Namespace, name: str, method: str, result: Path) -> list[str]:
    """The command line that measures one (model, method) in a child process."""
    cmd = [sys.executable, __file__, "--model", name, "--method", method, "--seq-len", str(args.seq_len)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--child-result", str(result)]
    cmd += ["--device", args.device]
    if args.micro_batch:
        cmd += ["--micro-batch", str(args.micro_batch)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.cache:
        cmd += ["--cache", str(args.cache)]
    return cmd


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "CUDA is not available: bench/train_gpu.py measures GPU training throughput; "
            "skipped (nothing measured)."
        )
        return 0
    if args.child_result:
        args.child_result.write_text(json.dumps(run_one(args)))
        return 0
    machine = machine_line()
    setting = (
        f"`python bench/train_gpu.py {' '.join(argv)}`: seq len {args.seq_len}, "
        + ("bf16, " if args.device == "cuda" else "ON CPU (fp32, not bf16: MFU is meaningless), ")
        + "sdpa, LoRA r=16 all-linear, "
        + f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        + f"ZeRO-2 on 1 {'GPU' if args.device == 'cuda' else 'CPU process'}, "
        + f"{args.warmup} warm-up + {args.steps} timed steps (median), one process per configuration. "
        + "MFU (6N) = tokens/s x 6N / peak, the usual convention; MFU (4N) counts only the work LoRA does "
        + "(no weight gradients for the frozen base); N = the base model's matmul parameters (attention, "
        + "MLP, LM head; the embedding lookup left out); peak: "
        + (f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)." if args.peak_tflops else "the GPU's bf16 spec.")
    )
    print(f"machine: {machine}\n{setting}", flush=True)
    rows, goals, failed, devices = [], [], False, set()
    with tempfile.TemporaryDirectory(prefix="ftune-gpu-bench-") as tmp:
        for name in args.model or ["1b", "8b"]:
            for method in args.method or ["lora", "qlora"]:
                result, log = Path(tmp, f"{name}-{method}.json"), Path(tmp, f"{name}-{method}.log")
                with log.open("w") as out:
                    proc = subprocess.run(
                        child_args(args, name, method, result),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        check=False,
                    )
                if proc.returncode or not result.exists():
                    tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
                    print(f"{name} {method}: failed (exit {proc.returncode}):\n{tail}", flush=True)
                    rows.append([name, method, "-", "-", "-", "-", "-", "-", "failed"])
                    failed = True
                    continue
                r = json.loads(result.read_text())
                devices.add(r["device"])
                peak = args.peak_tflops or peak_tflops(r["device"])
                mfu = r["tokens_per_s"] * 4 * r["params"] / (peak * 1e12) if peak else None
                mfu6 = r["tokens_per_s"] * 6 * r["params"] / (peak * 1e12) if peak else None
                rows.append(
                    [
                        name,
                        method,
                        r["micro_batch"],
                        f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e7 else f"{r['params'] / 1e6:.2f}M",
                        f"{r['tokens_per_s']:,.0f}",
                        f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] == r["peak_mem_gib"] else "-",
                        f"{mfu6:.1%}" if mfu6 is not None else "n/a (pass --peak-tflops)",
                        f"{mfu:.1%}" if mfu is not None else "n/a (pass --peak-tflops)",
                        f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}",
                    ]
                )
                print(
                    f"{name} {method} on {r['device']} (bf16 peak {peak or '?'} TFLOP/s): "
                    f"{r['tokens_per_s']:,.0f} tok/s, "
                    f"{r['peak_mem_gib']:.1f} GiB"
                    + (f", MFU {mfu6:.1%} (6N), {mfu:.1%} (4N)" if mfu is not None else ""),
                    flush=True,
                )
                if mfu is not None and r["params"] >= MFU_GOAL_MIN_PARAMS and args.device == "cuda":
                    goals.append(
                        goal(
                            f"{name} {method} MFU",
                            f"{mfu:.1%}",
                            f">= {MFU_GOAL:.0%} at >= 1B",
                            mfu >= MFU_GOAL,
                        )
                    )
    headers = [
        "model",
        "method",
        "micro-batch",
        "N (matmul params)",
        "tokens/s",
        "peak mem GiB",
        "MFU (6N)",
        "MFU (4N)",
        "loss",
    ]
    text = "\n".join(
        [
            f"{machine}; GPU: {', '.join(sorted(devices)) or '-'}",
            "",
            setting,
            "",
            markdown_table(headers, rows),
        ]
        + (["", "```", *goals, "```"] if goals else [])
    )
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    if not args.no_record:
        record_section("bench/train_gpu.py", f"## train on GPU (tokens/s, memory, MFU)\n\n{text}")
        print(f"\nrecorded in {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
