"""deep_merge lays one nested mapping over another, key by key."""

from __future__ import annotations

from ftune.mapping import deep_merge


def test_nested_sections_merge_and_other_values_replace():
    base = {"train": {"lr": 1e-3, "steps": 10, "sched": {"kind": "cosine", "warmup": 2}}, "tags": ["a"]}
    override = {"train": {"lr": 1e-4, "sched": {"warmup": 0}}, "tags": ["b"], "new": {"x": 1}}
    assert deep_merge(base, override) == {
        "train": {"lr": 1e-4, "steps": 10, "sched": {"kind": "cosine", "warmup": 0}},
        "tags": ["b"],
        "new": {"x": 1},
    }


def test_a_value_replaces_a_section_and_a_section_replaces_a_value():
    assert deep_merge({"a": {"b": 1}}, {"a": None}) == {"a": None}
    assert deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}


def test_inputs_are_not_modified():
    base = {"a": {"b": 1}}
    override = {"a": {"c": 2}}
    merged = deep_merge(base, override)
    merged["a"]["d"] = 3
    assert base == {"a": {"b": 1}} and override == {"a": {"c": 2}}
