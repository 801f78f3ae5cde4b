"""The validation API every config goes through: one error, every problem, each at its own line."""

from __future__ import annotations

import textwrap

import pydantic
import pytest

from ftune.errors import ConfigError
from ftune.yaml_config import (
    Section,
    describe_problem,
    format_problem,
    format_problems,
    read_yaml,
    validate_config,
)


class Price(Section):
    on_demand: float = pydantic.Field(gt=0)
    spot: float | None = pydantic.Field(None, gt=0)


class Table(Section):
    instance_types: dict[str, Price] = pydantic.Field(default_factory=dict)
    discounts: dict[str, dict[str, float]] = pydantic.Field(default_factory=dict)
    tags: list[str] = pydantic.Field(default_factory=list)
    ratio: float | list[float] | None = None

    def problems(self) -> list[tuple[str, str]]:
        return [("tags", "give at least one tag")] if not self.tags else []


def errors_of(cls: type[pydantic.BaseModel], data: dict) -> list[dict]:
    with pytest.raises(pydantic.ValidationError) as e:
        cls.model_validate(data)
    return e.value.errors()


def read(tmp_path, text: str):
    path = tmp_path / "table.yaml"
    path.write_text(textwrap.dedent(text))
    return path, *read_yaml(path)


def test_a_bad_value_inside_a_mapping_points_at_its_own_line(tmp_path):
    path, data, lines = read(
        tmp_path,
        """\
        instance_types:
          g5.xlarge:
            on_demand: 1.0
            spot: -3
        discounts:
          g5.xlarge:
            spot: lots
        tags: [a]
        """,
    )
    with pytest.raises(ConfigError) as e:
        validate_config(Table, data, source=str(path), lines=lines)
    msg = str(e.value)
    assert msg.startswith("2 problems in config"), msg
    assert f"{path}:4: instance_types.g5.xlarge.spot: -3 is invalid" in msg
    assert f"{path}:7: discounts.g5.xlarge.spot: 'lots' is invalid" in msg


def test_union_member_tags_and_list_indices_are_placed_like_the_file():
    keys = [describe_problem(Table, err)[0] for err in errors_of(Table, {"ratio": "x", "tags": ["a", 3]})]
    assert sorted(set(keys)) == ["ratio", "tags.1"]


def test_an_unknown_key_under_a_mapping_key_gets_did_you_mean():
    (key, message), = [describe_problem(Table, err) for err in errors_of(Table, {"instance_types": {"a": {"on_demand": 1, "spto": 1}}})]
    assert key == "instance_types.a.spto" and message == "unknown key. did you mean 'instance_types.a.spot'?"


def test_problems_after_the_fields_and_overrides_are_named():
    with pytest.raises(ConfigError) as e:
        validate_config(Table, {}, source="t.yaml", lines={}, origins={})
    assert str(e.value) == "1 problem in config t.yaml:\n  - t.yaml: tags: give at least one tag"
    origins = {"instance_types.a.on_demand": "instance_types.a.on_demand=0"}
    with pytest.raises(ConfigError, match=r"override 'instance_types.a.on_demand=0': instance_types.a.on_demand: 0"):
        validate_config(Table, {"instance_types": {"a": {"on_demand": 0}}, "tags": ["x"]}, source="t", origins=origins)
    assert validate_config(Table, {"tags": ["x"]}, source="t").tags == ["x"]


def test_format_problem_falls_back_to_the_parent_line_then_the_source():
    lines = {"a": 1, "a.b": 2}
    assert format_problem("f.yaml", "a.b", "bad") == "f.yaml: a.b: bad"
    assert format_problem("f.yaml", "a.b", "bad", lines) == "f.yaml:2: a.b: bad"
    assert format_problem("f.yaml", "a.c", "bad", lines) == "f.yaml:1: a.c: bad"
    assert format_problem("f.yaml", "", "bad", lines) == "f.yaml: <top level>: bad"
    assert format_problem("f.yaml", "a", "bad", lines, {"a.b": "a.b=3"}) == "override 'a.b=3': a: bad"


def test_format_problems_lists_each_problem_once():
    text = format_problems("f.yaml", [("a", "bad"), ("a", "bad"), ("b", "worse")], {"a": 3})
    assert text == "2 problems in config f.yaml:\n  - f.yaml:3: a: bad\n  - f.yaml: b: worse"
