"""The per-worker training loop run by Ray Train: a DeepSpeed ZeRO engine over a peft model.

Every rank runs the same sequence of collectives (steps, evaluations, reports, checkpoints),
decided from the step number, Ray's agreed preemption notice and rank 0's clock and stop flag
(shared in each step's all-reduce) alone, so no rank ever waits on a barrier the others skip
(the decision itself is ``train.cadence``).

A run given a stop signal (``RunSpec.stop_signal``, a ``train.stop.StopSignal``) ends early
when it is raised: after the step in flight it evaluates, reports a checkpoint, writes its adapter
and summary (``stop_reason``) and returns like a finished run.

A run given a phase timer (``RunSpec.phase_timer``) tells it each phase's start and end
(train/phases.py lists them): benchmarks time the loop that way.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from ftune.adapters import add_adapter, save_adapter, trainable_parameters
from ftune.config import TrainJobConfig
from ftune.data.collate import Collator
from ftune.data.tokenize import pad_token_id
from ftune.lean_imports import skip_bitsandbytes
from ftune.model import load_base_model, load_tokenizer, resolve_precision
from train.baseline import write_baseline
from train.batching import BatchPlan
from train.cadence import Cadence, StepActions
from train.checkpoint import TrainState, save_checkpoint
from train.deepspeed_config import build_deepspeed_config, gradient_accumulation_steps
from train.evaluation import Evaluator
from train.metrics import RunRecorder
from train.phases import NO_PHASE_TIMER, PhaseTimer
from train.restore import restore, seed_everything
from train.schedule import lr_multiplier, warmup_steps
from train.spec import RunData, RunSpec
from train.stop import StopPoller

log = logging.getLogger("ftune.train")


def train_loop_per_worker(spec: RunSpec) -> None:
    """Ray Train entry point: set up and restore, evaluate, train, then (rank 0) export and summarise."""
    phases = spec.phase_timer or NO_PHASE_TIMER
    with phases.phase("worker"):
        worker = start_worker(spec, phases)
        if worker.state.eval_loss_before is None:
            evaluate_before(worker)
        outcome = train(worker)
        if worker.recorder is not None:
            finish(worker, outcome)


@dataclass
class Worker:
    """One rank's run once set up: its config, engine, data, state and helpers."""

    spec: RunSpec
    cfg: TrainJobConfig
    rank: int
    world: int
    engine: Any
    """The DeepSpeed engine."""
    data: RunData
    plan: BatchPlan
    cadence: Cadence
    accum: int
    """Gradient accumulation steps at this world size."""
    collate: Collator
    evaluate: Evaluator
    state: TrainState
    retry_suffix: str
    """Tag of this attempt's checkpoint names after a fall-back past Ray's latest one (see ``restore``)."""
    recorder: RunRecorder | None
    """Rank 0's metrics writer (None on other ranks)."""
    phases: PhaseTimer

    @property
    def steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.cadence.total_steps


@dataclass
class Outcome:
    """How the training steps went: what the summary reports."""

    started: float
    """``time.perf_counter()`` when the first step started."""
    steady_steps: int = 0
    """Steps timed for the steady step time (all but the first, which includes warm-up costs)."""
    steady_time_s: float = 0.0
    stop_reason: str | None = None
    """Why the run was stopped early, or None."""


def start_worker(spec: RunSpec, phases: PhaseTimer) -> Worker:
    """Rebuild the typed config, fetch the data, build the engine and restore the run's state."""
    cfg = spec.config()
    skip_bitsandbytes(quantized=cfg.model.load_in_4bit)  # before transformers and peft are imported here
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(cfg.scaling.torch_threads or max(1, cfg.scaling.cpus_per_worker)))
    data: RunData = ray.get(spec.data)
    with phases.phase("load_tokenizer"):
        tokenizer = load_tokenizer(cfg.model)
    collate = Collator(pad_id=pad_token_id(tokenizer))
    t = cfg.train
    plan = BatchPlan(len(data.train), t.global_batch_size, t.micro_batch_size, t.seed)
    steps = spec.total_steps()
    accum = gradient_accumulation_steps(t, world)
    with phases.phase("build_engine"):
        engine, _ = build_engine(cfg, world, steps, spec.deepspeed_user, phases)
    state = TrainState(world_size=world, gradient_accumulation_steps=accum, total_steps=steps,
                       config_fingerprint=spec.fingerprint)
    state, retry_suffix = restore(engine, spec, cfg, state, rank=rank, world=world, phases=phases)
    recorder = None
    if rank == 0:
        recorder = RunRecorder(spec.run_dir, cfg.tracking, name=spec.name, config=spec.job, storage=spec.storage())
        print(
            f"[ftune] {world} worker(s), global batch {t.global_batch_size} = micro {t.micro_batch_size}"
            f" x accumulation {accum} x workers {world}; {steps} steps; "
            f"{trainable_parameters(engine.module):,} trainable parameters",
            flush=True,
        )
    evaluate = Evaluator.of(engine.module, tokenizer, collate, engine.device, data.validation, rank=rank, world=world,
                            batch_size=t.micro_batch_size, max_batches=t.eval_batches,
                            exact_match_examples=t.exact_match_examples, phases=phases)
    cadence = Cadence(total_steps=steps, eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                      report_interval_s=t.report_interval_s, preemption_check_interval_s=t.preemption_check_interval_s)
    return Worker(spec, cfg, rank, world, engine, data, plan, cadence, accum, collate, evaluate, state, retry_suffix,
                  recorder, phases)


