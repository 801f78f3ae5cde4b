"""The held-out metrics of the untrained adapter, measured once and shared by the runs that would measure them again.

A LoRA or DoRA adapter starts as the identity (``lora_B`` is zero; DoRA's magnitude is the base weight's
norm), so the evaluation a run does before its first step measures the base model itself. Every trial of a
sweep that shares the base model, the data and the evaluation settings would measure the same numbers, at
the cost of a pass over the validation set and the exact-match generations on every trial's GPUs.

So a sweep trial's run carries a key (``baseline_key``: a hash of everything a step-0 evaluation depends
on) and, when one is already there, the metrics measured under it (``RunSpec.baseline_eval``): the trial's
process reads ``_baseline/<key>.json`` in the trials' storage before its run starts, so every rank gets the
same answer; a run that finds it records those metrics as its step 0 (with ``baseline_from``) instead of
evaluating, and a run that evaluates writes them there for the next trials. Two trials that start at once
both evaluate and write the same numbers.

The key leaves out only what cannot change an untrained adapter's evaluation: the adapter's rank, alpha,
dropout and scaling, the optimizer and schedule, the run's length and cadences, seeds of weight init and
data order, and where the run is stored and tracked. Everything else (base model, quantization, data and its
split, sequence length, evaluation batch size and caps, precision, DeepSpeed settings, workers, DoRA and the
target modules) is in it, and so is a digest of the validation examples (taken once, by the sweep's driver). A run that
starts from another run's checkpoint (a PBT exploit) or from its own does not use or write it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from typing import TYPE_CHECKING, Any

from ftune.config import TrainJobConfig
from ftune.storage import Storage

if TYPE_CHECKING:
    from ftune.data import Example

log = logging.getLogger(__name__)

BASELINE_DIR = "_baseline"
"""Directory of the shared baselines in a sweep's trials storage (run names cannot start with ``_``)."""

NOT_IN_KEY: dict[str, set[str] | bool] = {
    "model": {"endpoint_url"},
    "lora": {"r", "alpha", "dropout", "use_rslora", "bias"},
    "train": {"lr", "weight_decay", "adam_betas", "epochs", "max_steps", "global_batch_size", "warmup_ratio",
              "lr_schedule", "max_grad_norm", "seed", "eval_every", "checkpoint_every", "keep_checkpoints",
              "report_interval_s", "preemption_check_interval_s", "gradient_checkpointing"},
    "storage": True, "tracking": True, "failure": True, "name": True,
}
"""Config fields an untrained adapter's evaluation does not depend on (True: the whole section)."""


def validation_digest(validation: list[Example]) -> str:
    """A hash of the validation examples: their tokens, labels, prompts and references."""
    digest = hashlib.sha256()
    for e in validation:
        digest.update(json.dumps([e.input_ids, e.labels, e.prompt_ids, e.reference, e.position_ids]).encode())
    return digest.hexdigest()


def baseline_key(cfg: TrainJobConfig, validation: str) -> str:
    """The key of a run's before-training metrics (``validation``: the ``validation_digest`` of its examples):
    runs with the same key measure the same numbers."""
    relevant = cfg.model_dump(mode="json", exclude=NOT_IN_KEY)
    relevant["validation"] = validation
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:24]


def read_baseline(storage: Storage, key: str) -> dict[str, Any] | None:
    """The shared baseline under ``key`` (``{"metrics": ..., "run": ...}``), or None if there is none usable."""
    try:
        if not storage.exists(BASELINE_DIR, f"{key}.json"):
            return None
        found = json.loads(storage.read_text(BASELINE_DIR, f"{key}.json"))
        metrics, run = found["metrics"], found["run"]
        loss = metrics["eval_loss"]
    except Exception as e:  # unreadable or not ours: the run evaluates for itself
        log.warning("shared baseline %s/%s.json unusable (%s); the run evaluates itself", BASELINE_DIR, key, e)
        return None
    if not (isinstance(loss, (int, float)) and math.isfinite(loss) and isinstance(run, str)):
        return None
    return {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "run": run}


def write_baseline(storage: Storage, key: str, metrics: dict[str, Any], run: str) -> None:
    """Share a run's before-training metrics under ``key`` (best effort: a failed write only costs a re-evaluation)."""
    try:
        storage.write_text(json.dumps({"metrics": metrics, "run": run}, sort_keys=True), BASELINE_DIR, f"{key}.json")
    except Exception as e:
        log.warning("could not share the before-training metrics under %s/%s.json: %s", BASELINE_DIR, key, e)
