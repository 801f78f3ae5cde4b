"""``ftune serve``: serve a base model and LoRA adapters behind an OpenAI-compatible API until Ctrl-C.

    ftune serve --config configs/serve/tiny.yaml                      # a Ray Serve config file
    ftune serve --sweep ~/ftune_runs/sweeps/lr --top-k 3              # a sweep's 3 best adapters
    ftune serve --adapter support=runs/support/adapter --adapter sql=s3://bucket/sql --api-key-env FTUNE_API_KEY
    python -m serve --config configs/serve/tiny.yaml limits.max_tokens=64 autoscaling.max_replicas=2
    ftune serve --config configs/serve/tiny.yaml --direct-ingress    # also each replica's own port
    ftune serve --adapter a=DIR --host 0.0.0.0 --api-key-env FTUNE_API_KEY  # beyond loopback: a key

Adapters from --sweep and --adapter are added to those of --config; trailing ``key=value`` overrides
set any ServingConfig field. Without --config the base model is the one the adapters were trained
on (their adapter_config.json), unless --base names another. A host other than loopback needs an API
key, unless --allow-unauthenticated says otherwise.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from typing import Any

from ftune.entrypoint import prog
from ftune.errors import UserError
from ftune.yaml_config import apply_overrides
from serve.config import (
    IMPORT_PATH,
    ServingConfig,
    exposure_problem,
    read_yaml_with_lines,
    validate_serve_file,
    validate_serving_args,
)
from serve.deploy import APP_NAME, deploy, replica_urls, shutdown
from serve.leaderboard_source import adapters_from_sweep
from serve.registry import AdapterRegistry, common_base_model


@dataclass
class ServePlan:
    """Everything ``ftune serve`` deploys: the validated config and where it listens."""

    config: ServingConfig
    host: str
    port: int
    app_name: str
    route_prefix: str
    direct_ingress: bool = False


def build_parser() -> argparse.ArgumentParser:
    """The ``ftune serve`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=prog("python -m serve"),
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help="Ray Serve config file whose application imports serve.app:build_app"
    )
    parser.add_argument("--app", help="which application of --config to serve, if it has several")
    parser.add_argument(
        "--sweep", help="sweep directory (leaderboard.json, best/adapter/) to serve the best of"
    )
    parser.add_argument(
        "--top-k", type=int, default=1, help="with --sweep: serve the K best trials (default 1)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the adapter in DIR (or s3://...) as model NAME",
    )
    parser.add_argument("--base",
                        help="base model (hub id, directory, s3://bucket/prefix or builtin:tiny-llama)")
    parser.add_argument("--host", help="HTTP host (default: the config's http_options, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default: the config's http_options, else 8000)")
    parser.add_argument("--api-key-env", help="require 'Authorization: Bearer $VAR' from clients")
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve on a host other than loopback without an API key (refused otherwise)",
    )
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="also answer on each replica's own port, skipping the proxy hop (Ray Serve's direct ingress)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="ServingConfig overrides, e.g. limits.max_tokens=64"
    )
    return parser


def _parse_adapter_flags(flags: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for flag in flags:
        name, sep, source = flag.partition("=")
        if not sep or not name or not source:
            raise UserError(
                f"--adapter {flag!r}: expected NAME=DIR, e.g. --adapter support=runs/support/adapter"
            )
        if name in out:
            raise UserError(f"--adapter {name!r} is given twice")
        out[name] = source
    return out


def _pick_application(data: dict[str, Any], name: str | None, source: str) -> int:
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps or not all(isinstance(a, dict) for a in apps):
        raise UserError(
            f"{source}: not a Ray Serve config file: it needs an 'applications:' list (see configs/serve/tiny.yaml)"
        )
    names = [str(a.get("name", "default")) for a in apps]
    if name is None:
        if len(apps) > 1:
            raise UserError(
                f"{source} has {len(apps)} applications ({', '.join(names)}); pick one with --app NAME"
            )
        return 0
    if name not in names:
        raise UserError(f"{source} has no application named {name!r}; it has {', '.join(names)}")
    return names.index(name)


def _apply_flags(args: argparse.Namespace, app_args: dict[str, Any], source: str) -> None:
    """Add the adapters of --sweep and --adapter, and the --api-key-env, --allow-unauthenticated and
    --base settings, to an application's args."""
    extra = adapters_from_sweep(args.sweep, args.top_k) if args.sweep else {}
    for name, src in _parse_adapter_flags(args.adapter).items():
        if name in extra:
            raise UserError(f"--adapter {name!r} clashes with an adapter of --sweep; pick another name")
        extra[name] = src
    adapters = app_args.setdefault("adapters", {}) or {}
    for name in extra:
        if name in adapters:
            raise UserError(f"adapter {name!r} is already in {source}; pick another name")
    app_args["adapters"] = {**adapters, **extra}
    if args.api_key_env:
        app_args["api_key_env"] = args.api_key_env
    if args.allow_unauthenticated:
        app_args["allow_unauthenticated"] = True
    if args.base:
        app_args.setdefault("model", {})["name_or_path"] = args.base


def plan_from_args(argv: list[str]) -> ServePlan:
    """Parse ``ftune serve`` arguments into a validated plan (no Ray needed).

    Raises:
        UserError: for any problem in the flags, the config file, the sweep or the adapters.
    """
    args = build_parser().parse_args(argv)
    if not (args.config or args.sweep or args.adapter):
        raise UserError("nothing to serve: pass --config FILE, --sweep DIR or --adapter NAME=DIR")
    if args.top_k != 1 and not args.sweep:
        raise UserError("--top-k only applies with --sweep")
    if args.config:
        data, lines = read_yaml_with_lines(args.config)
        source = args.config
    else:
        data, lines, source = (
            {"applications": [{"name": APP_NAME, "import_path": IMPORT_PATH}]},
            {},
            "command line",
        )
    index = _pick_application(data, args.app, source)
    app_args = data["applications"][index].setdefault("args", {})
    if not isinstance(app_args, dict):
        raise UserError(f"{source}: applications.{index}.args must be a mapping of serving settings")
    _apply_flags(args, app_args, source)
    if args.config:
        prefix = f"applications.{index}.args."
        origins = {prefix + key: text for key, text in apply_overrides(app_args, args.overrides).items()}
        options = data.setdefault("http_options", {})
        for flag, key in ((args.host, "host"), (args.port, "port")):
            if flag and isinstance(options, dict):
                options[key] = flag
                origins[f"http_options.{key}"] = f"--{key} {flag}"
        file_config = validate_serve_file(data, source=source, lines=lines, origins=origins)
        app = file_config.applications[index]
        config, host, port, app_name, route_prefix = (
            app.args,
            file_config.http_options.host,
            file_config.http_options.port,
            app.name,
            app.route_prefix,
        )
    else:
        config = validate_serving_args(app_args, source=source, overrides=args.overrides)
        host, port, app_name, route_prefix = args.host or "127.0.0.1", args.port or 8000, APP_NAME, "/"
        exposed = exposure_problem(host, config)  # a config file's host is checked with the file
        if exposed:
            raise UserError(exposed)
    if not args.config and not args.base and config.adapters:
        registry = AdapterRegistry(config.adapters, cache_dir=".", endpoint_url=config.storage.endpoint_url)
        base = common_base_model(registry.inspect())
        if base is None:
            raise UserError(
                "the adapters do not name one common base model in their adapter_config.json; pass --base"
            )
        config.model.name_or_path = base
    if config.api_key_env and not os.environ.get(config.api_key_env) and not os.environ.get("RAY_ADDRESS"):
        raise UserError(f"api_key_env is {config.api_key_env!r} but that environment variable is not set")
    return ServePlan(config, host, port, app_name, route_prefix, args.direct_ingress)


def main(argv: list[str]) -> int:
    """Deploy and block until Ctrl-C."""
    plan = plan_from_args(argv)
    url = deploy(
        plan.config,
        host=plan.host,
        port=plan.port,
        app_name=plan.app_name,
        route_prefix=plan.route_prefix,
        direct_ingress=plan.direct_ingress,
    )
    models = ", ".join(plan.config.model_ids)
    key = f" (Authorization: Bearer ${plan.config.api_key_env})" if plan.config.api_key_env else ""
    print(f"serving {models} at {url}{key}; Ctrl-C to stop", flush=True)
    if plan.direct_ingress:
        print(
            f"replicas, without the proxy hop: {', '.join(replica_urls(plan.app_name, plan.host))}",
            flush=True,
        )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        shutdown()
    return 0
