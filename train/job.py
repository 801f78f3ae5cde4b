"""Training job driver: `python -m train --config FILE [section.key=value ...]` / `ftune train`.

Validates the config, the DeepSpeed settings and the data in the driver, before Ray starts a
single worker; then runs a Ray Train V2 TorchTrainer whose workers execute
``train.loop.train_loop_per_worker`` and prints the run's summary.

    ray job submit --working-dir . -- python -m train --config configs/train/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ftune.config import TrainJobConfig
from ftune.entrypoint import prog
from ftune.errors import DataError, JobFailed, UserError
from ftune.yaml_config import load_config
from train.batching import BatchPlan
from train.deepspeed_config import build_deepspeed_config, load_user_config
from train.phases import PhaseTimer
from train.spec import RunData, RunSpec


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments of the training job."""
    parser = argparse.ArgumentParser(
        prog=prog("python -m train"), description="Distributed LoRA/QLoRA/DoRA training on Ray Train + DeepSpeed."
    )
    parser.add_argument("--config", type=Path, help="YAML job config (e.g. configs/train/tiny.yaml)")
    parser.add_argument("--name", help="run name (same as name=...); re-running a name resumes it")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def default_run_name(config_path: Path | None) -> str:
    """``<config stem>-<UTC timestamp>``: a fresh run unless a name is given."""
    stem = config_path.stem if config_path else "train"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def ray_scaling_config(cfg: TrainJobConfig):
    """Ray Train's ScalingConfig from the scaling section."""
    from ray.train import ScalingConfig

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return ScalingConfig(
        num_workers=s.num_workers if isinstance(s.num_workers, int) else tuple(s.num_workers),
        use_gpu=s.use_gpu,
        resources_per_worker=resources,
        placement_strategy=s.placement_strategy,
        accelerator_type=s.accelerator_type,
        elastic_resize_monitor_interval_s=s.elastic_resize_interval_s,
    )


def check_model_reachable(cfg: TrainJobConfig) -> None:
    """Load the model's config (cheap) so a wrong path fails here, not in every worker."""
    from transformers import AutoConfig

    from ftune.model import resolve_model_path

    path = resolve_model_path(cfg.model, weights=False)
    try:
        AutoConfig.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.name_or_path={cfg.model.name_or_path!r}: cannot load its config ({e}). "
            "Use a local directory saved with save_pretrained, or a hub id this machine can reach."
        ) from e


def prepare_run_data(cfg: TrainJobConfig) -> RunData:
    """Tokenize the job's data (its paths already concrete) and check it makes at least one global batch.

    Raises:
        DataError: the data is unreadable, or too small for one global batch.
    """
    from ftune.data import prepare_data
    from ftune.model import load_tokenizer

    data = prepare_data(cfg.data, load_tokenizer(cfg.model))
    print(f"[ftune] {data.summary()}", flush=True)
    plan = BatchPlan(len(data.train), cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.seed)
    if plan.steps_per_epoch < 1:
        raise DataError(
            f"{cfg.data.path}: {len(data.train)} training examples make no full global batch of "
            f"{cfg.train.global_batch_size}; lower train.global_batch_size or add data"
        )
    return RunData(train=data.train, validation=data.validation)


def prepare(cfg: TrainJobConfig, name: str) -> tuple[RunSpec, RunData]:
    """Everything checked before Ray starts: DeepSpeed config, model, data. Returns the run's spec and data."""
    from ftune.builtin_assets import resolve_builtin
    from ftune.model import is_s3_model, resolve_model_path

    # Workers get concrete paths: builtin models and data are built here, once, never by a worker. An
    # s3:// model stays a URI: each node fetches it into its own cache.
    cfg = cfg.model_copy(deep=True)
    if not is_s3_model(cfg.model.name_or_path):
        cfg.model.name_or_path = resolve_model_path(cfg.model)
    cfg.data.path = resolve_builtin(cfg.data.path)
    if cfg.data.validation_path:
        cfg.data.validation_path = resolve_builtin(cfg.data.validation_path)
    user_ds = load_user_config(cfg.deepspeed.config_file)
    for world in sorted({cfg.scaling.min_workers, cfg.scaling.max_workers}):
        build_deepspeed_config(cfg, world, torch.float32, user=user_ds)
    check_model_reachable(cfg)
    data = prepare_run_data(cfg)
    return RunSpec.of(cfg, name, deepspeed_user=user_ds, train_examples=len(data.train)), data


def check_resumable(spec: RunSpec) -> None:
    """Refuse, before any worker starts, to continue a run whose checkpoints were made with another config.

    A run re-started under its name resumes from its checkpoints. If its model/lora/data/train config
    changed they cannot be continued: that is for the user to fix, not for Ray to retry
    ``failure.max_failures`` times in the workers.

    Raises:
        UserError: the run's newest readable checkpoint has another config fingerprint.
    """
    from train.checkpoint import newest_readable_meta

    storage = spec.storage()
    fs, _ = storage.filesystem()
    found = newest_readable_meta(fs, storage.path(spec.name))
    if found is None:
        return
    name, meta = found
    saved, now = meta.state.config_fingerprint, spec.fingerprint
    if saved and saved != now:
        raise UserError(
            f"run {spec.name!r} ({storage.uri_of(spec.name)}) was checkpointed with a different "
            f"model/lora/data/train config ({name}: {saved}; this job: {now}). Give the job a new name (name=... or "
            "--name) to start fresh, or run it with the config it was started with to continue it."
        )


