"""One sweep trial: a Tune function trainable that runs a whole Ray Train job (TorchTrainer + DeepSpeed).

The driver prepares and checks the data once (``train.job.prepare``) and gives every trial the plan
and the dataset. A trial applies its sampled parameters to the job, names its training run after
its Tune trial id (under ``<sweep>/trials/``) and runs ``train.job.build_trainer`` with Ray Tune's
``TuneReportCallback``: every Train report becomes a Tune result that ASHA, PBT and the budget act
on, while the run keeps DeepSpeed, its checkpoints and Train's fault tolerance. Restarting a trial
(sweep resume) re-enters the same run, which Train resumes from its latest checkpoint.

Every trial but an exploiting one carries the key of its evaluation before training: the first trial
that evaluates shares the numbers, and later trials record them instead of evaluating again
(train/baseline.py).

A PBT exploit restarts the trial with a pointer checkpoint (``exploit.json``) naming a copy of the
donor's Train checkpoint: the trial continues it in a new run with ``init_checkpoint``, ``adopt=True``.

When the budget runs out the sweep raises its ``train.stop.StopSignal``, which every trial's run
polls: the run checkpoints at the step it reached, writes its adapter and summary, and the trial
ends on its own. When Tune stops or pauses a trial (ASHA, a PBT exploit, the budget's grace period
over) the sweep driver aborts its Train run and removes any placement group it leaves behind
(tune/placement_groups.py). Tune reuses trial processes (``reuse_actors``): a trial's process, its
imports done, takes the next trial after ``reset_config``, which first aborts a run still going (the
driver's abort not through yet); a process Tune does not reuse is stopped, and ``cleanup`` does the same.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.queue import Queue

from ftune.config import TrainJobConfig
from ftune.storage import Storage
from train.baseline import baseline_key, read_baseline
from train.spec import RunData, RunSpec
from tune.placement_groups import (
    RunHandoff,
    abort_run,
    end_run,
    reopen,
    running_trials,
    start_run,
    was_stopped,
)
from tune.space import SearchSpace

EXPLOIT_FILE = "exploit.json"


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides its sampled parameters and the data (pickled into each trial)."""

    sweep_name: str
    """Sweep name (the wandb group of every trial)."""
    job: dict[str, Any]
    """Base training job (JSON form): storage under the sweep's trials/, tracking grouped by sweep."""
    space: SearchSpace
    """The search space (decodes a trial's Tune config into job values)."""
    base: RunSpec
    """The base job as ``train.job.prepare`` prepared it: its DeepSpeed settings and data size hold for every trial."""
    validation_digest: str
    """``train.baseline.validation_digest`` of the prepared validation examples (part of every baseline key)."""

    @property
    def base_r(self) -> int:
        """The base job's LoRA rank (alpha ratios use it when r is not searched)."""
        return int(self.job["lora"]["r"])

    @property
    def total_steps(self) -> int:
        """Optimizer steps of a full trial."""
        return self.base.total_steps()

    def job_for(self, config: dict[str, Any], run: str) -> TrainJobConfig:
        """The training job of a trial with Tune config ``config``, running as ``run``."""
        data = copy.deepcopy(self.job)
        for key, value in self.space.job_overrides(config, self.base_r).items():
            section, name = key.split(".")
            data[section][name] = value
        data["name"] = run
        return TrainJobConfig.model_validate(data)

    def spec_for(self, cfg: TrainJobConfig) -> RunSpec:
        """The run spec of a trial's job ``cfg`` (named ``cfg.name``), on the sweep's prepared data."""
        return RunSpec.of(cfg, cfg.name or "", deepspeed_user=self.base.deepspeed_user,
                          train_examples=self.base.train_examples)


@dataclass(frozen=True)
class Exploit:
    """A PBT exploit: which trial continues whose checkpoint, in which new run."""

    trial: str
    """The exploiting (worse) trial."""
    donor: str
    """The trial whose checkpoint it continues."""
    donor_run: str
    """The donor's training run."""
    donor_step: int
    """Step of the copied checkpoint."""
    run: str
    """The new training run of the exploiting trial."""
    checkpoint: str
    """Path of the copied checkpoint (inside the storage filesystem)."""

    @classmethod
    def read(cls, checkpoint) -> Exploit | None:
        """The exploit a Tune checkpoint points at, or None (not a PBT pointer)."""
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as local:
            path = Path(local) / EXPLOIT_FILE
            return cls(**json.loads(path.read_text())) if path.is_file() else None

    def to_json(self) -> str:
        """exploit.json's text."""
        return json.dumps(asdict(self), indent=2)


