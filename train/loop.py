"""The per-worker training loop run by Ray Train: a DeepSpeed ZeRO engine over a peft model.

Every rank runs the same sequence of collectives (steps, evaluations, reports, checkpoints),
decided from the step number, Ray's agreed preemption notice and rank 0's clock and stop flag
(shared in each step's all-reduce) alone, so no rank ever waits on a barrier the others skip.

A run given a stop signal (loop config ``stop_signal``, a ``train.stop.StopSignal``) ends early
when it is raised: after the step in flight it evaluates, reports a checkpoint, writes its adapter
and summary (``stop_reason``) and returns like a finished run.
"""

from __future__ import annotations

import logging
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray.train
import torch
import torch.distributed as dist

from ftune.adapters import add_adapter, save_adapter, trainable_parameters
from ftune.config import TrainJobConfig
from ftune.data.collate import Collator
from ftune.data.tokenize import pad_token_id
from ftune.model import load_base_model, load_tokenizer, resolve_precision
from ftune.storage import Storage
from train.batching import BatchPlan
from train.checkpoint import CorruptCheckpoint, TrainState, checkpoint_step, load_checkpoint, save_checkpoint
from train.deepspeed_config import build_deepspeed_config, gradient_accumulation_steps
from train.evaluation import evaluate_loss, exact_match, shard
from train.metrics import RunRecorder
from train.schedule import lr_multiplier, warmup_steps
from train.stop import StopPoller

log = logging.getLogger("ftune.train")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def frozen_weights_sha256(model: torch.nn.Module) -> str:
    """Checksum of the frozen (base) weights under their original names: proves training left them intact."""
    import hashlib

    digest = hashlib.sha256()
    frozen = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            frozen[name.replace("base_model.model.", "", 1).replace(".base_layer", "")] = param
    for name in sorted(frozen):
        digest.update(name.encode())
        digest.update(frozen[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def total_steps(cfg: TrainJobConfig, plan: BatchPlan) -> int:
    """Optimizer steps of the whole run."""
    return cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch


def build_engine(cfg: TrainJobConfig, world_size: int, steps: int, user_deepspeed: dict[str, Any]):
    """Load model + adapter and wrap them in a DeepSpeed engine with AdamW and the LR schedule."""
    import deepspeed

    dtype = resolve_precision(cfg.train.precision, cfg.scaling.use_gpu)
    # The same seed on every rank: identical adapter initialisation everywhere.
    seed_everything(cfg.train.seed)
    model = load_base_model(cfg.model, dtype=dtype)
    model = add_adapter(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=cfg.train.adam_betas, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.train.lr_schedule, steps, warmup_steps(steps, cfg.train.warmup_ratio))
    )
    ds_config = build_deepspeed_config(cfg, world_size, dtype, user=user_deepspeed)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, ds_config


def run_checkpoint_paths(latest: ray.train.Checkpoint) -> tuple[list[str], str]:
    """Ray's latest checkpoint of the run, then the older ones beside it in the run directory, newest first;
    and a name tag no checkpoint directory of the run has yet (``_r<n>``).

    Ray hands a worker only its latest checkpoint; when that one is damaged the next is the newest
    older one that loads. Directories newer than Ray's latest were never registered and are left out.
    """
    parent, name = latest.path.rstrip("/").rsplit("/", 1)
    newest = checkpoint_step(name)
    try:
        infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    except OSError:
        infos = []
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and checkpoint_step(i.base_name) is not None]
    tags = [int(m.group(1)) for n in names if (m := re.search(r"_r(\d+)", n))]
    tag = f"_r{max(tags, default=0) + 1}"
    if newest is None:
        return [latest.path], tag
    older = sorted(((checkpoint_step(n), n) for n in names if checkpoint_step(n) < newest), reverse=True)
    return [latest.path, *(f"{parent}/{n}" for _, n in older)], tag


