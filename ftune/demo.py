"""`ftune demo`: the whole product on a laptop, on the embedded defaults.

Local Ray started in-process, the built-in tiny Llama and sample data, local storage, wandb
offline. Stages print their progress; the end prints a summary.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments of the demo."""
    parser = argparse.ArgumentParser(prog="ftune demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("~/ftune_demo"), help="where runs are written")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the tiny config's)")
    parser.add_argument("--workers", type=int, default=2, help="training workers")
    return parser.parse_args(argv)


def _stage(index: int, total: int, text: str) -> float:
    print(f"\n=== [{index}/{total}] {text}", flush=True)
    return time.perf_counter()


def main(argv: list[str]) -> int:
    """Build the tiny model, train an adapter on the sample data, report."""
    from ftune.builtin import ensure_sample_dataset, ensure_tiny_model
    from ftune.config import TrainJobConfig
    from ftune.yaml_config import load_config
    from train.job import print_summary, run_training

    args = parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    workdir = args.workdir.expanduser().resolve()
    stages = 2
    started = time.perf_counter()

    t0 = _stage(1, stages, "built-in tiny Llama model and sample instruction data")
    model_dir, data_path = ensure_tiny_model(), ensure_sample_dataset()
    print(f"model: {model_dir}\ndata:  {data_path}  ({time.perf_counter() - t0:.1f} s)")

    _stage(2, stages, f"LoRA training on Ray Train + DeepSpeed ZeRO-2 ({args.workers} workers)")
    overrides = [f"storage.path={workdir / 'runs'}", f"scaling.num_workers={args.workers}", "tracking.wandb=offline"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    cfg = load_config(TrainJobConfig, REPO_CONFIGS / "train" / "tiny.yaml", overrides)
    summary = run_training(cfg, name=f"demo-train-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    print_summary(summary)

    print("\n=== ftune demo summary")
    print(f"eval loss before -> after: {summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}")
    if summary.get("exact_match_after") is not None:
        print(f"exact match after training: {summary['exact_match_after']:.1%}")
    print(f"adapter: {summary['adapter_path']}")
    print(f"total time: {time.perf_counter() - started:.0f} s")
    return 0