def trial_trainable(plan: TrialPlan, data: RunData, registry: Queue | None = None,
                    stop_signal: Any = None, ended: dict[str, dict[str, Any]] | None = None) -> type:
    """The Tune trainable class: ``run_trial`` with the plan and data attached, aborting its Train run on stop.

    Args:
        registry: Where each run's controller posts its placement groups (the sweep's PlacementGroupRegistry).
        stop_signal: The sweep's ``train.stop.StopSignal`` (raised at the budget stop).
        ended: On resume, the trials the sweep had already finished, with their last results
            (``SpendLedger.recorded_ends``).
    """
    import ray.tune as ray_tune

    from ftune.compat.ray_private import function_trainable_class

    trainable = ray_tune.with_parameters(run_trial, plan=plan, data=data, registry=registry, stop_signal=stop_signal,
                                         ended=ended)
    base = function_trainable_class(trainable)

    class SweepTrial(base):
        def reset_config(self, new_config: dict[str, Any]) -> bool:
            # Tune reuses this process for another trial (or for this one after a PBT exploit): abort the
            # Train run still going (a trial ASHA stopped, an exploited one), so that Tune's wait for the
            # function to return is short; ``self.trial_id`` is already the next trial's.
            for running in running_trials():
                abort_run(running)
            # Tune waits this long for the old function to return (2 s by default, read on each reset); an
            # aborted run returns within seconds, and a reset that times out costs a new trial process.
            os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
            reset = super().reset_config(new_config)  # False: the old function still runs; Tune starts anew
            reopen(self.trial_id)  # only now: the old run's ending still reads its stop
            return reset

        def cleanup(self) -> None:
            abort_run(self.trial_id)
            super().cleanup()

    SweepTrial.__name__ = SweepTrial.__qualname__ = base.__name__
    return SweepTrial


class SweepReportCallback(TuneReportCallback):
    """Ray Tune's TuneReportCallback, minus the per-step rows each report carries (they are in metrics.jsonl)."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        """Forward rank 0's metrics (and the checkpoint path) to the Tune trial."""
        rank0 = {k: v for k, v in metrics[0].items() if k != "steps"}
        super().after_report(run_context, [rank0, *metrics[1:]], checkpoint)


def finished_summary(storage: Storage, run: str, total_steps: int) -> dict[str, Any] | None:
    """The summary of ``run`` if it already trained all its steps (a resumed sweep must not redo it)."""
    if not storage.exists(run, "summary.json"):
        return None
    summary = json.loads(storage.read_text(run, "summary.json"))
    return summary if summary.get("steps", 0) >= total_steps else None


def run_trial(config: dict[str, Any], plan: TrialPlan | None = None, data: RunData | None = None,
              registry: Queue | None = None, stop_signal: Any = None,
              ended: dict[str, dict[str, Any]] | None = None) -> None:
    """The Tune function trainable: one full distributed training run of the trial's settings.

    A trial the sweep had finished before a resume (in ``ended``) reports its recorded end and trains no further.
    """
    import ray
    import ray.tune as ray_tune

    from train.job import build_trainer

    assert plan is not None and data is not None, "run_trial is wrapped with tune.with_parameters(plan=, data=)"
    trial_id = ray_tune.get_context().get_trial_id()
    if ended and trial_id in ended:
        ray_tune.report(ended[trial_id])
        return
    exploit = Exploit.read(ray_tune.get_checkpoint())
    run = exploit.run if exploit else trial_id
    cfg = plan.job_for(config, run)
    storage = Storage.from_config(cfg.storage)

    summary = finished_summary(storage, run, plan.total_steps)
    if summary is not None:
        final = {"step": summary["steps"], "total_steps": plan.total_steps}
        for metric in ("eval_loss", "eval_perplexity", "exact_match"):
            if summary.get(f"{metric}_after") is not None:
                final[metric] = summary[f"{metric}_after"]
        ray_tune.report(final)
        return

    if stop_signal is not None and ray.get(stop_signal.reason.remote()) is not None:
        return  # the sweep is stopping: starting a run now would only spend
    train_run = start_run(trial_id)
    if train_run is None:
        return  # Tune stopped the trial before its run started
    try:
        spec = plan.spec_for(cfg)
        if exploit is None:  # an untrained adapter: its evaluation before training may be another trial's
            key = baseline_key(cfg, plan.validation_digest)
            spec = spec.replace(baseline_key=key, baseline_eval=read_baseline(storage, key))
        trainer = build_trainer(
            cfg,
            spec,
            data,
            [SweepReportCallback(), RunHandoff(trial_id, train_run.mailbox, registry)],
            init_checkpoint=exploit.checkpoint if exploit else None,
            adopt=exploit is not None,
            stop_signal=stop_signal,
        )
        trainer.fit()
    except Exception:
        if was_stopped(trial_id) or train_run.aborted_by_sweep():
            return  # Tune stopped the trial and its run was aborted
        raise
    finally:
        end_run(trial_id)
