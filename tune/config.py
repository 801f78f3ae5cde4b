"""Typed configuration of a sweep: the training job it tunes, the search space, the search, compute and budget.

A sweep YAML names a training job (``base: configs/train/tiny.yaml``), overrides it for every trial
(``job:``), declares the space (``space:``) and how to search it; ``load_config(SweepConfig, path,
overrides)`` checks all of it, the base job and the pricing table included, and reports every
problem with its file:line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from ftune.config import TrainJobConfig
from ftune.errors import ConfigError
from ftune.mapping import deep_merge
from ftune.yaml_config import Section, describe_problem, format_problem, read_yaml
from tune.pricing import ComputeConfig, pricing_problems
from tune.space import DISTRIBUTIONS, ParamSpec, space_problems


class AshaConfig(Section):
    """Asynchronous successive halving: stop trials whose eval loss trails at a rung (tpe, random, grid)."""

    enabled: bool = True
    """Stop unpromising trials early (never used with PBT)."""
    grace_period_steps: int | None = Field(None, ge=1)
    """Steps every trial runs before it may be stopped; None: train.eval_every. Must be a multiple of it."""
    reduction_factor: int = Field(3, ge=2)
    """Keep the best 1/reduction_factor of the trials at each rung (rungs at grace x factor^k steps)."""


class PbtConfig(Section):
    """Population-based training: the worst trials continue a better trial's checkpoint with perturbed settings."""

    perturbation_interval_steps: int | None = Field(None, ge=1)
    """Steps between exploit/explore decisions; None: train.checkpoint_every. Must be a multiple of it."""
    mutate: list[str] | None = None
    """Parameters PBT perturbs; None: train.lr and lora.alpha where the space has them. Never lora.r."""
    quantile_fraction: float = Field(0.25, gt=0.0, le=0.5)
    """Share of the population that is exploited (bottom) and exploited from (top)."""
    resample_probability: float = Field(0.25, ge=0.0, le=1.0)
    """Chance that explore draws a fresh value instead of perturbing the donor's."""
    burn_in_steps: int = Field(0, ge=0)
    """Steps before the first perturbation."""


class SearchConfig(Section):
    """How the space is searched and what is optimised."""

    algorithm: Literal["tpe", "random", "grid", "pbt"] = "tpe"
    """tpe: Optuna TPE (with ASHA); random, grid: baselines; pbt: population-based training."""
    metric: str = "eval_loss"
    """Objective reported by the training loop (eval_loss, eval_perplexity, exact_match)."""
    mode: Literal["min", "max"] = "min"
    """Minimise or maximise the metric."""
    num_samples: int = Field(8, ge=1)
    """Trials to run (tpe, random: sampled configs; pbt: the population). grid runs the whole grid."""
    seed: int | None = 0
    """Sampler seed (None: a fresh one)."""
    tpe_startup_trials: int = Field(4, ge=1)
    """Random trials TPE runs before it starts modelling the objective."""
    grid_points: int = Field(3, ge=2)
    """grid: values per continuous (uniform/loguniform) parameter."""
    storage_url: str | None = None
    """Optuna storage URL (e.g. postgresql://... on multi-node); None: SQLite in the sweep directory."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once; None: as many as the cluster's CPUs/GPUs fit with each trial's worker shape."""
    reuse_trial_processes: bool = True
    """Start a trial in the process of one that ended (Ray Tune's reuse_actors), its imports done; the ended
    trial's Train run is aborted first. False: a fresh process per trial."""
    asha: AshaConfig = Field(default_factory=AshaConfig)
    """Early stopping for tpe, random and grid."""
    pbt: PbtConfig = Field(default_factory=PbtConfig)
    """Population-based training settings."""


class BudgetConfig(Section):
    """Limits of the whole sweep; a new trial starts only if its projected cost fits."""

    usd: float | None = Field(None, gt=0.0)
    """Dollar budget; when spend reaches it every running trial checkpoints and stops. None: no dollar limit."""
    time_s: float | None = Field(None, gt=0.0)
    """Wall-clock limit of the sweep in seconds (resumes count the time already spent)."""
    max_trials: int | None = Field(None, ge=1)
    """Most trials to start."""
    step_time_s: float | None = Field(None, gt=0.0)
    """Estimated seconds per optimizer step (evaluation included) for cost projections; None: measured
    from this sweep's finished trials, else a 1 s guess the dry run flags."""
    startup_s: float = Field(60.0, ge=0.0)
    """Estimated seconds a trial spends starting (scheduling, imports, model load, first evaluation)."""
    stop_grace_s: float = Field(60.0, ge=0.0)
    """Seconds running trials get, once the budget is reached, to checkpoint at the step they reached and
    finish; then whatever still runs is killed (keeping its last periodic checkpoint). The dollar stop
    comes that much spend earlier, so final spend stays within the budget plus one reporting interval."""