def load_first_usable(engine, candidates: list[ray.train.Checkpoint], loop_config: dict[str, Any], *, rank: int,
                      world: int, adopt_lr: float | None) -> tuple[TrainState | None, int, list[str]]:
    """Load the first candidate every rank can load: (state, its index, why each earlier one was not).

    Every rank tries each candidate and all ranks exchange their verdicts (one all-gather per candidate), so
    they agree on the checkpoint, or on none (state None).
    """
    rejected = []
    for index, checkpoint in enumerate(candidates):
        state, why, local = None, "", None
        try:
            with checkpoint.as_directory() as ckpt_dir:
                local = Path(ckpt_dir).resolve()
                state = load_checkpoint(engine, local, rank=rank, world_size=world,
                                        fingerprint=loop_config["fingerprint"], adopt_lr=adopt_lr)
        except (CorruptCheckpoint, FileNotFoundError) as e:  # damaged, or pruned since it was listed
            why = str(e).replace(f"{local}: ", "") if local else str(e)  # a download's temporary path says nothing
        verdicts: list[str] = [""] * world
        dist.all_gather_object(verdicts, why)
        problems = sorted({w for w in verdicts if w})
        if not problems:
            return state, index, rejected
        rejected.append(f"{checkpoint.path}: {'; '.join(problems)}")
    return None, len(candidates), rejected


def restore(engine, loop_config: dict[str, Any], cfg: TrainJobConfig, state: TrainState, *, rank: int,
            world: int) -> tuple[TrainState, str]:
    """Continue from the run's newest usable checkpoint, or its init checkpoint, or start afresh.

    Returns the train state and a tag for the names of this attempt's checkpoints: after falling back
    past Ray's latest checkpoint, new ones get names of their own (``_r<n>``) rather than overwrite a
    damaged one Ray still tracks (and may later delete, with whatever was written over it).
    """
    latest, adopt_lr, tag = ray.train.get_checkpoint(), None, ""
    if latest is not None:
        found = [run_checkpoint_paths(latest) if rank == 0 else None]
        dist.broadcast_object_list(found, src=0)  # every rank walks the same list
        paths, tag = found[0]
        candidates = [ray.train.Checkpoint(p, filesystem=latest.filesystem) for p in paths]
    elif loop_config.get("init_checkpoint"):
        # Start from another run's checkpoint (a sweep trial continuing a better trial's weights).
        init = loop_config["init_checkpoint"]
        fs, _ = Storage(loop_config["storage_uri"], loop_config.get("endpoint_url")).filesystem()
        candidates = [ray.train.Checkpoint(init["path"], filesystem=fs)]
        adopt_lr = cfg.train.lr if init.get("adopt") else None
    else:
        seed_everything(cfg.train.seed + 1000 * rank)  # per-rank dropout streams
        return state, ""
    restored, index, rejected = load_first_usable(engine, candidates, loop_config, rank=rank, world=world,
                                                  adopt_lr=adopt_lr)
    if rank == 0:
        for line in rejected:
            print(f"[ftune] checkpoint unusable, skipped: {line}", flush=True)
    if restored is None:
        if latest is None:
            raise RuntimeError(f"the init checkpoint is unusable: {rejected[0]}")
        if rank == 0:
            print("[ftune] no checkpoint of the run is usable: starting again from step 0", flush=True)
        seed_everything(cfg.train.seed + 1000 * rank)
        return state, tag
    _announce_resume(restored, candidates[index].path, cfg, state, rank=rank, fell_back=index > 0)
    if restored.world_size != world:  # per-rank RNG streams do not map onto a new world size
        seed_everything(cfg.train.seed + 1000 * rank + restored.step)
    restored.world_size = state.world_size
    restored.gradient_accumulation_steps = state.gradient_accumulation_steps
    restored.total_steps = state.total_steps
    return restored, tag if index > 0 else ""


