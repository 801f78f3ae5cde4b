"""The search space: YAML parameter specs -> Optuna distributions, grids, PBT mutations and trial job overrides.

A trial's Tune config is flat, keyed by the dotted job key (``{"lora.r": 8, "train.lr": 3e-3}``);
``SearchSpace.job_overrides`` turns it into the values set on that trial's training job
(alpha derived from a ratio, list choices decoded).

A parameter spec of the ``space:`` section (``ParamSpec``) is defined here with the rules that check
it; ``tune.config`` imports both from here, so the dependency points one way.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import pydantic

from ftune.config import TrainJobConfig
from ftune.yaml_config import KNOWN_ALIASES, Section

DISTRIBUTIONS = ("choice", "loguniform", "uniform", "ratio")
"""The ways a parameter can be searched (keys of a parameter spec)."""

# Names people bring from Ray Tune / Optuna / W&B sweeps, mapped to ours for "did you mean".
DISTRIBUTION_ALIASES = {
    "categorical": "choice",
    "values": "choice",
    "grid_search": "choice",
    "log_uniform": "loguniform",
    "log_uniform_values": "loguniform",
    "reciprocal": "loguniform",
    "float": "uniform",
    "randu": "uniform",
}


class ParamSpec(Section):
    """How one hyperparameter is searched: exactly one of the distributions below."""

    choice: list[Any] | None = None
    """Pick one of these values (categorical), e.g. [8, 16, 32]."""
    loguniform: tuple[float, float] | None = None
    """[low, high]: sampled uniformly in log space (learning rates)."""
    uniform: tuple[float, float] | None = None
    """[low, high]: sampled uniformly."""
    ratio: float | list[float] | None = None
    """lora.alpha only: alpha = ratio x lora.r (e.g. 2); a list of ratios is searched."""

    @pydantic.model_validator(mode="before")
    @classmethod
    def _one_known_distribution(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"write a mapping with one of {', '.join(DISTRIBUTIONS)}, e.g. {{choice: [8, 16]}}")
        data = {k: v for k, v in data.items() if v is not None}  # a dumped spec lists the unset ones as null

        for key in data:
            if key not in DISTRIBUTIONS:
                guess = DISTRIBUTION_ALIASES.get(str(key)) or next(
                    iter(difflib.get_close_matches(str(key), DISTRIBUTIONS, n=1, cutoff=0.5)), None
                )
                hint = f"did you mean '{guess}'? " if guess else ""
                raise ValueError(f"unknown distribution '{key}'; {hint}use one of {', '.join(DISTRIBUTIONS)}")
        if len(data) != 1:
            raise ValueError(f"give exactly one distribution, got {len(data)}: {', '.join(map(str, data)) or 'none'}")
        return data

    @pydantic.model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.choice is not None and not self.choice:
            raise ValueError("choice is empty; list at least one value, e.g. {choice: [8, 16]}")
        for name in ("loguniform", "uniform"):
            bounds = getattr(self, name)
            if bounds is not None:
                low, high = bounds
                if low >= high:
                    raise ValueError(f"{name} low {low:g} >= high {high:g}; write [low, high] with low < high")
                if name == "loguniform" and low <= 0:
                    raise ValueError(f"loguniform needs low > 0 (got {low:g}); use uniform for ranges that include 0")
        if self.ratio is not None:
            ratios = self.ratio if isinstance(self.ratio, list) else [self.ratio]
            if not ratios or any(r <= 0 for r in ratios):
                raise ValueError(f"ratio must be a positive number or a non-empty list of them, got {self.ratio!r}")
        return self

    @property
    def kind(self) -> str:
        """The distribution set in this spec."""
        return next(name for name in DISTRIBUTIONS if getattr(self, name) is not None)


class PbtSettings(Protocol):
    """The part of ``search.pbt`` the space reads."""

    @property
    def mutate(self) -> list[str] | None: ...


class SearchSettings(Protocol):
    """The part of ``search`` the space reads."""

    @property
    def algorithm(self) -> str: ...

    @property
    def pbt(self) -> PbtSettings: ...


class SweepSpace(Protocol):
    """What this module reads of a sweep config; ``tune.config.SweepConfig`` is one.

    Typed by shape rather than by class because ``tune.config`` imports this module to check the
    space it declares, and the dependency points one way only.
    """

    @property
    def space(self) -> dict[str, ParamSpec]: ...

    @property
    def search(self) -> SearchSettings: ...


SEARCHABLE = (
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.use_dora",
    "lora.use_rslora",
    "train.lr",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.lr_schedule",
    "train.max_grad_norm",
    "train.seed",
)
"""Job keys a sweep may search (the rest would change data, batch shape or trial length)."""

CONTINUOUS = ("lora.alpha", "lora.dropout", "train.lr", "train.weight_decay", "train.warmup_ratio", "train.max_grad_norm")
"""Searchable keys that take uniform / loguniform ranges (the others are categorical: use choice)."""

MUTABLE = ("train.lr", "lora.alpha", "lora.dropout", "train.weight_decay")
"""Keys PBT may perturb: they change no weight shapes, so a donor's checkpoint still fits."""

