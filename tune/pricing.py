"""Prices of what trials run on (configs/pricing/*.yaml) and a trial's dollars per hour from its worker shape.

A trial pays for its share of the nodes it occupies: GPU trials by GPUs (2 workers x 1 GPU on a
4-GPU g5.12xlarge is half the node), CPU trials by CPUs, and the ``per_worker`` pseudo types
(``cpu-worker``) per training worker. Multiplied by the trial's wall time, start-up and restarts
included, that is the trial's cost.

The sweep's ``compute:`` section (``ComputeConfig``) is defined here, next to the prices it names;
``tune.config`` imports it from here, so the dependency points one way.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationInfo, field_validator

from ftune.errors import ConfigError
from ftune.yaml_config import Section, load_config

if TYPE_CHECKING:
    from ftune.config import TrainJobConfig


class ComputeConfig(Section):
    """What a trial runs on, for cost accounting and concurrency."""

    pricing: str = "configs/pricing/local-cpu.yaml"
    """Pricing table YAML (relative to the working directory), e.g. configs/pricing/aws.yaml."""
    instance_type: str = "cpu-worker"
    """Instance type of the pricing table the trial's workers run on (e.g. g5.12xlarge)."""
    market: Literal["on_demand", "spot"] = "on_demand"
    """Pay on-demand or spot prices."""
    trial_driver_cpus: float = Field(0.5, ge=0.0)
    """CPUs reserved for each trial's driver (the Tune actor that runs the Ray Train controller)."""


class InstanceType(Section):
    """One priced machine type."""

    gpus: int = Field(0, ge=0)
    """GPUs per node."""
    cpus: int = Field(1, ge=1)
    """vCPUs per node (per worker for per_worker types)."""
    accelerator: str | None = None
    """GPU model (A10G, L4, A100, H100), for reference."""
    on_demand: float = Field(gt=0.0)
    """On-demand dollars per hour per node (per worker for per_worker types)."""
    spot: float | None = Field(None, gt=0.0)
    """Typical spot dollars per hour (spot prices move); None if not offered."""
    per_worker: bool = False
    """A pseudo type priced per training worker (CPU clusters) instead of per node."""

    @field_validator("on_demand", "spot", mode="before")
    @classmethod
    def _finite_price(cls, value: object, info: ValidationInfo) -> object:
        # An infinite or NaN price makes every cost NaN, and a NaN budget check never stops the sweep.
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return value  # not a number: pydantic says so
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{info.field_name} is not a price; write dollars per hour as a finite number > 0")
        return value


class PricingTable(Section):
    """A pricing table: instance types and their hourly prices."""

    currency: Literal["USD"] = "USD"
    """Currency of every price."""
    source: str = ""
    """Where the prices come from and when they were taken."""
    instance_types: dict[str, InstanceType] = Field(default_factory=dict)
    """Instance type name -> its GPUs, CPUs and prices."""

    def instance(self, name: str) -> InstanceType:
        """The instance type ``name``.

        Raises:
            ConfigError: the table has no such type (with a did-you-mean).
        """
        if name not in self.instance_types:
            guess = difflib.get_close_matches(name, list(self.instance_types), n=1, cutoff=0.5)
            hint = f"did you mean '{guess[0]}'? " if guess else ""
            raise ConfigError(f"unknown instance type '{name}'; {hint}known: {', '.join(sorted(self.instance_types))}")
        return self.instance_types[name]

    def price(self, name: str, market: str) -> float:
        """Dollars per hour of one node (or worker) of ``name`` on ``market`` (on_demand or spot)."""
        inst = self.instance(name)
        price = inst.spot if market == "spot" else inst.on_demand
        if price is None:
            raise ConfigError(f"instance type '{name}' has no {market} price; use compute.market=on_demand")
        return price


@dataclass(frozen=True)
class TrialShape:
    """What one trial reserves: its training workers plus its driver."""

    workers: int
    """Training workers (the maximum for elastic jobs)."""
    cpus_per_worker: float
    """CPUs each worker reserves."""
    gpus_per_worker: float
    """GPUs each worker reserves (0 on CPU)."""
    driver_cpus: float
    """CPUs of the trial's driver (Tune actor + Train controller)."""

    @classmethod
    def of(cls, job: TrainJobConfig, driver_cpus: float) -> TrialShape:
        """The shape of a trial running ``job``."""
        s = job.scaling
        return cls(s.max_workers, s.cpus_per_worker, s.gpus_per_worker if s.use_gpu else 0.0, driver_cpus)

    @property
    def cpus(self) -> float:
        """CPUs the whole trial reserves."""
        return self.workers * self.cpus_per_worker + self.driver_cpus

    @property
    def gpus(self) -> float:
        """GPUs the whole trial reserves."""
        return self.workers * self.gpus_per_worker

    def concurrency(self, cluster: dict[str, float]) -> int:
        """How many such trials fit at once in a cluster's resources (``ray.cluster_resources()``)."""
        fits = [int(cluster.get("CPU", 0) // self.cpus)] if self.cpus else []
        if self.gpus:
            fits.append(int(cluster.get("GPU", 0) // self.gpus))
        return min(fits) if fits else 1

    def nodes(self, inst: InstanceType) -> float:
        """The share of nodes (or the number of workers, for per_worker types) the trial pays for."""
        if inst.per_worker:
            return float(self.workers)
        if self.gpus:
            return self.gpus / inst.gpus
        return self.cpus / inst.cpus


def load_pricing(path: str | Path) -> PricingTable:
    """Load and validate a pricing table YAML (ConfigError with file:line on mistakes)."""
    return load_config(PricingTable, path, [])


def hourly_rate(compute: ComputeConfig, shape: TrialShape) -> float:
    """Dollars per hour one trial of ``shape`` costs on the configured instance type and market."""
    table = load_pricing(compute.pricing)
    inst = table.instance(compute.instance_type)
    return shape.nodes(inst) * table.price(compute.instance_type, compute.market)


def pricing_problems(compute: ComputeConfig, job: TrainJobConfig | None = None) -> list[tuple[str, str]]:
    """Problems of the compute section: the table, the instance type, the market, GPUs vs the job."""
    if not Path(compute.pricing).is_file():
        return [("compute.pricing", f"{compute.pricing!r} not found (relative to {Path.cwd()}); "
                                    "e.g. configs/pricing/aws.yaml or configs/pricing/local-cpu.yaml")]
    try:
        table = load_pricing(compute.pricing)
        inst = table.instance(compute.instance_type)
    except ConfigError as e:
        key = "compute.pricing" if "problem" in str(e) else "compute.instance_type"
        return [(key, str(e))]
    out = []
    if compute.market == "spot" and inst.spot is None:
        out.append(("compute.market", f"instance type '{compute.instance_type}' has no spot price in "
                                      f"{compute.pricing}; use on_demand or add spot: there"))
    if job is not None and job.scaling.use_gpu and not inst.per_worker and inst.gpus == 0:
        out.append(("compute.instance_type", f"'{compute.instance_type}' has no GPUs but the job sets "
                                             "scaling.use_gpu=true; pick a GPU type (e.g. g5.xlarge)"))
    if job is not None and not job.scaling.use_gpu and inst.gpus > 0:
        out.append(("compute.instance_type", f"'{compute.instance_type}' is a GPU type but the job trains on CPU "
                                             "(scaling.use_gpu=false); set it, or use cpu-worker / m6i.2xlarge"))
    return out
