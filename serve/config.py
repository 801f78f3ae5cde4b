"""Typed configuration of a serving application: the ``args`` of a Ray Serve config file.

``configs/serve/*.yaml`` are Ray Serve config files (``serve run``/``serve deploy`` read them); the
``args`` mapping of the ftune application is validated here, so a typo fails with the file, line and
a "did you mean" before any replica starts. Replica settings (autoscaling, queue limits, CPUs) live in
``args`` too and are turned into Serve deployment options by ``deployment_options``: one source of
truth, checked, instead of a separate ``deployments:`` override that nothing validates.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import Field

from ftune.config import ModelConfig, Precision
from ftune.errors import ConfigError
from ftune.yaml_config import Section, _describe_error, _report, apply_overrides

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""What an adapter (and so an OpenAI model id) may be called: it is only ever a registry key."""
RESERVED_NAMES = frozenset({"__base__"})
"""peft's name for "no adapter" in a mixed batch."""


class BatchingConfig(Section):
    """Serve's dynamic batching (``@serve.batch``); one batch may mix adapters."""

    max_batch_size: int = Field(8, ge=1, le=256)
    """Requests decoded together, whatever adapters they use."""
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)
    """How long the first request of a batch waits for more before decoding starts."""
    max_concurrent_batches: int = Field(1, ge=1, le=16)
    """Batches a replica decodes at once (their steps interleave); more lowers the wait of late arrivals."""


