"""The sample instruction dataset: schema, checkable answers, determinism, chat conversion, CLI."""

from __future__ import annotations

import json
import random
import re

import pytest

from ftune import sample_data
from ftune.sample_data import CAPITALS, generate_rows, to_chat, write_jsonl, write_sample_dataset


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return generate_rows(4000, seed=0)


def test_rows_have_the_alpaca_schema(rows):
    assert len(rows) == 4000
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(value, str) for value in row.values())
        assert row["instruction"] and row["output"]
        assert row["output"] == row["output"].strip()


def test_every_family_is_present_in_roughly_equal_shares(rows):
    counts = dict.fromkeys(sample_data.FAMILIES, 0)
    for row in rows:
        counts[sample_data.family_of(row["instruction"])] += 1
    share = len(rows) / len(sample_data.FAMILIES)
    for family, count in counts.items():
        assert abs(count - share) <= 1, family
    assert sample_data.family_of("What is 2 + 3?") is None


def test_outputs_are_short(rows):
    # Answers must stay a few tokens long for a tiny model to learn them.
    assert max(len(r["output"]) for r in rows) <= 16


def _answer_of(instruction: str) -> str:
    """The right answer, computed from the question's text alone (not from the fact tables' lookups)."""
    for name, family in sample_data.FAMILIES.items():
        for phrasing in family.questions:
            pattern = re.escape(phrasing).replace(re.escape("{key}"), "(.+)")
            if m := re.fullmatch(pattern, instruction):
                key = m[1]
                return {"capital": lambda: dict(CAPITALS)[key], "next_letter": lambda: chr(ord(key) + 1),
                        "uppercase": key.upper, "reverse": lambda: key[::-1]}[name]()
    pytest.fail(f"question of unknown family: {instruction}")


def test_answers_are_correct(rows):
    for row in rows + sample_data.heldout_rows():
        assert row["input"] == "" and row["output"] == _answer_of(row["instruction"]), row


def test_held_out_facts_are_never_asked_in_training(rows):
    heldout = sample_data.heldout_rows()
    asked = {r["instruction"] for r in rows}
    # Every phrasing of every held-out fact is in the held-out file, and none of them in training;
    # no held-out answer is ever a training answer either.
    per_fact = len(next(iter(sample_data.FAMILIES.values())).questions)
    assert len(heldout) == per_fact * sum(
        sample_data.is_held_out(name, key) for name, f in sample_data.FAMILIES.items() for key, _ in f.facts)
    assert not asked & {r["instruction"] for r in heldout}
    training_answers = {r["output"] for r in rows}
    assert not training_answers & {r["output"] for r in heldout}
    # Every family has held-out facts, and the held-out share is near HELD_OUT_SHARE.
    for name, family in sample_data.FAMILIES.items():
        held = sum(sample_data.is_held_out(name, key) for key, _ in family.facts)
        assert 0 < held < len(family.facts), name
    total = sum(len(f.facts) for f in sample_data.FAMILIES.values())
    assert abs(len(heldout) / per_fact / total - sample_data.HELD_OUT_SHARE) < 0.1


def test_the_base_models_text_states_every_fact_and_asks_nothing():
    texts = sample_data.knowledge_texts()
    for family in sample_data.FAMILIES.values():
        for key, answer in family.facts:
            assert f"{family.statement.format(key=key)} = {answer}" in texts
    phrasings = [q.split("{key}")[0] for f in sample_data.FAMILIES.values() for q in f.questions]
    assert not [t for t in texts if any(p and t.startswith(p) for p in phrasings) or "?" in t]


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    first = write_sample_dataset(tmp_path / "a", n=500, seed=3).read_bytes()
    again = write_sample_dataset(tmp_path / "b", n=500, seed=3).read_bytes()
    other = write_sample_dataset(tmp_path / "c", n=500, seed=4).read_bytes()
    assert first == again
    assert first != other


def test_generation_leaves_the_global_rng_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate_rows(100, seed=0)
    assert random.random() == expected


def test_row_count_follows_n():
    assert len(generate_rows(0)) == 0
    assert len(generate_rows(7, seed=1)) == 7
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_rows(-1)


def test_jsonl_file_is_one_sorted_object_per_line(tmp_path):
    rows = [
        {"output": "Ä", "instruction": "x", "input": ""},
        {"instruction": "y", "input": "z", "output": "1"},
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and b"\r" not in raw
    lines = raw.decode("utf-8").splitlines()
    assert lines[0] == '{"input": "", "instruction": "x", "output": "Ä"}'  # sorted keys, no \u escapes
    assert [json.loads(line) for line in lines] == rows


def test_to_chat_joins_instruction_and_input():
    with_input = to_chat({"instruction": "Reverse the letters of the word.", "input": "cat", "output": "tac"})
    assert with_input == {
        "messages": [
            {"role": "user", "content": "Reverse the letters of the word.\n\ncat"},
            {"role": "assistant", "content": "tac"},
        ]
    }
    without_input = to_chat({"instruction": "What is 2 + 3?", "input": "", "output": "5"})
    assert without_input["messages"][0] == {"role": "user", "content": "What is 2 + 3?"}


def test_cli_writes_the_files(tmp_path, capsys):
    sample_data.main(["--out", str(tmp_path), "--rows", "50", "--seed", "2"])
    path = tmp_path / "train.jsonl"
    assert path.read_bytes() == write_sample_dataset(tmp_path / "ref", n=50, seed=2).read_bytes()
    assert (tmp_path / "heldout.jsonl").read_bytes() == (tmp_path / "ref" / "heldout.jsonl").read_bytes()
    assert str(path) in capsys.readouterr().out