class SweepConfig(Section):
    """A hyperparameter sweep: `python -m tune --config FILE [key=value ...]`."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Sweep name: the directory <job storage.path>/sweeps/<name>; None: <config stem>-<timestamp>."""
    base: str | None = None
    """Training job YAML every trial starts from (relative to the working directory); None: defaults."""
    job: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the base job for every trial, nested like a train config ({train: {max_steps: 40}})."""
    space: dict[str, ParamSpec] = Field(default_factory=dict)
    """Searched parameters by dotted job key, e.g. {lora.r: {choice: [8, 16]}, train.lr: {loguniform: [1e-4, 1e-2]}}."""
    search: SearchConfig = Field(default_factory=SearchConfig)
    """Search algorithm, objective, early stopping."""
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    """Instance type, market and pricing table."""
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    """Dollar, time and trial-count limits."""

    @pydantic.field_validator("space", mode="before")
    @classmethod
    def _flatten_space(cls, value: Any) -> Any:
        """Accept nested keys too ({lora: {r: ...}}), which is what a `space.lora.r=...` override makes."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: dict) -> None:
            for key, child in node.items():
                dotted = f"{prefix}{key}"
                nested = isinstance(child, dict) and child and not set(child) & set(DISTRIBUTIONS) and all(
                    isinstance(v, dict) for v in child.values())
                if nested:
                    walk(dotted + ".", child)
                else:
                    flat[dotted] = child

        walk("", value)
        return flat

    def problems(self) -> list[tuple[str, str]]:
        """Everything checked across sections: the base job, the space, the search and the pricing."""
        out, job = self._job_problems()
        out += space_problems(self, job)
        out += pricing_problems(self.compute, job)
        if job is not None:
            out += self._schedule_problems(job)
        return out

    def job_config(self) -> TrainJobConfig:
        """The base training job with the sweep's overrides applied.

        Raises:
            ConfigError: the base file or an override is wrong (file:line of each problem).
        """
        problems, job = self._job_problems()
        if job is None or problems:
            rows = "\n".join(f"  - {key}: {msg}" for key, msg in problems)
            raise ConfigError(f"the sweep's training job is invalid:\n{rows}")
        return job

    def _job_problems(self) -> tuple[list[tuple[str, str]], TrainJobConfig | None]:
        base_data: dict[str, Any] = {}
        base_lines: dict[str, int] = {}
        if self.base is not None:
            if not Path(self.base).is_file():
                return [("base", f"{self.base!r} not found (relative to {Path.cwd()}); run from the repository root "
                                 "or give a correct path, e.g. base: configs/train/tiny.yaml")], None
            try:
                base_data, base_lines = read_yaml(self.base)
            except ConfigError as e:
                return [("base", str(e))], None
        merged = deep_merge(base_data, self.job)
        overridden = set(_dotted_keys(self.job))

        def locate(key: str, message: str) -> tuple[str, str]:
            if any(key == o or o.startswith(key + ".") or key.startswith(o + ".") for o in overridden):
                return f"job.{key}" if key else "job", message
            return "base", format_problem(self.base or "<defaults>", key, message, base_lines)

        try:
            job = TrainJobConfig.model_validate(merged)
        except pydantic.ValidationError as e:
            return [locate(*describe_problem(TrainJobConfig, err)) for err in e.errors()], None
        return [locate(key, msg) for key, msg in job.problems()], job

    def _schedule_problems(self, job: TrainJobConfig) -> list[tuple[str, str]]:
        out = []
        s, t = self.search, job.train
        if s.algorithm != "pbt" and s.asha.enabled and s.asha.grace_period_steps is not None:
            if s.asha.grace_period_steps % t.eval_every:
                out.append(("search.asha.grace_period_steps",
                            f"{s.asha.grace_period_steps} is not a multiple of train.eval_every ({t.eval_every}): "
                            "ASHA would compare stale eval losses; use a multiple of it"))
        if s.algorithm == "pbt":
            interval = s.pbt.perturbation_interval_steps or t.checkpoint_every
            if interval % t.checkpoint_every:
                out.append(("search.pbt.perturbation_interval_steps",
                            f"{interval} is not a multiple of train.checkpoint_every ({t.checkpoint_every}): "
                            "exploits would copy an old checkpoint; use a multiple of it"))
            if interval % t.eval_every:
                out.append(("search.pbt.perturbation_interval_steps",
                            f"{interval} is not a multiple of train.eval_every ({t.eval_every}): "
                            "PBT would rank trials on stale eval losses; use a multiple of it"))
        return out


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys += _dotted_keys(value, dotted + ".") if isinstance(value, dict) and value else [dotted]
    return keys