def evaluate_before(worker: Worker) -> None:
    """The held-out metrics of the untrained adapter (once per run: a resumed run keeps its own).

    A run given another run's measurement of the same (``spec.baseline_eval``) records that instead; a run
    that measures them shares them under ``spec.baseline_key`` (train/baseline.py).
    """
    spec, untrained = worker.spec, worker.state.step == 0
    shared = spec.baseline_eval if untrained else None
    before = dict(shared["metrics"]) if shared else worker.evaluate()
    worker.state.eval_loss_before = before["eval_loss"]
    worker.state.last_eval = before
    if worker.recorder:
        worker.recorder.log({"step": 0, **before, **({"baseline_from": shared["run"]} if shared else {})})
        if not shared and untrained and spec.baseline_key:
            write_baseline(spec.storage(), spec.baseline_key, before, spec.name)


def train(worker: Worker) -> Outcome:
    """Train until the last step or a stop request, evaluating, reporting and checkpointing on the cadence."""
    w, state = worker, worker.state
    w.engine.train()
    outcome = Outcome(started=time.perf_counter())
    preempted = None  # PreemptionInfo once a notice arrived
    stop = StopPoller(w.spec.stop_signal, w.cfg.train.report_interval_s) if w.rank == 0 else None
    stopping = False  # a stop was requested: this step is the last
    pending: list[dict[str, Any]] = []  # step rows not yet sent with ray.train.report
    last_report = last_preemption_check = float("-inf")
    while state.step < w.steps and not stopping:
        metrics, clock, stopping = train_step(w, stop, outcome)
        if preempted is None and w.cadence.check_preemption(clock, last_preemption_check):
            last_preemption_check = clock
            preempted = preemption_notice(w.rank)
        if stopping:
            outcome.stop_reason = stop.reason if stop is not None else None
            if w.rank == 0:
                print(f"[ftune] stop requested ({outcome.stop_reason}): checkpointing at step {state.step}/{w.steps}"
                      " and finishing", flush=True)
        actions = w.cadence.after_step(state.step, clock, last_report, preempted=preempted is not None,
                                       stopping=stopping)
        if actions.evaluate:
            state.last_eval = w.evaluate()
            metrics.update(state.last_eval)
        if w.recorder:
            with w.phases.phase("record"):
                w.recorder.log(metrics)
        pending.append(metrics)
        if actions.report:
            last_report = clock
            send_report(w, {**metrics, "eval_loss": state.last_eval.get("eval_loss"), "steps": pending}, actions)
            pending = []
    return outcome


def train_step(worker: Worker, stop: StopPoller | None, outcome: Outcome) -> tuple[dict[str, Any], float, bool]:
    """One optimizer step over this rank's micro-batches: its metrics row, rank 0's clock and the agreed stop flag."""
    w, state = worker, worker.state
    t0 = time.perf_counter()
    loss_sum, tokens = 0.0, 0
    for micro in w.plan.micro_batches(state.step, w.rank, w.world):
        with w.phases.phase("collate"):
            batch = w.collate([w.data.train[i] for i in micro])
        batch = {k: v.to(w.engine.device) for k, v in batch.items()}
        loss = w.engine(**batch).loss
        w.engine.backward(loss)
        w.engine.step()
        loss_sum += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    # One all-reduce per step carries the loss, the token count, rank 0's clock and its stop flag,
    # so every rank takes the same report / preemption-check / stop decisions without another collective.
    stop_flag = 1.0 if stop is not None and stop.poll(time.monotonic()) else 0.0
    totals = torch.tensor(
        [loss_sum, float(tokens), time.monotonic() if w.rank == 0 else 0.0, stop_flag], dtype=torch.float64
    )
    dist.all_reduce(totals)
    clock, stopping = float(totals[2]), bool(totals[3] > 0)
    step_time = time.perf_counter() - t0
    state.step += 1
    state.epoch = w.plan.epoch_of(state.step - 1)
    state.tokens_seen += int(totals[1])
    if state.step > 1:  # the first step includes warm-up costs
        outcome.steady_steps, outcome.steady_time_s = outcome.steady_steps + 1, outcome.steady_time_s + step_time
    metrics: dict[str, Any] = {
        "step": state.step,
        "epoch": state.epoch,
        "loss": float(totals[0]) / (w.accum * w.world),
        "lr": w.engine.get_lr()[0],
        "step_time_s": step_time,
        "tokens_per_s": float(totals[1]) / step_time,
        "total_steps": w.steps,
        "world_size": w.world,
        "gradient_accumulation_steps": w.accum,
        "restarts": state.restarts,  # a resume that loses no step is visible only here
    }
    return metrics, clock, stopping