def _announce_resume(restored: TrainState, path: str, cfg: TrainJobConfig, now: TrainState, *, rank: int,
                     fell_back: bool) -> None:
    if rank != 0:
        return
    world, accum, steps = now.world_size, now.gradient_accumulation_steps, now.total_steps
    changed = restored.world_size != world
    longer = restored.total_steps not in (0, steps)
    print(
        f"[ftune] resumed at step {restored.step}/{steps} from {path}"
        + (" (the newest checkpoint that loads; see the lines above for those skipped)" if fell_back else "")
        + (f"; workers {restored.world_size} -> {world}, gradient accumulation "
           f"{restored.gradient_accumulation_steps} -> {accum}, global batch {cfg.train.global_batch_size} kept"
           if changed else "")
        + (f"; run length {restored.total_steps} -> {steps} steps, the {cfg.train.lr_schedule} learning-rate "
           f"schedule now spans {steps} steps" if longer else ""),
        flush=True,
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the typed config, restore, train, evaluate, checkpoint, export."""
    cfg = TrainJobConfig.model_validate(loop_config["job"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(cfg.scaling.torch_threads or max(1, cfg.scaling.cpus_per_worker)))
    data = ray.get(loop_config["data"])
    train_examples, validation = data["train"], data["validation"]
    tokenizer = load_tokenizer(cfg.model)
    collate = Collator(pad_id=pad_token_id(tokenizer))

    plan = BatchPlan(len(train_examples), cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.seed)
    steps = total_steps(cfg, plan)
    accum = gradient_accumulation_steps(cfg.train, world)
    # The driver read the user's DeepSpeed JSON: workers may not see the same files.
    engine, _ = build_engine(cfg, world, steps, loop_config["deepspeed_user"])
    device = engine.device

    state = TrainState(
        world_size=world, gradient_accumulation_steps=accum, total_steps=steps,
        config_fingerprint=loop_config["fingerprint"],
    )
    state, retry_suffix = restore(engine, loop_config, cfg, state, rank=rank, world=world)

    run_dir = Path(loop_config["local_run_dir"])
    storage = Storage(loop_config["storage_uri"], loop_config.get("endpoint_url"))
    recorder = None
    if rank == 0:
        recorder = RunRecorder(
            run_dir, cfg.tracking, name=loop_config["name"], config=loop_config["job"], storage=storage
        )
        print(
            f"[ftune] {world} worker(s), global batch {cfg.train.global_batch_size} = micro {cfg.train.micro_batch_size}"
            f" x accumulation {accum} x workers {world}; {steps} steps; "
            f"{trainable_parameters(engine.module):,} trainable parameters",
            flush=True,
        )

    val_shard = shard(validation, rank, world)
    em_examples = [e for e in validation if e.reference][: cfg.train.exact_match_examples]
    em_shard = shard(em_examples, rank, world)

    def run_eval() -> dict[str, float]:
        batches = [collate(val_shard[i : i + cfg.train.micro_batch_size]) for i in range(0, len(val_shard), cfg.train.micro_batch_size)]
        if cfg.train.eval_batches:
            batches = batches[: cfg.train.eval_batches]
        out = evaluate_loss(engine.module, batches, device)
        # Decided from the whole list, not this rank's share: a rank whose share is empty (fewer examples
        # than workers) still joins exact_match's all-reduce.
        if em_examples:
            out.update(exact_match(engine.module, tokenizer, em_shard, device, batch_size=cfg.train.micro_batch_size))
        return out

    if state.eval_loss_before is None:
        before = run_eval()
        state.eval_loss_before = before["eval_loss"]
        state.last_eval = before
        if recorder:
            recorder.log({"step": 0, **before})

    engine.train()
    start_time = time.perf_counter()
    steps_timed, time_timed = 0, 0.0
    preempted = None  # PreemptionInfo once a notice arrived
    stop = StopPoller(loop_config.get("stop_signal"), cfg.train.report_interval_s) if rank == 0 else None
    stopping = False  # a stop was requested: this step is the last
    pending: list[dict[str, Any]] = []  # step rows not yet sent with ray.train.report
    last_report = last_preemption_check = float("-inf")
    while state.step < steps and not stopping:
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for micro in plan.micro_batches(state.step, rank, world):
            batch = {k: v.to(device) for k, v in collate([train_examples[i] for i in micro]).items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        # One all-reduce per step carries the loss, the token count, rank 0's clock and its stop flag,
        # so every rank takes the same report / preemption-check / stop decisions without another collective.
        stop_flag = 1.0 if stop is not None and stop.poll(time.monotonic()) else 0.0
        totals = torch.tensor(
            [loss_sum, float(tokens), time.monotonic() if rank == 0 else 0.0, stop_flag], dtype=torch.float64
        )
        dist.all_reduce(totals)
        clock, stopping = float(totals[2]), bool(totals[3] > 0)
        step_time = time.perf_counter() - t0
        state.step += 1
        state.epoch = plan.epoch_of(state.step - 1)
        state.tokens_seen += int(totals[1])
        if state.step > 1:  # the first step includes warm-up costs
            steps_timed, time_timed = steps_timed + 1, time_timed + step_time
        metrics: dict[str, Any] = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": float(totals[0]) / (accum * world),
            "lr": engine.get_lr()[0],
            "step_time_s": step_time,
            "tokens_per_s": float(totals[1]) / step_time,
            "total_steps": steps,
            "world_size": world,
            "gradient_accumulation_steps": accum,
        }
        if preempted is None and clock - last_preemption_check >= cfg.train.preemption_check_interval_s:
            last_preemption_check = clock
            preempted = ray.train.get_preemption_info()
            if preempted is not None and rank == 0:
                deadline = (preempted.deadline_ms or 0) / 1000 - time.time()
                print(
                    f"[ftune] preemption notice for node(s) {preempted.preempted_node_ids} (ranks "
                    f"{preempted.preempted_ranks}), {deadline:.0f} s left: checkpointing every step until it goes",
                    flush=True,
                )
        last = state.step == steps or stopping
        if stopping and rank == 0:
            print(f"[ftune] stop requested ({stop.reason}): checkpointing at step {state.step}/{steps} and finishing",
                  flush=True)
        do_eval = last or state.step % cfg.train.eval_every == 0
        # After a notice the node may go at any moment: a just-in-time checkpoint after every step
        # means at most the step in flight is lost.
        jit = preempted is not None
        do_ckpt = last or jit or state.step % cfg.train.checkpoint_every == 0
        if do_eval:
            state.last_eval = run_eval()
            metrics.update(state.last_eval)
        if recorder:
            recorder.log(metrics)
        pending.append(metrics)
        if do_ckpt or do_eval or clock - last_report >= cfg.train.report_interval_s:
            last_report = clock
            report = {**metrics, "eval_loss": state.last_eval.get("eval_loss"), "steps": pending}
            pending = []
            if do_ckpt:
                _report_with_checkpoint(engine, state, report, rank, jit=jit, suffix=retry_suffix)
                if recorder:
                    recorder.sync()
            else:
                ray.train.report(report)

    if rank == 0 and recorder is not None:
        adapter_dir = run_dir / "adapter"
        save_adapter(engine.module, adapter_dir)
        wall = time.perf_counter() - start_time
        summary = {
            "name": loop_config["name"],
            "steps": state.step,
            "epochs": state.epoch + 1,
            "tokens": state.tokens_seen,
            "world_size": world,
            "global_batch_size": cfg.train.global_batch_size,
            "eval_loss_before": state.eval_loss_before,
            "eval_loss_after": state.last_eval.get("eval_loss"),
            "eval_perplexity_after": state.last_eval.get("eval_perplexity"),
            "exact_match_after": state.last_eval.get("exact_match"),
            "tokens_per_s": state.tokens_seen / max(wall, 1e-9),
            "steady_step_time_s": time_timed / steps_timed if steps_timed else None,
            "wall_time_s": wall,
            "restarts": state.restarts,
            "adapter_path": loop_config["adapter_uri"],
            "stop_reason": stop.reason if stopping else None,
            "trainable_parameters": trainable_parameters(engine.module),
            "base_weights_sha256": frozen_weights_sha256(engine.module),
        }
        recorder.finish(summary)
        if storage.is_remote:
            storage.upload_dir(run_dir, loop_config["name"])


def _report_with_checkpoint(
    engine, state: TrainState, metrics: dict[str, Any], rank: int, *, jit: bool, suffix: str = ""
) -> None:
    with tempfile.TemporaryDirectory(prefix="ftune-ckpt-") as tmp:
        t0 = time.perf_counter()
        save_checkpoint(engine, state, Path(tmp), rank=rank)
        metrics = {**metrics, "checkpoint_save_s": time.perf_counter() - t0, "jit_checkpoint": jit}
        if metrics.get("eval_loss") is None:
            metrics["eval_loss"] = float("inf")
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_step{state.step:07d}" + ("_jit" if jit else "") + suffix,
        )
    if jit:
        # report() returns once the result is queued, not once the controller has taken it in (each
        # worker's queue holds one result; the controller drains it every health-check interval). A
        # node that goes now would take a queued checkpoint with it and lose two steps, so wait:
        # the next report blocks until this one is consumed, and the checkpoint is registered before
        # the next step starts. It repeats the step's metrics without rows or a checkpoint.
        ray.train.report({**metrics, "steps": [], "jit_commit": True})
