"""The sample instruction dataset: schema, checkable answers, determinism, chat conversion, CLI."""

from __future__ import annotations

import json
import random
import re
import string

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
    counts = {
        "add": sum(" + " in r["instruction"] for r in rows),
        "subtract": sum(" - " in r["instruction"] for r in rows),
        "capital": sum("capital of" in r["instruction"] for r in rows),
        "reverse": sum(r["instruction"].startswith("Reverse") for r in rows),
    }
    share = len(rows) / len(sample_data.FAMILIES)
    for family, count in counts.items():
        assert abs(count - share) <= 1, family


def test_outputs_are_short(rows):
    # Answers must stay a few tokens long for a tiny model to learn them.
    assert max(len(r["output"]) for r in rows) <= 16


def test_answers_are_correct(rows):
    checked = 0
    for row in rows:
        instruction, given, output = row["instruction"], row["input"], row["output"]
        if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", instruction):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert output == str(a + b if op == "+" else a - b), row
        elif m := re.fullmatch(r"Which number is larger: (\d+) or (\d+)\?", instruction):
            assert output == str(max(int(m[1]), int(m[2]))), row
        elif m := re.fullmatch(r"Which letter comes after ([a-y]) in the alphabet\?", instruction):
            assert output == chr(ord(m[1]) + 1), row
        elif m := re.fullmatch(r"What is the capital of (.+)\?", instruction):
            assert output == dict(CAPITALS)[m[1]], row
        elif instruction.startswith("Reverse"):
            assert output == given[::-1], row
        elif "uppercase" in instruction:
            assert output == given.upper(), row
        elif instruction.startswith("Sort"):
            numbers = [int(x) for x in given.split(", ")]
            assert output == ", ".join(str(x) for x in sorted(numbers)), row
        elif instruction.startswith("How many letters"):
            assert output == str(len(given)), row
        else:
            pytest.fail(f"row of unknown family: {row}")
        checked += 1
    assert checked == len(rows)


def test_subtraction_answers_are_non_negative(rows):
    assert all(not r["output"].startswith("-") for r in rows if " - " in r["instruction"])


def test_word_inputs_are_lowercase_words(rows):
    for row in rows:
        if row["instruction"].startswith(("Reverse", "Write", "How many")):
            assert row["input"] and set(row["input"]) <= set(string.ascii_lowercase)


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


def test_cli_writes_the_file(tmp_path, capsys):
    sample_data.main(["--out", str(tmp_path), "--rows", "50", "--seed", "2"])
    path = tmp_path / "train.jsonl"
    assert path.read_bytes() == write_sample_dataset(tmp_path / "ref", n=50, seed=2).read_bytes()
    assert str(path) in capsys.readouterr().out
