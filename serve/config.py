"""Typed configuration of a serving application: the ``args`` of a Ray Serve config file.

``configs/serve/*.yaml`` are Ray Serve config files (``serve run``/``serve deploy`` read them); the
``args`` mapping of the ftune application is validated here, so a typo fails with the file, line and
a "did you mean" before any replica starts. Replica settings (autoscaling, queue limits, CPUs) live in
``args`` too and are turned into Serve deployment options by ``deployment_options``: one source of
truth, checked, instead of a separate ``deployments:`` override that nothing validates.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from ftune.config import ModelConfig, Precision
from ftune.errors import ConfigError
from ftune.yaml_config import Section, apply_overrides, read_yaml, validate_config

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""What an adapter (and so an OpenAI model id) may be called: it is only ever a registry key."""
RESERVED_NAMES = frozenset({"__base__"})
"""peft's name for "no adapter" in a mixed batch."""
SPARE_REQUESTS = 8
"""Requests a replica takes beyond those it admits for generation: health checks, /v1/models, and the
requests it turns away with its own 503 (which must reach it to get an OpenAI error body)."""


class BatchingConfig(Section):
    """Serve's dynamic batching (``@serve.batch``); one batch may mix adapters."""

    max_batch_size: int = Field(8, ge=1, le=256)
    """Requests decoded together, whatever adapters they use."""
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)
    """How long the first request of a batch waits for more before decoding starts, when more are likely
    (others queued or decoding, or the last batch held several); a lone client's request starts at once."""
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
    max_stop_chars: int = Field(128, ge=1)
    """Characters one stop string may have (matching costs grow with it); more is a 400."""
    max_request_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body; more is a 413, answered from Content-Length before the body is read."""
    max_ongoing_requests: int = Field(16, ge=1)
    """Completions one replica decodes or holds for its next batch at once; at least a full batch."""
    max_queued_requests: int = Field(64, ge=-1)
    """Completions a replica holds beyond max_ongoing_requests; more get HTTP 503 at once, with an OpenAI
    error body and Retry-After (-1: unbounded, they wait in Serve's queue instead)."""


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
    allow_unauthenticated: bool = False
    """Serve without api_key_env on a host other than loopback; without it such a bind is refused."""
    docs: bool = False
    """Serve FastAPI's /docs, /redoc and /openapi.json (they need no API key)."""
    max_adapter_rank: int = Field(256, ge=1, le=4096)
    """Largest LoRA rank an adapter may have (checked at deploy time); every loaded adapter is padded to
    the largest rank loaded."""
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
        naming = "adapter names are OpenAI model ids: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        for name, source in self.adapters.items():
            if not ADAPTER_NAME.match(name) or name in RESERVED_NAMES:
                out.append((f"adapters.{name}", naming))
            if name == self.base_model_id:
                out.append((f"adapters.{name}", f"clashes with base_model_id {name!r}; rename the adapter"))
            if not source.strip():
                out.append(
                    (f"adapters.{name}", "empty path; give an adapter directory or s3://bucket/prefix")
                )
        limits, scaling = self.limits, self.autoscaling
        if limits.default_max_tokens > limits.max_tokens:
            message = f"{limits.default_max_tokens} is above limits.max_tokens ({limits.max_tokens})"
            out.append(("limits.default_max_tokens", message))
        concurrent = self.batching.max_batch_size * self.batching.max_concurrent_batches
        if limits.max_ongoing_requests < concurrent:
            message = (
                f"{limits.max_ongoing_requests} cannot fill a batch: it must be at least "
                f"batching.max_batch_size x max_concurrent_batches = {concurrent}"
            )
            out.append(("limits.max_ongoing_requests", message))
        if scaling.min_replicas > scaling.max_replicas:
            message = f"{scaling.min_replicas} is above autoscaling.max_replicas ({scaling.max_replicas})"
            out.append(("autoscaling.min_replicas", message))
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
        raise ConfigError(
            f"{source}: args must be a mapping of ServingConfig fields, got {type(args).__name__}"
        )
    data = copy.deepcopy(args)
    origins = apply_overrides(data, list(overrides or []))
    return validate_config(ServingConfig, data, source=source, lines=lines, origins=origins)


def admitted_requests(limits: LimitsConfig) -> int | None:
    """Completions one replica holds at once before it answers 503 itself (None: no limit of its own)."""
    if limits.max_queued_requests < 0:
        return None
    return limits.max_ongoing_requests + limits.max_queued_requests


def deployment_options(config: ServingConfig) -> dict[str, Any]:
    """Serve deployment options (``Deployment.options(**...)``) derived from the typed config.

    With a queue limit the replica turns away what it cannot hold (an OpenAI 503), so Serve hands it a
    few more requests than it admits; Serve's own queue (plain-text 503s) is then only a backstop.
    """
    a, limits = config.autoscaling, config.limits
    admitted = admitted_requests(limits)
    if admitted is None:
        ongoing, queued = limits.max_ongoing_requests, -1
    else:
        ongoing, queued = admitted + SPARE_REQUESTS, admitted
    return {
        "max_ongoing_requests": ongoing,
        "max_queued_requests": queued,
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


IMPORT_PATH = "serve.app:build_app"
"""The import_path of an ftune application in a Serve config file."""


class HttpOptions(Section):
    """Serve's cluster-wide HTTP settings (``http_options`` of a Serve config file)."""

    host: str = "127.0.0.1"
    """Address the proxies listen on; 0.0.0.0 exposes the API beyond this machine."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of the proxies."""
    request_timeout_s: float | None = Field(None, gt=0)
    """End-to-end timeout of a request at the proxy; None waits as long as it takes."""
    keep_alive_timeout_s: float | None = Field(None, gt=0)
    """How long the proxy keeps an idle HTTP connection open."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure_problem(host: str, config: ServingConfig) -> str | None:
    """Why serving ``config`` on ``host`` is refused (None when it is allowed): beyond loopback, a key."""
    if is_loopback(host) or config.api_key_env or config.allow_unauthenticated:
        return None
    return (
        f"host {host} serves beyond this machine, but no API key is set: set api_key_env to the name of an "
        "environment variable holding a key (ftune serve --api-key-env VAR), or bind 127.0.0.1; to serve "
        "without a key on purpose set allow_unauthenticated: true (ftune serve --allow-unauthenticated)"
    )


class ServeApplicationConfig(Section):
    """One ``applications:`` entry of a Serve config file."""

    name: str = "default"
    """Serve application name."""
    route_prefix: str = "/"
    """URL prefix of the application: the OpenAI base URL is http://host:port<route_prefix>/v1."""
    import_path: Literal["serve.app:build_app"] = IMPORT_PATH
    """Builder Serve imports and calls with args."""
    args: ServingConfig = Field(default_factory=ServingConfig)
    """The serving config, validated by build_app."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Ray runtime environment of the replicas (env_vars, working_dir for serve deploy)."""
    logging_config: dict[str, Any] | None = None
    """Serve logging settings of this application."""
    deployments: list[dict[str, Any]] = Field(default_factory=list)
    """Must stay empty: replica settings live in args (autoscaling, limits, resources)."""

    @pydantic.field_validator("deployments")
    @classmethod
    def _no_deployment_overrides(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if value:
            raise ValueError(
                "set replicas, autoscaling, queue limits and CPUs under args (autoscaling:, limits:, "
                "resources:) where they are validated, and remove this deployments: section"
            )
        return value


class ServeFileConfig(Section):
    """A Ray Serve config file of ftune applications (what ``serve run`` / ``serve deploy`` read)."""

    proxy_location: Literal["Disabled", "HeadOnly", "EveryNode"] = "EveryNode"
    """Where Serve runs HTTP proxies."""
    http_options: HttpOptions = Field(default_factory=HttpOptions)
    """Host and port of the proxies."""
    grpc_options: dict[str, Any] | None = None
    """Serve gRPC settings (unused by ftune)."""
    logging_config: dict[str, Any] | None = None
    """Serve logging settings."""
    applications: list[ServeApplicationConfig] = Field(min_length=1)
    """The applications; each imports serve.app:build_app."""

    def problems(self) -> list[tuple[str, str]]:
        """Every application's cross-field problems, keyed from the top of the file."""
        out = [
            (f"applications.{i}.args.{key}", msg)
            for i, app in enumerate(self.applications)
            for key, msg in app.args.problems()
        ]
        names = [app.name for app in self.applications]
        prefixes = [app.route_prefix for app in self.applications]
        for i, app in enumerate(self.applications):
            exposed = exposure_problem(self.http_options.host, app.args)
            if exposed:
                out.append(("http_options.host", f"application {app.name!r}: {exposed}"))
            if names.index(app.name) != i:
                out.append((f"applications.{i}.name", f"{app.name!r} is used by another application"))
            if prefixes.index(app.route_prefix) != i:
                out.append(
                    (f"applications.{i}.route_prefix", f"{app.route_prefix!r} is used by another application")
                )
        return out

    def application(self, name: str | None = None) -> tuple[int, ServeApplicationConfig]:
        """The application called ``name`` (the only one when None), with its index.

        Raises:
            ConfigError: no such application, or several and no name given.
        """
        names = [app.name for app in self.applications]
        if name is None:
            if len(names) > 1:
                raise ConfigError(
                    f"the config has {len(names)} applications ({', '.join(names)}); pick one with --app NAME"
                )
            return 0, self.applications[0]
        if name not in names:
            raise ConfigError(f"no application named {name!r}; the config has {', '.join(names)}")
        return names.index(name), self.applications[names.index(name)]


def read_yaml_with_lines(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a Ray Serve config file and the line of every dotted key, list items included (``applications.0.args``).

    Raises:
        ConfigError: the file is missing, is not valid YAML or is not a mapping.
    """
    not_serve = "not a Ray Serve config file: it needs an 'applications:' list (see configs/serve/tiny.yaml)"
    data, lines = read_yaml(path, missing_hint="pass a Ray Serve config file to --config", not_mapping=not_serve)
    if not data:
        raise ConfigError(f"{path}: {not_serve}")
    return data, lines


def validate_serve_file(
    data: dict[str, Any],
    *,
    source: str,
    lines: dict[str, int] | None = None,
    origins: dict[str, str] | None = None,
) -> ServeFileConfig:
    """Validate a Serve config file's contents, reporting every problem with its line.

    Raises:
        ConfigError: naming each bad key with its file:line (or the override that set it) and the fix.
    """
    return validate_config(ServeFileConfig, data, source=source, lines=lines, origins=origins)

