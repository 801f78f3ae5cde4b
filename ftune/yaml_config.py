"""Load typed configs from YAML plus dotted command-line overrides, reporting every problem at once.

A problem is reported with where it came from (``file:line`` or the override that set it), the
dotted key, the offending value and the fix; unknown keys get a "did you mean" hint. Every config
(train, sweep, pricing, serve) goes through here: ``load_config`` reads a file and validates it,
``validate_config`` validates data read some other way (a Serve application's ``args``), and
``describe_problem`` / ``format_problem`` word a single problem for a config that gathers its own.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from ftune.errors import ConfigError

C = TypeVar("C", bound=pydantic.BaseModel)

# Names users bring from peft / transformers / other trainers, mapped to ours for "did you mean".
KNOWN_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "max_length": "max_seq_len",
    "model_name": "name_or_path",
    "stage": "zero_stage",
}


class Section(pydantic.BaseModel):
    """Base of every config section: unknown keys are errors, fields document themselves."""

    model_config = pydantic.ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, frozen=False
    )


def read_yaml(
    path: str | Path,
    *,
    missing_hint: str = "pass an existing YAML file to --config",
    not_mapping: str = "the top level must be a mapping of sections (model:, train:, ...)",
) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping and the line number of every dotted key in it, list items included
    (``applications.0.args``). An empty file is an empty mapping.

    Raises:
        ConfigError: the file is missing (``missing_hint`` says what to pass), is not valid YAML, or is not a
            mapping (``not_mapping`` says what it should be).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} ({missing_hint})")
    text = _decode(path.read_bytes(), path)
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
        if isinstance(data, dict):
            _key_lines(node, "", lines)
    except yaml.YAMLError as e:
        raise ConfigError(f"{_yaml_error_at(e, path, text)}: not valid YAML: {_yaml_problem(e)}") from e
    except (ValueError, TypeError) as e:  # a tagged or date-like scalar YAML cannot convert (2024-13-45)
        raise ConfigError(
            f"{_bad_scalar_at(node, path)}: YAML cannot convert this value ({e}); put it in quotes to "
            "keep it as text, or write a valid one."
        ) from e
    except RecursionError as e:
        raise ConfigError(
            f"{path}: nested too deeply to read; a config is sections of keys a few levels deep, so look "
            "for a run of unclosed [ or {."
        ) from e
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {not_mapping}")
    return data, lines


_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)
"""Byte-order marks of encodings a config must not be in, longest first."""


def _decode(raw: bytes, path: Path) -> str:
    """The text of a config file, which must be UTF-8.

    Raises:
        ConfigError: UTF-16/UTF-32 (byte-order mark or NUL bytes) or bytes that are not UTF-8, with the
            line and the command that converts the file.
    """
    converted = path.with_name(f"{path.stem}.utf8{path.suffix}")
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            raise ConfigError(
                f"{path}:1: the file is {encoding} text, not UTF-8; convert it, e.g. "
                f"`iconv -f {encoding} -t UTF-8 {path} > {converted}`, and pass the converted file."
            )
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        encoding = "UTF-16LE" if raw[1:2] == b"\x00" else "UTF-16BE"
        raise ConfigError(
            f"{path}:{line}: NUL bytes, which YAML text never holds: the file is UTF-16 without a "
            f"byte-order mark, or not text at all; save it as UTF-8 "
            f"(`iconv -f {encoding} -t UTF-8 {path} > {converted}`)."
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        line_end = raw.find(b"\n", e.start)
        line = raw.count(b"\n", 0, e.start) + 1
        shown = raw[line_start : line_end if line_end >= 0 else len(raw)].decode("utf-8", errors="replace")
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start - line_start + 1} "
            f"of {shown.strip()!r}); save the file as UTF-8, e.g. "
            f"`iconv -f LATIN1 -t UTF-8 {path} > {converted}` for a Latin-1 file."
        ) from None


def _yaml_error_at(e: yaml.YAMLError, path: Path, text: str) -> str:
    """``file:line`` of a YAML error, or the file alone when the error has no position."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"{path}:{mark.line + 1}"
    if isinstance(e, yaml.reader.ReaderError):
        return f"{path}:{text.count(chr(10), 0, e.position) + 1}"
    return str(path)


