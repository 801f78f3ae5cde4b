"""The configuration reference (docs/configuration.md), generated from the typed pydantic configs.

Every key of every YAML the project reads is listed with its type, default and the docstring under
its field, so the reference cannot drift from the code; a unit test fails when the committed file
is stale.

    python -m ftune_cli.config_reference --write     # regenerate docs/configuration.md
    python -m ftune_cli.config_reference --check     # exit 1 if docs/configuration.md is stale
    python -m ftune_cli.config_reference             # print the Markdown
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import pydantic
from pydantic_core import PydanticUndefined

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
"""Where the generated reference is committed."""
REGENERATE = "python -m ftune_cli.config_reference --write"
"""The command that rewrites DOC_PATH."""


@dataclass(frozen=True)
class Document:
    """One top-level config: the files it is read from and the class that types them."""

    title: str
    """Heading of the part."""
    model: type[pydantic.BaseModel]
    """The top-level config class."""
    files: str
    """Which files or arguments hold it, and the command that reads them."""


def documents() -> list[Document]:
    """Every top-level config of the project, in reading order."""
    from ftune.config import TrainJobConfig
    from serve.config import ServeFileConfig, ServingConfig
    from tune.config import SweepConfig
    from tune.pricing import PricingTable

    return [
        Document("Training job", TrainJobConfig,
                 "`configs/train/*.yaml`, read by `python -m train --config FILE [key=value ...]` / `ftune train`."),
        Document("Sweep", SweepConfig,
                 "`configs/sweep/*.yaml`, read by `python -m tune --config FILE [key=value ...]`. `job:` holds "
                 "training-job keys (above) applied to every trial; `space:` maps a dotted training-job key to a "
                 "distribution."),
        Document("Pricing table", PricingTable,
                 "`configs/pricing/*.yaml`, named by a sweep's `compute.pricing`."),
        Document("Serve config file", ServeFileConfig,
                 "`configs/serve/*.yaml`, a Ray Serve config file read by `ftune serve --config FILE`, "
                 "`serve run` and `serve deploy`."),
        Document("Serving application", ServingConfig,
                 "The `args:` of an application in a Serve config file; `ftune serve` takes the same keys as "
                 "trailing `key=value` overrides."),
    ]


def type_name(annotation: Any) -> str:
    """A short, YAML-minded name of a field's type: ``int``, ``"nf4" | "fp4"``, ``list[str] | null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict, set):
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if origin is typing.Annotated:
        return type_name(args[0])
    return getattr(annotation, "__name__", str(annotation))


def constraints(field: pydantic.fields.FieldInfo) -> str:
    """The field's bounds and pattern, e.g. ``>= 1, <= 1024``."""
    bounds = {annotated_types.Ge: ("ge", ">="), annotated_types.Gt: ("gt", ">"),
              annotated_types.Le: ("le", "<="), annotated_types.Lt: ("lt", "<")}
    out = []
    for item in field.metadata:
        for cls, (attribute, symbol) in bounds.items():
            if isinstance(item, cls):
                out.append(f"{symbol} {format_value(getattr(item, attribute))}")
        if isinstance(item, annotated_types.MinLen):
            out.append(f"at least {item.min_length} item" + ("s" if item.min_length != 1 else ""))
        pattern = getattr(item, "pattern", None)
        if isinstance(pattern, str):
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def format_value(value: Any) -> str:
    """A default as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value) if not value or value.strip() != value else value
    if isinstance(value, (tuple, set)):
        value = list(value)
    return json.dumps(value, default=str)


def nested_model(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The config class a field holds directly (``X`` or ``X | None``), else None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in (annotation, *(typing.get_args(annotation) if union else ())):
        if inspect.isclass(candidate) and issubclass(candidate, pydantic.BaseModel):
            return candidate
    return None


def item_model(annotation: Any) -> tuple[str, type[pydantic.BaseModel]] | None:
    """For ``list[X]`` / ``dict[str, X]`` of a config class X: the key suffix (``[]`` / ``.<name>``) and X."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and nested_model(args[0]):
        return "[]", nested_model(args[0])
    if origin is dict and len(args) == 2 and nested_model(args[1]):
        return ".<name>", nested_model(args[1])
    return None


def default_of(field: pydantic.fields.FieldInfo) -> str:
    """The field's default for the table (``required`` when it has none)."""
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, pydantic.BaseModel):
        return "(section)"
    return f"`{format_value(value)}`"


def cell(text: str) -> str:
    """Text safe in a Markdown table cell: one line, pipes escaped, ``<name>`` outside code spans not read as HTML."""
    parts = re.sub(r"\s+", " ", text).strip().replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else re.sub(r"<(?=[A-Za-z/!?])", "&lt;", p) for i, p in enumerate(parts))


def anchor(title: str, prefix: str) -> str:
    """The GitHub anchor of the heading ``<title>: `<prefix>` `` (of ``<title>`` alone for the top level)."""
    return re.sub(r"[^a-z0-9 _-]", "", f"{title} {prefix}".strip().lower()).replace(" ", "-")


def render_model(doc: Document, model: type[pydantic.BaseModel], prefix: str, seen: dict[type, str]) -> list[str]:
    """The table of one config class (fields that hold other classes link to their own tables) and theirs."""
    heading = [f"### {doc.title}: `{prefix}`", ""] if prefix else []
    lines = [*heading, cell(inspect.getdoc(model) or ""), "",
             "| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    children: list[tuple[str, type[pydantic.BaseModel]]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        kind = type_name(field.annotation)
        child = nested_model(field.annotation)
        items = item_model(field.annotation)
        if child is None and items is not None:
            suffix, child = items
            key_of_child = key + suffix
        else:
            key_of_child = key
        if child is not None:
            if child in seen:
                kind = f"[{kind}](#{seen[child]})"
            else:
                seen[child] = anchor(doc.title, key_of_child)
                children.append((key_of_child, child))
                kind = f"[{kind}](#{seen[child]})"
        limits = constraints(field)
        kind = f"{kind} ({limits})" if limits else kind
        lines.append(f"| `{key}` | {cell(kind)} | {cell(default_of(field))} | {cell(field.description or '')} |")
    lines.append("")
    for key, child in children:
        lines += render_model(doc, child, key, seen)
    return lines


def render() -> str:
    """The whole reference as Markdown."""
    seen: dict[type, str] = {}
    docs = documents()
    intro = (f"Generated from the typed configs by `{REGENERATE}`; edit the field docstrings in the code, not this "
             "file. Every key can also be set on the command line as a dotted override (`train.lr=1e-4`); unknown "
             "keys fail with a \"did you mean\".")
    lines = ["# Configuration reference", "", intro, ""]
    lines += [f"- [{d.title}](#{anchor(d.title, '')}) (`{d.model.__module__}.{d.model.__name__}`)" for d in docs]
    lines.append("")
    for doc in docs:
        seen.setdefault(doc.model, anchor(doc.title, ""))
    for doc in docs:
        lines += [f"## {doc.title}", "", f"{doc.files} Typed by `{doc.model.__module__}.{doc.model.__name__}`.", ""]
        lines += render_model(doc, doc.model, "", seen)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print, write or check docs/configuration.md."""
    parser = argparse.ArgumentParser(prog="python -m ftune_cli.config_reference", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {DOC_PATH.name} under docs/")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed reference is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
    elif args.check:
        if not DOC_PATH.is_file() or DOC_PATH.read_text(encoding="utf-8") != text:
            print(f"{DOC_PATH} is stale; regenerate it with `{REGENERATE}`", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is up to date")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
