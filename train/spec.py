"""The run spec: everything a training run's workers get, built once in the driver for a job or a sweep trial.

``train.job.prepare`` checks a job and builds its ``RunSpec`` and ``RunData``; a sweep trial builds
its spec with ``RunSpec.of`` from its own job and the sweep's shared, already prepared data.
``train.job.build_trainer`` puts the data in the object store and hands the workers a copy of the
spec pointing at it (``data``), with the run's start checkpoint, stop signal and phase timer.
The spec is pickled to every worker: it holds the job as plain JSON and small values only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftune.config import TrainConfig, TrainJobConfig
from ftune.storage import Storage
from train.batching import BatchPlan
from train.phases import PhaseTimer

if TYPE_CHECKING:
    from ftune.data import Example


@dataclass(frozen=True)
class RunData:
    """The tokenized examples of a run (shipped to workers through the object store, not in the spec)."""

    train: list[Example]
    validation: list[Example]


def total_steps(train: TrainConfig, train_examples: int) -> int:
    """Optimizer steps of a whole run: ``max_steps``, or ``epochs`` full passes over the training examples."""
    plan = BatchPlan(train_examples, train.global_batch_size, train.micro_batch_size, train.seed)
    return train.max_steps or train.epochs * plan.steps_per_epoch


def run_staging_dir(storage: Storage, name: str) -> Path:
    """Where rank 0 writes a run's files: the run directory itself, or a staging copy under FTUNE_HOME for s3://."""
    from ftune.builtin_assets import ftune_home

    return ftune_home() / "staging" / name if storage.is_remote else Path(storage.uri) / name


@dataclass(frozen=True)
class RunSpec:
    """One training run as its workers see it."""

    job: dict[str, Any]
    """The run's ``TrainJobConfig`` in JSON form (workers rebuild the typed config from it)."""
    name: str
    """Run name: its directory under ``storage_uri``."""
    fingerprint: str
    """Config fingerprint its checkpoints are stamped with (a resume under another config is refused)."""
    deepspeed_user: dict[str, Any] | None
    """The user's DeepSpeed JSON, read by the driver (workers may not see the same files)."""
    storage_uri: str
    """Where the run's directory lives (a local path or s3://)."""
    endpoint_url: str | None
    """The S3 endpoint of ``storage_uri``, if any."""
    local_run_dir: str
    """Where rank 0 writes the run's files (the run directory, or a staging copy for s3://)."""
    adapter_uri: str
    """Where the exported adapter ends up."""
    train_examples: int
    """Number of training examples (the run's length follows from it)."""
    data: Any = None
    """Object reference of the run's ``RunData`` (set by ``build_trainer``)."""
    init_checkpoint: str | None = None
    """Checkpoint path (inside the storage filesystem) to start from while the run has none of its own."""
    adopt: bool = False
    """``init_checkpoint`` comes from a run with other hyperparameters (PBT exploit): this config's learning rate."""
    stop_signal: Any = None
    """A ``train.stop.StopSignal`` actor handle: once raised the run checkpoints and finishes early."""
    phase_timer: PhaseTimer | None = None
    """Told the start and end of each phase of the workers' run (see train/phases.py)."""
    baseline_key: str | None = None
    """Key under which the run shares its before-training metrics with runs that would measure the same
    (a sweep's trials; see train/baseline.py); None: it neither shares nor reads them."""
    baseline_eval: dict[str, Any] | None = None
    """The before-training metrics another run measured under ``baseline_key`` (``{"metrics", "run"}``),
    recorded as this run's step 0 instead of evaluating; None: the run evaluates."""

    @classmethod
    def of(cls, cfg: TrainJobConfig, name: str, *, deepspeed_user: dict[str, Any] | None,
           train_examples: int) -> RunSpec:
        """The spec of job ``cfg`` running as ``name`` on ``train_examples`` prepared examples."""
        storage = Storage.from_config(cfg.storage)
        return cls(
            job=cfg.model_dump(mode="json"),
            name=name,
            fingerprint=cfg.fingerprint(),
            deepspeed_user=deepspeed_user,
            storage_uri=storage.uri,
            endpoint_url=storage.endpoint_url,
            local_run_dir=str(run_staging_dir(storage, name)),
            adapter_uri=storage.uri_of(name, "adapter"),
            train_examples=train_examples,
        )

    def config(self) -> TrainJobConfig:
        """The typed job config."""
        return TrainJobConfig.model_validate(self.job)

    def storage(self) -> Storage:
        """The storage the run's directory lives in."""
        return Storage(self.storage_uri, self.endpoint_url)

    @property
    def run_dir(self) -> Path:
        """``local_run_dir`` as a path."""
        return Path(self.local_run_dir)

    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return total_steps(self.config().train, self.train_examples)

    def replace(self, **changes: Any) -> RunSpec:
        """A copy with ``changes`` (the spec itself never changes)."""
        return dataclasses.replace(self, **changes)