ALPHA_PER_R = "lora.alpha_per_r"
"""Tune config key of a searched alpha/r ratio (alpha itself is derived in the trial)."""


def _adapter(dotted: str) -> pydantic.TypeAdapter:
    """A validator for one job field, constraints (ge, le, ...) included."""
    section, name = dotted.split(".")
    info = TrainJobConfig.model_fields[section].annotation.model_fields[name]
    if not info.metadata:
        return pydantic.TypeAdapter(info.annotation)
    return pydantic.TypeAdapter(Annotated[(info.annotation, *info.metadata)])


def _encode(value: Any) -> Any:
    """Optuna choices must be scalars: lists (target_modules) become comma-joined strings."""
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _suggest_key(key: str) -> str | None:
    last = key.rsplit(".", 1)[-1]
    alias = KNOWN_ALIASES.get(last, last)
    by_name = [k for k in SEARCHABLE if k.endswith("." + alias)]
    if by_name:
        return by_name[0]
    guess = difflib.get_close_matches(key, SEARCHABLE, n=1, cutoff=0.6)
    return guess[0] if guess else None


def space_problems(cfg: SweepSpace, job: TrainJobConfig | None) -> list[tuple[str, str]]:
    """Every problem of the space and its fit with the search algorithm, as (dotted key, message)."""
    out: list[tuple[str, str]] = []
    if not cfg.space:
        return [("space", "is empty; declare at least one parameter, e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}")]
    for key, spec in cfg.space.items():
        where = f"space.{key}"
        if key not in SEARCHABLE:
            guess = _suggest_key(key)
            hint = f"did you mean '{guess}'? " if guess else ""
            out.append((where, f"unknown parameter '{key}'; {hint}searchable: {', '.join(SEARCHABLE)}"))
            continue
        kind = spec.kind
        if kind == "ratio":
            if key != "lora.alpha":
                out.append((where, "ratio only applies to lora.alpha (alpha = ratio x lora.r); use choice here"))
            elif "lora.r" not in cfg.space:
                out.append((where, "ratio without lora.r in the space: add lora.r: {choice: [8, 16]} "
                                   "or, with a fixed rank, set lora.alpha directly (job: {lora: {alpha: 32}})"))
            elif isinstance(spec.ratio, list):
                out += _repeated(where, [float(r) for r in spec.ratio])
            continue
        if kind in ("loguniform", "uniform") and key not in CONTINUOUS:
            out.append((where, f"{key} is not continuous; use choice, e.g. {{choice: [...]}}"))
            continue
        adapter = _adapter(key)
        values = spec.choice if kind == "choice" else list(getattr(spec, kind))
        valid = []
        for value in values:
            try:
                valid.append(_encode(adapter.validate_python(value)))
            except pydantic.ValidationError as e:
                msg = e.errors()[0]["msg"]
                out.append((where, f"{value!r} is not a valid {key}: {msg}"))
        if kind == "choice":
            out += _repeated(where, valid)
    if cfg.search.algorithm == "pbt":
        out += _pbt_problems(cfg)
    return out


