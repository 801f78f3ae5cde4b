"""Typed configuration of a training job: one section per concern, a docstring per field.

Every job (train, sweep, serve) embeds these sections; ``load_config`` in ``ftune.yaml_config``
builds them from YAML plus ``section.key=value`` overrides and reports all problems together.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import pydantic
from pydantic import Field

from ftune.yaml_config import Section

Precision = Literal["auto", "bf16", "fp16", "fp32"]


class ModelConfig(Section):
    """The base model and how it is loaded."""

    name_or_path: str = "builtin:tiny-llama"
    """Hugging Face hub id, local directory, or s3://bucket/prefix (what save_pretrained wrote; fetched once
    per node into the node's model cache, $FTUNE_MODEL_CACHE) passed to from_pretrained; builtin:tiny-llama
    is built locally."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for an s3:// name_or_path (MinIO, a local server); None: AWS_ENDPOINT_URL,
    else AWS."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load; None for the default branch."""
    load_in_4bit: bool = False
    """QLoRA: quantize the frozen base weights to 4 bits with bitsandbytes."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type for QLoRA (NF4 is what the QLoRA paper uses)."""
    bnb_4bit_double_quant: bool = True
    """QLoRA double quantization: also quantize the quantization constants."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel used by transformers."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off by default because it runs arbitrary code."""


class LoraConfig(Section):
    """The adapter trained on top of the frozen base model."""

    r: int = Field(8, ge=1, le=1024)
    """LoRA rank: the inner dimension of the low-rank update."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout applied to the adapter's input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]); all-linear adapts every linear layer but the LM head."""
    use_rslora: bool = False
    """Rank-stabilized LoRA scaling (alpha / sqrt(r))."""
    use_dora: bool = False
    """DoRA: weight-decomposed LoRA (magnitude and direction trained separately)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained along with the adapter."""


class DataConfig(Section):
    """The instruction dataset and how it is tokenized."""

    path: str = "builtin:sample-instructions"
    """Training data: a .jsonl/.json/.txt/.parquet file, a save_to_disk directory, or builtin:sample-instructions."""
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    """Row schema: alpaca (instruction/input/output), chat (messages), text; auto detects from the first row."""
    validation_path: str | None = None
    """Separate validation file; when None a seeded fraction of the training data is held out."""
    validation_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    """Share of rows held out for evaluation when no validation_path is given."""
    max_validation_rows: int | None = Field(256, ge=1)
    """Cap on held-out rows so evaluation stays cheap; None keeps them all."""
    seed: int = 0
    """Seed of the train/validation split."""
    max_seq_len: int = Field(512, ge=8)
    """Examples longer than this many tokens are truncated (and counted)."""
    packing: bool = False
    """Concatenate examples into full max_seq_len sequences (fewer pad tokens, faster)."""
    mask_prompt: bool = True
    """Exclude prompt tokens from the loss (label -100) for instruction and chat data."""
    skip_bad_rows: bool = False
    """Skip malformed rows and report them instead of failing on the first one."""
    max_rows: int | None = Field(None, ge=1)
    """Use only the first N rows of the training file (quick experiments)."""


