"""Where a worker's run continues from: its newest usable checkpoint, its init checkpoint, or step 0.

Every rank walks the same candidates and all agree on the one they load (or on none), so a damaged
checkpoint makes every rank fall back together to the newest older one that verifies.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import ray.train
import torch
import torch.distributed as dist

from ftune.config import TrainJobConfig
from train.checkpoint import CorruptCheckpoint, TrainState, checkpoint_step, load_checkpoint
from train.phases import NO_PHASE_TIMER, PhaseTimer
from train.spec import RunSpec


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def load_first_usable(engine, candidates: list[ray.train.Checkpoint], spec: RunSpec, *, rank: int, world: int,
                      adopt_lr: float | None, phases: PhaseTimer) -> tuple[TrainState | None, int, list[str]]:
    """Load the first candidate every rank can load: (state, its index, why each earlier one was not).

    Every rank tries each candidate and all ranks exchange their verdicts (one all-gather per candidate), so
    they agree on the checkpoint, or on none (state None).
    """
    rejected = []
    for index, checkpoint in enumerate(candidates):
        state, why, local = None, "", None
        try:
            with checkpoint.as_directory() as ckpt_dir, phases.phase("load_checkpoint", path=checkpoint.path):
                local = Path(ckpt_dir).resolve()
                state = load_checkpoint(engine, local, rank=rank, world_size=world, fingerprint=spec.fingerprint,
                                        adopt_lr=adopt_lr)
        except (CorruptCheckpoint, FileNotFoundError) as e:  # damaged, or pruned since it was listed
            why = str(e).replace(f"{local}: ", "") if local else str(e)  # a download's temporary path says nothing
        verdicts: list[str] = [""] * world
        dist.all_gather_object(verdicts, why)
        problems = sorted({w for w in verdicts if w})
        if not problems:
            return state, index, rejected
        rejected.append(f"{checkpoint.path}: {'; '.join(problems)}")
    return None, len(candidates), rejected


def restore(engine, spec: RunSpec, cfg: TrainJobConfig, state: TrainState, *, rank: int, world: int,
            phases: PhaseTimer = NO_PHASE_TIMER) -> tuple[TrainState, str]:
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
    elif spec.init_checkpoint:
        # Start from another run's checkpoint (a sweep trial continuing a better trial's weights).
        fs, _ = spec.storage().filesystem()
        candidates = [ray.train.Checkpoint(spec.init_checkpoint, filesystem=fs)]
        adopt_lr = cfg.train.lr if spec.adopt else None
    else:
        seed_everything(cfg.train.seed + 1000 * rank)  # per-rank dropout streams
        return state, ""
    restored, index, rejected = load_first_usable(engine, candidates, spec, rank=rank, world=world,
                                                  adopt_lr=adopt_lr, phases=phases)
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