def _repeated(where: str, values: list[Any]) -> list[tuple[str, str]]:
    """A problem naming the values a choice lists more than once (a grid would train each of them twice)."""
    seen: list[Any] = []
    repeated: list[Any] = []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.append(value)
    if not repeated:
        return []
    listed = ", ".join(format_value(v) for v in repeated)
    message = (f"lists {listed} more than once; give each value once (grid search would train the same setting "
               "twice, TPE and random would favour it)")
    return [(where, message)]


def pbt_mutated(cfg: SweepSpace) -> list[str]:
    """The job keys PBT perturbs: search.pbt.mutate, else train.lr and lora.alpha where they are searched."""
    if cfg.search.pbt.mutate is not None:
        return list(cfg.search.pbt.mutate)
    searched = [k for k in ("train.lr", "lora.alpha") if k in cfg.space]
    return [k for k in searched if not (cfg.space[k].kind == "ratio" and not isinstance(cfg.space[k].ratio, list))]


def _pbt_problems(cfg: SweepSpace) -> list[tuple[str, str]]:
    where = "search.pbt.mutate"
    mutate = pbt_mutated(cfg)
    if not mutate:
        return [("search.algorithm", "pbt needs train.lr and/or lora.alpha (as choice, a range or a list of ratios) "
                                     "in the space to perturb; add e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}")]
    out = []
    for key in mutate:
        if key == "lora.r":
            out.append((where, "PBT cannot mutate lora.r: weights cannot move between ranks. Keep the rank fixed "
                               "within a population (remove lora.r from search.pbt.mutate; lora.r in the space only "
                               "seeds the population, and an exploiting trial takes its donor's rank with its weights)"))
        elif key not in MUTABLE:
            out.append((where, f"PBT cannot mutate {key} (it changes weight shapes or the run); mutable: {', '.join(MUTABLE)}"))
        elif key not in cfg.space:
            out.append((where, f"{key} is not in the space; add it there (e.g. {key}: {{loguniform: [...]}}) to mutate it"))
        elif cfg.space[key].kind == "ratio" and not isinstance(cfg.space[key].ratio, list):
            out.append((where, f"{key} is a fixed ratio; give a list (ratio: [1, 2, 4]) for PBT to perturb it"))
    return out