def _bad_scalar_at(node: yaml.Node, path: Path) -> str:
    """``file:line 'value'`` of the first scalar below ``node`` that YAML cannot convert, else the file."""
    todo = [node]
    while todo:
        item = todo.pop(0)
        if isinstance(item, yaml.ScalarNode):
            try:
                yaml.constructor.SafeConstructor().construct_object(item)
            except (ValueError, TypeError, yaml.YAMLError):
                return f"{path}:{item.start_mark.line + 1}: {item.value!r}"
        elif isinstance(item, yaml.MappingNode):
            todo += [n for pair in item.value for n in pair]
        elif isinstance(item, yaml.SequenceNode):
            todo += item.value
    return str(path)


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.reader.ReaderError):
        code = e.character if isinstance(e.character, int) else ord(e.character)
        return f"control character U+{code:04X} is not allowed in YAML; remove it"
    return getattr(e, "problem", None) or str(e)


def _key_lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            out[dotted] = key_node.start_mark.line + 1
            _key_lines(value_node, dotted + ".", out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[f"{prefix}{index}"] = item.start_mark.line + 1
            _key_lines(item, f"{prefix}{index}.", out)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value`` into the dotted key and the YAML-parsed value.

    Raises:
        ConfigError: the override is not of the form key=value.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"command-line override {text!r} is not of the form section.key=value (e.g. train.lr=2e-4)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, RecursionError):  # not YAML (or 2024-13-45): the text
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Apply dotted overrides to ``data`` in place; return {dotted key: override text}."""
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"command-line override {text!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
        origins[key] = text
    return origins


def load_config(
    cls: type[C], path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None
) -> C:
    """Build ``cls`` from a YAML file (or ``base``) and dotted overrides.

    Args:
        cls: The top-level config model.
        path: YAML file, or None to start from ``base`` / the defaults.
        overrides: ``section.key=value`` strings, applied after the file.
        base: Starting dict when ``path`` is None.

    Raises:
        ConfigError: listing every problem found, each with its location and fix.
    """
    data, lines = read_yaml(path) if path is not None else (dict(base or {}), {})
    origins = apply_overrides(data, list(overrides or []))
    source = str(path) if path is not None else "<defaults>"
    return validate_config(cls, data, source=source, lines=lines, origins=origins)


def validate_config(
    cls: type[C],
    data: dict[str, Any],
    *,
    source: str,
    lines: dict[str, int] | None = None,
    origins: dict[str, str] | None = None,
) -> C:
    """Build ``cls`` from already-read ``data``, checking its fields and then its ``problems()``, if any.

    For configs that are not a whole file of their own (a Serve application's ``args``) or whose file
    needs a reading of its own; ``load_config`` reads a file and comes here.

    Args:
        cls: The config model.
        data: Its mapping, overrides applied (see ``apply_overrides``).
        source: Where ``data`` came from, for messages (a file name or a description).
        lines: Line of each dotted key in the file (``read_yaml``), to point at the offending line.
        origins: {dotted key: override text} from ``apply_overrides``, to name the override instead.

    Raises:
        ConfigError: one error listing every problem with its file:line (or override), key and fix.
    """
    try:
        config = cls.model_validate(data)
    except pydantic.ValidationError as e:
        problems = [describe_problem(cls, err) for err in e.errors()]
        raise ConfigError(format_problems(source, problems, lines, origins)) from None
    problems = list(config.problems()) if hasattr(config, "problems") else []
    if problems:
        raise ConfigError(format_problems(source, problems, lines, origins))
    return config


def _model_at(cls: type[pydantic.BaseModel], loc: tuple) -> type[pydantic.BaseModel] | None:
    """The nested model reached by following ``loc`` (fields, list indices, mapping keys) from ``cls``."""
    annotation: Any = cls
    for part in loc:
        found, annotation = _inside(annotation, part)
        if not found:
            return None
    for option in typing.get_args(annotation) if _is_union(annotation) else (annotation,):
        if isinstance(option, type) and issubclass(option, pydantic.BaseModel):
            return option
    return None


def _inside(annotation: Any, part: Any) -> tuple[bool, Any]:
    """Whether ``part`` of an error location names something inside a value of type ``annotation``
    (a field of a model, an index of a list, a key of a mapping), and that thing's annotation.

    Anything else is one of pydantic's union-member tags (``'list[float]'``), which no file holds.
    """
    options = [a for a in typing.get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    for option in options:
        origin = typing.get_origin(option) or option
        args = typing.get_args(option)
        if isinstance(option, type) and issubclass(option, pydantic.BaseModel):
            if str(part) in option.model_fields:
                return True, option.model_fields[str(part)].annotation
        elif isinstance(part, int) and origin in (list, tuple, set, frozenset):
            return True, args[0] if args else Any
        elif isinstance(part, str) and origin is dict and len(options) == 1:
            return True, args[1] if len(args) == 2 else Any
    return False, None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _field_path(cls: type[pydantic.BaseModel], loc: tuple) -> tuple:
    """The longest prefix of ``loc`` that names a place in the file: fields, list indices and mapping keys
    (so a bad value under ``instance_types.g5.xlarge`` points at its own line), without pydantic's
    union-member tags."""
    path: list = []
    annotation: Any = cls
    for part in loc:
        found, annotation = _inside(annotation, part)
        if not found:
            break
        path.append(part)
    return tuple(path)


def describe_problem(cls: type[pydantic.BaseModel], err: Mapping[str, Any]) -> tuple[str, str]:
    """One pydantic error of validating ``cls`` as (dotted key, message with the value and the fix).

    Unknown keys get a "did you mean" (typos and other tools' names, see ``KNOWN_ALIASES``), or the
    keys known there.
    """
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        parent = _model_at(cls, loc[:-1])
        known = sorted(parent.model_fields) if parent is not None else []
        key = ".".join(str(p) for p in loc)
        alias = KNOWN_ALIASES.get(str(loc[-1]))
        guess = [alias] if alias in known else difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = f"did you mean '{prefix + '.' if prefix else ''}{guess[0]}'?" if guess else ""
        options = f"known keys here: {', '.join(known)}" if known else ""
        return key, f"unknown key. {hint or options}".strip()
    path = _field_path(cls, loc)
    key = ".".join(str(p) for p in path)
    value = err.get("input")
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if err.get("type") == "missing":
        return key, "required but not set"
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return key, f"{shown} is invalid: {msg}"


def format_problem(
    source: str,
    key: str,
    message: str,
    lines: dict[str, int] | None = None,
    origins: dict[str, str] | None = None,
) -> str:
    """``where: key: message`` for one problem: ``where`` is the override that set ``key`` (or a key
    below it), else ``source:line`` of the key or its parent, else ``source``."""
    lines, origins = lines or {}, origins or {}
    nested = [text for dotted, text in origins.items() if dotted.startswith(key + ".")] if key else []
    if key in origins or nested:
        where = f"override {origins.get(key) or nested[0]!r}"
    elif key in lines:
        where = f"{source}:{lines[key]}"
    else:
        parent = key.rsplit(".", 1)[0]
        where = f"{source}:{lines[parent]}" if parent in lines else source
    return f"{where}: {key or '<top level>'}: {message}"


def format_problems(
    source: str,
    problems: list[tuple[str, str]],
    lines: dict[str, int] | None = None,
    origins: dict[str, str] | None = None,
) -> str:
    """The one error text listing every (key, message) problem once, each as ``format_problem`` words it."""
    rows = [f"  - {format_problem(source, key, message, lines, origins)}" for key, message in dict.fromkeys(problems)]
    noun = "problem" if len(rows) == 1 else "problems"
    return f"{len(rows)} {noun} in config {source}:\n" + "\n".join(rows)