class AutoscalingConfig(Section):
    """Serve autoscaling of the model replicas on ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0)
    """Replicas kept however idle the service is (0 allows scale to zero, with a cold start)."""
    max_replicas: int = Field(1, ge=1)
    """Upper bound on replicas, each holding its own copy of the base model."""
    target_ongoing_requests: float = Field(4.0, gt=0.0)
    """Ongoing requests per replica the autoscaler aims for."""
    upscale_delay_s: float = Field(10.0, ge=0.0)
    """How long demand must stay above target before replicas are added."""
    downscale_delay_s: float = Field(60.0, ge=0.0)
    """How long demand must stay below target before replicas are removed."""
    look_back_period_s: float = Field(10.0, gt=0.0)
    """Window over which ongoing requests are averaged."""
    metrics_interval_s: float = Field(2.0, gt=0.0)
    """How often replicas report their ongoing requests."""


class LimitsConfig(Section):
    """What one request may ask for, and how much work a replica accepts."""

    max_tokens: int = Field(256, ge=1)
    """Largest max_tokens a request may ask for; more is a 400."""
    default_max_tokens: int = Field(64, ge=1)
    """max_tokens of a request that sets none."""
    max_context_tokens: int | None = Field(None, ge=2)
    """Prompt plus completion tokens per request; None uses the model's max_position_embeddings."""
    max_stop_sequences: int = Field(4, ge=0)
    """Stop strings a request may give (OpenAI allows 4)."""
    max_request_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body; more is a 413."""
    max_ongoing_requests: int = Field(16, ge=1)
    """Requests one replica works on at once (Serve's max_ongoing_requests); at least a full batch."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests waiting for a free replica before new ones get HTTP 503 at once (-1: unbounded)."""


class ResourcesConfig(Section):
    """What each replica reserves on the cluster."""

    num_cpus: float = Field(0.5, gt=0.0)
    """CPUs per replica (Ray's num_cpus)."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per replica; fractions let several replicas share one GPU."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads per replica; keep it near num_cpus."""


class AdapterStorageConfig(Section):
    """Where adapters given as s3:// URIs come from and are cached."""

    cache_dir: str | None = None
    """Local directory s3:// adapters are downloaded to; None uses $FTUNE_HOME/adapter-cache."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, a local server); None uses AWS_ENDPOINT_URL or AWS itself."""


class ServingConfig(Section):
    """One OpenAI-compatible application: a base model, named LoRA adapters, batching and scaling."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """Base model every replica loads once."""
    base_model_id: str = Field("base", pattern=ADAPTER_NAME.pattern)
    """OpenAI model id that selects the base model without any adapter."""
    adapters: dict[str, str] = Field(default_factory=dict)
    """OpenAI model id -> adapter directory (local path or s3://bucket/prefix) in PEFT format."""
    max_adapters_per_replica: int = Field(8, ge=1)
    """Adapters a replica keeps loaded; the least recently used is unloaded to make room."""
    precision: Precision = "auto"
    """Weights dtype: auto is bf16 on GPUs that support it, fp32 on CPU."""
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Environment variable holding the API key clients must send as a Bearer token; None: no key."""
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    """Dynamic batching."""
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    """Replica autoscaling."""
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    """Request and queue limits."""
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    """Per-replica resources."""
    storage: AdapterStorageConfig = Field(default_factory=AdapterStorageConfig)
    """Remote adapter storage."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks, as (dotted key, message) pairs."""
        out = []
        for name in self.adapters:
            if not ADAPTER_NAME.match(name) or name in RESERVED_NAMES:
                out.append(
                    (
                        f"adapters.{name}",
                        "adapter names are OpenAI model ids: 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit",
                    )
                )
            if name == self.base_model_id:
                out.append((f"adapters.{name}", f"clashes with base_model_id {name!r}; rename the adapter"))
        for name, source in self.adapters.items():
            if not source.strip():
                out.append((f"adapters.{name}", "empty path; give an adapter directory or s3://bucket/prefix"))
        if self.limits.default_max_tokens > self.limits.max_tokens:
            out.append(
                (
                    "limits.default_max_tokens",
                    f"{self.limits.default_max_tokens} is above limits.max_tokens ({self.limits.max_tokens})",
                )
            )
        concurrent = self.batching.max_batch_size * self.batching.max_concurrent_batches
        if self.limits.max_ongoing_requests < concurrent:
            out.append(
                (
                    "limits.max_ongoing_requests",
                    f"{self.limits.max_ongoing_requests} cannot fill a batch: it must be at least "
                    f"batching.max_batch_size x max_concurrent_batches = {concurrent}",
                )
            )
        if self.autoscaling.min_replicas > self.autoscaling.max_replicas:
            out.append(
                (
                    "autoscaling.min_replicas",
                    f"{self.autoscaling.min_replicas} is above autoscaling.max_replicas "
                    f"({self.autoscaling.max_replicas})",
                )
            )
        return out

    @property
    def model_ids(self) -> list[str]:
        """Every OpenAI model id served: the base model first, then the adapters."""
        return [self.base_model_id, *self.adapters]


def validate_serving_args(
    args: dict[str, Any],
    *,
    source: str = "serve.app:build_app args",
    lines: dict[str, int] | None = None,
    overrides: list[str] | None = None,
) -> ServingConfig:
    """Build a ServingConfig from an application's ``args``, reporting every problem at once.

    Args:
        args: The ``args`` mapping of the application (not modified).
        source: Where the args came from, for messages (a file name or a description).
        lines: Line number of each dotted key inside ``args``, when they come from a file.
        overrides: ``key=value`` strings applied on top (e.g. ``limits.max_tokens=64``).

    Raises:
        ConfigError: naming each bad key with its location, value and fix.
    """
    if not isinstance(args, dict):
        raise ConfigError(f"{source}: args must be a mapping of ServingConfig fields, got {type(args).__name__}")
    data = _deep_copy(args)
    origins = apply_overrides(data, list(overrides or []))
    try:
        config = ServingConfig.model_validate(data)
    except pydantic.ValidationError as e:
        problems = [_describe_error(ServingConfig, err) for err in e.errors()]
        raise ConfigError(_report(source, problems, lines or {}, origins)) from None
    problems = config.problems()
    if problems:
        raise ConfigError(_report(source, problems, lines or {}, origins))
    return config


def deployment_options(config: ServingConfig) -> dict[str, Any]:
    """Serve deployment options (``Deployment.options(**...)``) derived from the typed config."""
    a = config.autoscaling
    return {
        "max_ongoing_requests": config.limits.max_ongoing_requests,
        "max_queued_requests": config.limits.max_queued_requests,
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
            "metrics_interval_s": a.metrics_interval_s,
        },
        "ray_actor_options": {"num_cpus": config.resources.num_cpus, "num_gpus": config.resources.num_gpus},
    }


class ServeApplication(pydantic.BaseModel):
    """The parts of one ``applications:`` entry of a Serve config file that ftune reads."""

    model_config = pydantic.ConfigDict(extra="allow")

    name: str = "default"
    route_prefix: str | None = "/"
    import_path: str
    args: dict[str, Any] = Field(default_factory=dict)


def read_serve_config_file(
    path: str | Path, app_name: str | None = None
) -> tuple[ServeApplication, dict[str, Any], dict[str, int]]:
    """Read a Ray Serve config file and pick the ftune application in it.

    Returns:
        The application entry, the file's ``http_options`` and the line of every dotted key of its args.

    Raises:
        ConfigError: the file is missing or malformed, holds no (or several) ftune applications, or
            overrides deployment options that belong in ``args``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass a Ray Serve config file to --config)")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from e
    apps = data.get("applications") if isinstance(data, dict) else None
    if not isinstance(apps, list) or not apps:
        raise ConfigError(
            f"{path}: not a Ray Serve config file: it needs an 'applications:' list "
            "(see configs/serve/tiny.yaml)"
        )
    ours = [
        i
        for i, app in enumerate(apps)
        if isinstance(app, dict) and str(app.get("import_path", "")).startswith("serve.app:")
        and (app_name is None or app.get("name", "default") == app_name)
    ]
    if len(ours) != 1:
        which = f"named {app_name!r} " if app_name else ""
        raise ConfigError(
            f"{path}: expected exactly one application {which}with import_path serve.app:build_app, "
            f"found {len(ours)}" + ("; pick one with --app NAME" if len(ours) > 1 else "")
        )
    index = ours[0]
    app = ServeApplication.model_validate(apps[index])
    if apps[index].get("deployments"):
        raise ConfigError(
            f"{path}: application {app.name!r} overrides 'deployments:'; set replicas, autoscaling, "
            "queue limits and CPUs under its args (autoscaling:, limits:, resources:) where they are "
            "validated, and remove the deployments: section"
        )
    lines: dict[str, int] = {}
    app_node = _mapping_value(root, "applications").value[index]
    args_node = _mapping_value(app_node, "args")
    if args_node is not None:
        _key_lines(args_node, "", lines)
    http_options = data.get("http_options") or {}
    return app, http_options, lines


def _mapping_value(node: yaml.Node | None, key: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == key:
                return value_node
    return None


def _key_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted + ".", out)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