def build_trainer(
    cfg: TrainJobConfig,
    spec: RunSpec,
    data: RunData,
    callbacks: list | None = None,
    *,
    init_checkpoint: str | None = None,
    adopt: bool = False,
    stop_signal=None,
    phase_timer: PhaseTimer | None = None,
):
    """The TorchTrainer for a prepared job (the dataset goes to workers through the object store).

    Args:
        init_checkpoint: Checkpoint path (inside the storage filesystem) to start from when the run
            has none of its own yet.
        adopt: The init checkpoint comes from a run with other hyperparameters (PBT exploit): take
            its weights and optimizer state but this config's learning rate.
        stop_signal: A ``train.stop.StopSignal``: once it is raised the run checkpoints at the step
            it reached, writes its adapter and summary, and finishes (see train/stop.py).
        phase_timer: Told each phase of the workers' run (benchmarks; see train/phases.py).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig

    from train.loop import train_loop_per_worker
    from train.progress import ProgressPrinter
    from train.trainer import LoraTrainer

    check_resumable(spec)
    spec = spec.replace(data=ray.put(data), init_checkpoint=init_checkpoint, adopt=adopt, stop_signal=stop_signal,
                        phase_timer=phase_timer)
    fs, root = spec.storage().filesystem()
    run_config = RunConfig(
        name=spec.name,
        storage_path=root,
        storage_filesystem=fs,
        failure_config=FailureConfig(
            max_failures=cfg.failure.max_failures, max_preemption_failures=cfg.failure.max_preemption_failures
        ),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute="eval_loss", checkpoint_score_order="min"
        ),
        callbacks=[ProgressPrinter(spec.name), *(callbacks or [])],
    )
    return LoraTrainer(
        train_loop_per_worker,
        train_loop_config=spec,
        scaling_config=ray_scaling_config(cfg),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        job=cfg,
    )


def ensure_ray() -> None:
    """Connect to the cluster (RAY_ADDRESS, as under `ray job submit`) or start a local one."""
    import ray

    from ftune.console import announce_ray_logs, ray_logging_level, show_only_ftune_lines
    from ftune.deepspeed_ops import ensure_built

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):  # a local Ray: its workers use this machine's op cache
            ensure_built(announce=lambda line: print(f"[ftune] {line}", flush=True))
        ray.init(log_to_driver=True, logging_level=ray_logging_level())
        announce_ray_logs(show_only_ftune_lines())


def prepare_while_ray_starts(cfg: TrainJobConfig, name: str) -> tuple[RunSpec, RunData]:
    """``prepare`` in a thread while this process starts or joins Ray: its result, once Ray is up.

    Starting a local Ray (GCS, raylet, dashboard) is mostly waiting on other processes, and the
    driver's preparation (imports, tokenizing the data) is mostly this process's own work, so doing
    them together takes about the longer of the two instead of their sum. A config or data error
    is still raised before any worker starts; Ray may have started by then (it stops when the
    process exits).
    """
    import ray

    if ray.is_initialized():
        return prepare(cfg, name)
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        prepared = pool.submit(prepare, cfg, name)
        try:
            ensure_ray()
        except BaseException:
            prepared.cancel()
            raise
        return prepared.result()


def run_training(
    cfg: TrainJobConfig, *, name: str | None = None, callbacks: list | None = None, stop_signal=None,
    phase_timer: PhaseTimer | None = None,
) -> dict[str, Any]:
    """Run a training job to completion (or until ``stop_signal``, a ``train.stop.StopSignal``, is raised:
    then it checkpoints and ends at the step it reached) and return its summary.

    ``phase_timer`` is told each phase of the workers' run (benchmarks; see train/phases.py).

    Raises:
        UserError: the config, model or data are wrong (found before Ray starts).
        JobFailed: the workers failed beyond the retry budget.
    """
    import ray.train

    name = name or cfg.name or default_run_name(None)
    spec, data = prepare_while_ray_starts(cfg, name)
    trainer = build_trainer(cfg, spec, data, callbacks, stop_signal=stop_signal, phase_timer=phase_timer)
    started = time.perf_counter()
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise JobFailed(f"training run {name!r} failed: {_root_cause(e)}") from e
    storage = spec.storage()
    summary = json.loads(storage.read_text(name, "summary.json"))
    summary["run_dir"] = storage.uri_of(name)
    summary["job_wall_time_s"] = time.perf_counter() - started  # workers' start-up and restarts included
    return summary


def _root_cause(error: BaseException) -> str:
    """The innermost 'SomeError: message' of a (worker) failure, with the lines that follow it."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^\s*[\w.]+(Error|Exception|Failed)\b[^:]*: ", line)]
    return "\n".join(lines[starts[-1] :]).strip() if starts else (lines[-1] if lines else type(error).__name__)


def print_summary(summary: dict[str, Any]) -> None:
    """Human-readable end-of-run report."""
    em = summary.get("exact_match_after")
    print(
        f"[ftune] run {summary['name']} finished in {summary.get('job_wall_time_s', summary['wall_time_s']):.1f} s "
        f"(training loop {summary['wall_time_s']:.1f} s): {summary['steps']} steps, "
        f"{summary['tokens']:,} tokens ({summary['tokens_per_s']:,.0f} tok/s), eval loss "
        f"{summary['eval_loss_before']:.4f} -> {summary['eval_loss_after']:.4f}"
        + (f", exact match {em:.1%}" if em is not None else "")
    )
    print(f"[ftune] run dir: {summary['run_dir']}")
    print(f"[ftune] adapter: {summary['adapter_path']}")


def main(argv: list[str]) -> int:
    """Entry point of `python -m train` and `ftune train`."""
    args = parse_args(argv)
    cfg = load_config(TrainJobConfig, args.config, args.overrides)
    name = args.name or cfg.name or default_run_name(args.config)
    print_summary(run_training(cfg, name=name))
    return 0