class TrainConfig(Section):
    """The optimisation loop."""

    lr: float = Field(2e-4, gt=0.0, le=1.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    epochs: int = Field(1, ge=1)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; None runs `epochs` full passes."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples per worker per forward/backward pass."""
    global_batch_size: int = Field(16, ge=1)
    """Examples per optimizer step over all workers; gradient accumulation is derived from it."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Share of the steps spent warming the learning rate up linearly from 0."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    """Gradient clipping norm; None disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    precision: Precision = "auto"
    """auto: bf16 on GPUs that support it, fp32 on CPU."""
    seed: int = 42
    """Seed of weight init, dropout and data order: the same seed gives the same run."""
    eval_every: int = Field(50, ge=1)
    """Evaluate every N optimizer steps (and always at the end)."""
    eval_batches: int | None = Field(None, ge=1)
    """Cap on evaluation batches per evaluation; None evaluates the whole validation set."""
    exact_match_examples: int = Field(32, ge=0)
    """Validation examples with references to generate greedily for the exact-match score (0 disables)."""
    checkpoint_every: int = Field(50, ge=1)
    """Save a checkpoint every N optimizer steps (and always at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept by Ray (the best by eval loss)."""
    report_interval_s: float = Field(2.0, ge=0.0)
    """Seconds between ray.train.report calls (each carries every step since the last). Ray Train's
    controller collects one report per worker every failure.poll_interval_s, so reporting more often
    only blocks the workers."""
    preemption_check_interval_s: float = Field(1.0, ge=0.0)
    """Seconds between ray.train.get_preemption_info checks (0: every step). Ray polls notices every 5 s."""


class ScalingConfig(Section):
    """How many workers train and what each one gets."""

    num_workers: int | tuple[int, int] = 1
    """Workers (one per GPU); [min, max] makes the job elastic."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) instead of CPUs (gloo)."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per worker."""
    gpus_per_worker: float = Field(1.0, ge=0.0)
    """GPUs reserved per worker when use_gpu is set."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra custom resources per worker, e.g. {spot: 1} to land on spot nodes."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement group strategy for the worker group."""
    accelerator_type: str | None = None
    """Ray accelerator type the workers need (e.g. A10G, H100); None for any."""
    elastic_resize_interval_s: float = Field(60.0, gt=0.0)
    """Elastic jobs: how often Ray checks whether more workers fit and grows the group back."""
    torch_threads: int | None = Field(None, ge=1)
    """torch intra-op threads per worker; None uses cpus_per_worker."""

    @pydantic.field_validator("num_workers")
    @classmethod
    def _check_workers(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("need num_workers >= 1, or [min, max] with 1 <= min <= max")
        return value

    @property
    def min_workers(self) -> int:
        """Smallest worker group the job may run with."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """Largest worker group the job may run with."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]


class DeepSpeedConfig(Section):
    """DeepSpeed engine settings; the JSON config is generated from these and the train section."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 2 partitions optimizer state and gradients across workers."""
    config_file: str | None = None
    """A DeepSpeed JSON (e.g. configs/deepspeed/zero2.json) merged under the generated config."""
    overlap_comm: bool = True
    """Overlap gradient reduction with the backward pass."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced."""
    reduce_bucket_size: int = Field(50_000_000, ge=1)
    """Elements per gradient reduction bucket."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload)."""


class StorageConfig(Section):
    """Where runs, checkpoints and adapters are written."""

    path: str = "~/ftune_runs"
    """Local directory, shared filesystem path, or s3://bucket/prefix."""
    endpoint_url: str | None = None
    """S3-compatible endpoint for s3:// paths (MinIO, a local server); None for AWS."""
    region: str | None = None
    """Region of the s3:// bucket (e.g. eu-west-1); None: ?region= on the path, else AWS_REGION, else
    AWS_DEFAULT_REGION, else the region S3 reports for the bucket."""


class FailureConfig(Section):
    """How many failures a job survives."""

    max_failures: int = Field(3, ge=-1)
    """Worker or node failures to restart from the last checkpoint (-1: unlimited)."""
    max_preemption_failures: int = Field(10, ge=-1)
    """Spot preemptions to restart from (counted apart from other failures; -1: unlimited)."""
    poll_interval_s: float = Field(0.5, gt=0.0)
    """How often Ray Train's controller collects the workers' reports and checks their health (sets
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; Ray's default is 2 s). A checkpoint counts once it is collected, so
    a fault within one poll of a checkpoint resumes from the one before, and after a preemption notice
    each step waits for its just-in-time checkpoint to be collected."""
    worker_start_timeout_s: float = Field(60.0, gt=0.0)
    """How long a worker group waits for its resources before the attempt fails (sets
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S). An elastic job that lost a node first retries at its old
    size: this is how long it waits for a replacement before it continues on the workers that fit."""


class TrackingConfig(Section):
    """Experiment tracking."""

    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when WANDB_API_KEY is set, else offline files in the run directory."""
    project: str = "ftune"
    """wandb project name."""
    entity: str | None = None
    """wandb entity (team or user)."""
    group: str | None = None
    """wandb group (sweeps group their trials by sweep name)."""
    tags: list[str] = Field(default_factory=list)
    """wandb tags."""


RESUMABLE_TRAIN_FIELDS = {
    "max_steps", "epochs", "eval_every", "eval_batches", "exact_match_examples", "checkpoint_every",
    "keep_checkpoints", "report_interval_s", "preemption_check_interval_s",
}
"""Train fields a resumed run may change: how long it runs and how often it evaluates, reports, checkpoints."""


class TrainJobConfig(Section):
    """A complete training job: `python -m train --config FILE [section.key=value ...]`."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Run name: the run directory under storage.path; re-running the same name resumes it."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Base model."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """Adapter."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Dataset."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Optimisation."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """Workers."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Storage."""
    failure: FailureConfig = Field(default_factory=FailureConfig)
    """Fault tolerance."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-section checks, as (dotted key, message) pairs."""
        out = []
        t, s = self.train, self.scaling
        for world in sorted({s.min_workers, s.max_workers}):
            per_step = t.micro_batch_size * world
            if t.global_batch_size % per_step:
                out.append(
                    (
                        "train.global_batch_size",
                        f"{t.global_batch_size} is not a multiple of micro_batch_size "
                        f"({t.micro_batch_size}) x workers ({world}) = {per_step}; pick a multiple, "
                        "e.g. " + str(per_step * max(1, round(t.global_batch_size / per_step))),
                    )
                )
        if self.deepspeed.config_file is not None and not self.deepspeed.config_file.endswith(".json"):
            out.append(("deepspeed.config_file", f"{self.deepspeed.config_file!r} must be a .json file"))
        return out

    def fingerprint(self) -> str:
        """Hash of what a checkpoint's weights and optimizer state depend on: model, lora, data, train.

        Left out: storage, tracking, workers, the endpoint the model is fetched from, and the run length
        and cadences (``RESUMABLE_TRAIN_FIELDS``), so a run re-started under its name may train for more
        steps; its learning-rate schedule then spans the new length.
        """
        relevant = self.model_dump(
            mode="json", include={"model", "lora", "data", "train"},
            exclude={"train": RESUMABLE_TRAIN_FIELDS, "model": {"endpoint_url"}},
        )
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