@dataclass(frozen=True)
class Dimension:
    """One searched axis of the Tune config."""

    key: str
    """Tune config key: the dotted job key (or lora.alpha_per_r)."""
    kind: str
    """choice, loguniform or uniform."""
    values: tuple = ()
    """choice: values as Tune and Optuna see them (lists comma-joined)."""
    originals: tuple = ()
    """choice: the values as the job takes them."""
    low: float = 0.0
    """Range start (loguniform/uniform)."""
    high: float = 0.0
    """Range end (loguniform/uniform)."""

    def decode(self, value: Any) -> Any:
        """The job value of a Tune config value."""
        if self.kind == "choice" and value in self.values:
            return self.originals[self.values.index(value)]
        return value

    def grid_values(self, points: int) -> list[Any]:
        """Values of this axis in a grid search."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "loguniform":
            step = (math.log(self.high) - math.log(self.low)) / (points - 1)
            return [float(f"{math.exp(math.log(self.low) + i * step):.6g}") for i in range(points)]
        return [float(f"{self.low + i * (self.high - self.low) / (points - 1):.6g}") for i in range(points)]


@dataclass(frozen=True)
class SearchSpace:
    """The validated space of a sweep (build it from a config that passed ``load_config``)."""

    dims: tuple[Dimension, ...]
    """Searched axes."""
    alpha_ratio: float | None = None
    """A fixed alpha / r ratio (alpha: {ratio: 2}), applied to every trial."""

    @classmethod
    def from_config(cls, cfg: SweepSpace) -> SearchSpace:
        """Build the space (values coerced to the job's field types)."""
        dims, alpha_ratio = [], None
        for key, spec in cfg.space.items():
            if spec.kind == "ratio":
                if isinstance(spec.ratio, list):
                    dims.append(Dimension(ALPHA_PER_R, "choice", tuple(spec.ratio), tuple(spec.ratio)))
                else:
                    alpha_ratio = float(spec.ratio)
                continue
            adapter = _adapter(key)
            if spec.kind == "choice":
                originals = tuple(adapter.validate_python(v) for v in spec.choice)
                dims.append(Dimension(key, "choice", tuple(_encode(v) for v in originals), originals))
            else:
                low, high = (float(v) for v in getattr(spec, spec.kind))
                dims.append(Dimension(key, spec.kind, low=low, high=high))
        return cls(tuple(dims), alpha_ratio)

    def dim(self, key: str) -> Dimension:
        """The axis of a Tune config key (lora.alpha maps to its ratio axis when alpha is a ratio)."""
        for d in self.dims:
            if d.key == key or (key == "lora.alpha" and d.key == ALPHA_PER_R):
                return d
        raise KeyError(key)

    def optuna_distributions(self) -> dict[str, Any]:
        """Optuna distributions for OptunaSearch (tpe, random, pbt's initial population)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        out = {}
        for d in self.dims:
            if d.kind == "choice":
                out[d.key] = CategoricalDistribution(list(d.values))
            else:
                out[d.key] = FloatDistribution(d.low, d.high, log=d.kind == "loguniform")
        return out

    def tune_space(self) -> dict[str, Any]:
        """The space as Ray Tune domains (PBT's initial population, which Tune samples itself)."""
        import ray.tune as ray_tune

        out: dict[str, Any] = {}
        for d in self.dims:
            if d.kind == "choice":
                out[d.key] = ray_tune.choice(list(d.values))
            elif d.kind == "loguniform":
                out[d.key] = ray_tune.loguniform(d.low, d.high)
            else:
                out[d.key] = ray_tune.uniform(d.low, d.high)
        return out

    def grid(self, points: int) -> dict[str, list[Any]]:
        """Every axis as a list of values (Optuna's GridSampler takes the product)."""
        return {d.key: d.grid_values(points) for d in self.dims}

    def grid_size(self, points: int) -> int:
        """Number of points in the grid."""
        return math.prod(len(v) for v in self.grid(points).values())

    def grid_distributions(self, points: int) -> dict[str, Any]:
        """Categorical distributions over the grid values (what GridSampler samples from)."""
        from optuna.distributions import CategoricalDistribution

        return {key: CategoricalDistribution(values) for key, values in self.grid(points).items()}

    def pbt_mutations(self, keys: list[str]) -> dict[str, Any]:
        """PBT's hyperparam_mutations for the given job keys (lora.alpha -> its ratio axis if any)."""
        import ray.tune as ray_tune

        out: dict[str, Any] = {}
        for key in keys:
            d = self.dim(key)
            if d.kind == "choice":
                out[d.key] = list(d.values)
            elif d.kind == "loguniform":
                out[d.key] = ray_tune.loguniform(d.low, d.high)
            else:
                out[d.key] = ray_tune.uniform(d.low, d.high)
        return out

    def job_overrides(self, config: dict[str, Any], base_r: int) -> dict[str, Any]:
        """Dotted job key -> value for a trial's Tune config (alpha derived from a ratio)."""
        out: dict[str, Any] = {}
        for d in self.dims:
            if d.key != ALPHA_PER_R and d.key in config:
                out[d.key] = d.decode(config[d.key])
        r = int(out.get("lora.r", base_r))
        if ALPHA_PER_R in config:
            out["lora.alpha"] = float(config[ALPHA_PER_R]) * r
        elif self.alpha_ratio is not None:
            out["lora.alpha"] = self.alpha_ratio * r
        return out

    def describe(self, config: dict[str, Any], base_r: int) -> str:
        """Short human form of a trial's settings, e.g. ``r=8 alpha=16 lr=3.0e-03``."""
        return " ".join(f"{key.split('.', 1)[1]}={format_value(value)}" for key, value in self.job_overrides(config, base_r).items())


def format_value(value: Any) -> str:
    """Compact rendering of a parameter value (3 significant digits for floats)."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)
