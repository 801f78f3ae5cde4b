"""Load typed configs from YAML plus dotted command-line overrides, reporting every problem at once.

A problem is reported with where it came from (``file:line`` or the override that set it), the
dotted key, the offending value and the fix; unknown keys get a "did you mean" hint.
"""

from __future__ import annotations

import difflib
import typing
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
    try:
        config = cls.model_validate(data)
    except pydantic.ValidationError as e:
        problems = [_describe_error(cls, err) for err in e.errors()]
        raise ConfigError(_report(source, problems, lines, origins)) from None
    problems = list(config.problems()) if hasattr(config, "problems") else []
    if problems:
        raise ConfigError(_report(source, problems, lines, origins))
    return config


def _field_model(cls: type[pydantic.BaseModel], parts: tuple) -> type[pydantic.BaseModel] | None:
    """The nested model reached by following field names ``parts`` from ``cls``."""
    model: Any = cls
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, pydantic.BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, pydantic.BaseModel):
            return arg
    return annotation


def _field_path(cls: type[pydantic.BaseModel], loc: tuple) -> tuple:
    """Longest prefix of ``loc`` made of real field names (drops pydantic's union-member tags)."""
    path: list = []
    model: Any = cls
    for part in loc:
        if isinstance(part, int) and path:
            path.append(part)
            continue
        if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
            break
        if str(part) not in model.model_fields:
            if model is not None and part not in path:
                path.append(part)
            break
        path.append(part)
        model = _unwrap(model.model_fields[str(part)].annotation)
    return tuple(path)


def _describe_error(cls: type[pydantic.BaseModel], err: dict) -> tuple[str, str]:
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        parent = _field_model(cls, loc[:-1])
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


def _report(
    source: str, problems: list[tuple[str, str]], lines: dict[str, int], origins: dict[str, str]
) -> str:
    seen: set[tuple[str, str]] = set()
    rows = []
    for key, message in problems:
        if (key, message) in seen:
            continue
        seen.add((key, message))
        nested = [text for dotted, text in origins.items() if dotted.startswith(key + ".")] if key else []
        if key in origins or nested:
            where = f"override {origins.get(key) or nested[0]!r}"
        elif key in lines:
            where = f"{source}:{lines[key]}"
        else:
            parent = key.rsplit(".", 1)[0]
            where = f"{source}:{lines[parent]}" if parent in lines else source
        rows.append(f"  - {where}: {key or '<top level>'}: {message}")
    noun = "problem" if len(rows) == 1 else "problems"
    return f"{len(rows)} {noun} in config {source}:\n" + "\n".join(rows)