def preemption_notice(rank: int):
    """Ray's preemption notice for this worker group, or None; rank 0 announces one."""
    preempted = ray.train.get_preemption_info()
    if preempted is not None and rank == 0:
        deadline = (preempted.deadline_ms or 0) / 1000 - time.time()
        print(
            f"[ftune] preemption notice for node(s) {preempted.preempted_node_ids} (ranks "
            f"{preempted.preempted_ranks}), {deadline:.0f} s left: checkpointing every step until it goes",
            flush=True,
        )
    return preempted


def send_report(worker: Worker, report: dict[str, Any], actions: StepActions) -> None:
    """Report the pending rows to Ray Train, with a checkpoint when the cadence asks for one."""
    w = worker
    if not actions.checkpoint:
        ray.train.report(report)
        return
    with w.phases.phase("checkpoint", step=w.state.step, jit=actions.jit):
        report_with_checkpoint(w.engine, w.state, report, w.rank, jit=actions.jit, suffix=w.retry_suffix)
    if w.recorder:
        w.recorder.sync()


def finish(worker: Worker, outcome: Outcome) -> None:
    """Rank 0: export the adapter, write the run's summary and upload the run directory to remote storage."""
    w, state, storage = worker, worker.state, worker.spec.storage()
    save_adapter(w.engine.module, w.spec.run_dir / "adapter")
    wall = time.perf_counter() - outcome.started
    summary = {
        "name": w.spec.name,
        "steps": state.step,
        "epochs": state.epoch + 1,
        "tokens": state.tokens_seen,
        "world_size": w.world,
        "global_batch_size": w.cfg.train.global_batch_size,
        "eval_loss_before": state.eval_loss_before,
        "eval_loss_after": state.last_eval.get("eval_loss"),
        "eval_perplexity_after": state.last_eval.get("eval_perplexity"),
        "exact_match_after": state.last_eval.get("exact_match"),
        "tokens_per_s": state.tokens_seen / max(wall, 1e-9),
        "steady_step_time_s": outcome.steady_time_s / outcome.steady_steps if outcome.steady_steps else None,
        "wall_time_s": wall,
        "restarts": state.restarts,
        "adapter_path": w.spec.adapter_uri,
        "stop_reason": outcome.stop_reason,
        "trainable_parameters": trainable_parameters(w.engine.module),
        "base_weights_sha256": frozen_weights_sha256(w.engine.module),
    }
    assert w.recorder is not None, "rank 0 writes the summary"
    w.recorder.finish(summary)
    if storage.is_remote:
        storage.upload_dir(w.spec.run_dir, w.spec.name)


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


def build_engine(cfg: TrainJobConfig, world_size: int, steps: int, user_deepspeed: dict[str, Any] | None,
                 phases: PhaseTimer = NO_PHASE_TIMER):
    """Load model + adapter and wrap them in a DeepSpeed engine with AdamW and the LR schedule."""
    import deepspeed

    from ftune.deepspeed_ops import preload

    preload()  # the cached CPU op, without torch's build step and its lock (see ftune.deepspeed_ops)
    dtype = resolve_precision(cfg.train.precision, cfg.scaling.use_gpu)
    # The same seed on every rank: identical adapter initialisation everywhere.
    seed_everything(cfg.train.seed)
    with phases.phase("load_base_model"):
        model = load_base_model(cfg.model, dtype=dtype)
    with phases.phase("add_adapter"):
        model = add_adapter(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=cfg.train.adam_betas, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.train.lr_schedule, steps, warmup_steps(steps, cfg.train.warmup_ratio))
    )
    ds_config = build_deepspeed_config(cfg, world_size, dtype, user=user_deepspeed)
    with phases.phase("deepspeed.initialize"):
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
    return engine, ds_config


def report_with_checkpoint(
    engine, state: TrainState, metrics: dict[str, Any], rank: int, *, jit: bool, suffix: str = ""
) -> None:
    """Save a checkpoint of every rank and report it with ``metrics`` (a collective)."""
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
