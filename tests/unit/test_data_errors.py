"""Bad input: every mistake is a DataError naming the file, the line and the field, with a fix."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoTokenizer

from ftune.config import DataConfig
from ftune.data import prepare_data
from ftune.errors import DataError

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}]}
SKIP_HINT = "set data.skip_bad_rows=true"


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def rows(*values) -> list[str]:
    return [v if isinstance(v, str) else json.dumps(v) for v in values]


def data_error(tokenizer, **cfg) -> str:
    cfg.setdefault("validation_fraction", 0.5)
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(**cfg), tokenizer)
    return str(e.value)


# (case, file lines, line of the bad row, fragments naming the field and the problem)
ROW_CASES = [
    (
        "malformed_json",
        rows(GOOD, GOOD, '{"instruction": "a", "output": }', GOOD),
        3,
        ["invalid JSON", "Expecting value", "column 32"],
    ),
    ("not_an_object", rows(GOOD, GOOD, ["a", "b"], GOOD), 3, ["a list, not an object", "'instruction'"]),
    (
        "missing_output",
        rows(GOOD, GOOD, {"instruction": "x"}, GOOD),
        3,
        ["field 'output' is missing", "alpaca rows need 'instruction' and 'output' strings"],
    ),
    ("missing_instruction", rows(GOOD, GOOD, {"output": "x"}, GOOD), 3, ["field 'instruction' is missing"]),
    (
        "number_output",
        rows(GOOD, GOOD, {"instruction": "1+1?", "output": 2}, GOOD),
        3,
        ["field 'output' must be a string", "a number (2)", '"2"'],
    ),
    (
        "list_input",
        rows(GOOD, GOOD, {"instruction": "x", "input": ["a"], "output": "y"}, GOOD),
        3,
        ["field 'input' must be a string", "a list"],
    ),
    (
        "empty_instruction",
        rows(GOOD, GOOD, {"instruction": "  ", "output": "y"}, GOOD),
        3,
        ["field 'instruction' is empty"],
    ),
    (
        "empty_output",
        rows(GOOD, GOOD, {"instruction": "x", "output": ""}, GOOD),
        3,
        ["field 'output' is empty"],
    ),
    (
        "empty_text",
        rows({"text": "a"}, {"text": "b"}, {"text": ""}, {"text": "c"}),
        3,
        ["field 'text' is empty", "text rows need a 'text' string"],
    ),
    (
        "unknown_role",
        rows(
            GOOD_CHAT,
            GOOD_CHAT,
            {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
            GOOD_CHAT,
        ),
        3,
        ["field 'messages[1].role' is 'bot'", "allowed roles: system, user, assistant"],
    ),
    (
        "missing_role",
        rows(GOOD_CHAT, GOOD_CHAT, {"messages": [{"content": "x"}]}, GOOD_CHAT),
        3,
        ["field 'messages[0].role' is missing"],
    ),
    (
        "number_content",
        rows(
            GOOD_CHAT,
            GOOD_CHAT,
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 7}]},
            GOOD_CHAT,
        ),
        3,
        ["field 'messages[1].content' must be a string"],
    ),
    (
        "message_not_object",
        rows(GOOD_CHAT, GOOD_CHAT, {"messages": ["hello"]}, GOOD_CHAT),
        3,
        ["field 'messages[0]' must be an object"],
    ),
    (
        "messages_not_list",
        rows(GOOD_CHAT, GOOD_CHAT, {"messages": "hello"}, GOOD_CHAT),
        3,
        ["field 'messages' must be a list", "a string"],
    ),
    (
        "messages_empty",
        rows(GOOD_CHAT, GOOD_CHAT, {"messages": []}, GOOD_CHAT),
        3,
        ["field 'messages' is an empty list"],
    ),
    (
        "no_assistant_turn",
        rows(GOOD_CHAT, GOOD_CHAT, {"messages": [{"role": "user", "content": "x"}]}, GOOD_CHAT),
        3,
        ["field 'messages' has no assistant turn"],
    ),
    (
        "other_format_than_detected",
        rows(GOOD, GOOD, {"text": "plain"}, GOOD),
        3,
        ["field 'instruction' is missing", "looks like text data", "format is alpaca (detected from line 1)"],
    ),
    (
        "unknown_keys_first_row",
        rows({"question": "q", "answer": "a"}, GOOD, GOOD),
        1,
        ["field 'instruction' is missing", "'question'", "format is alpaca (detected from line 2)"],
    ),
]


@pytest.mark.parametrize("lines,line,fragments", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_bad_row_names_file_line_field_and_fix(tmp_path, tiny_tokenizer, lines, line, fragments):
    path = write_lines(tmp_path / "train.jsonl", lines)
    message = data_error(tiny_tokenizer, path=path)
    assert message.startswith(f"{path}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, message
    assert SKIP_HINT in message


@pytest.mark.parametrize("lines,line,fragments", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_skip_bad_rows_skips_exactly_the_bad_row(tmp_path, tiny_tokenizer, lines, line, fragments):
    path = write_lines(tmp_path / "train.jsonl", lines)
    data = prepare_data(DataConfig(path=path, validation_fraction=0.5, skip_bad_rows=True), tiny_tokenizer)
    assert data.stats.skipped_lines == [line]
    assert fragments[0] in data.stats.skipped[0].reason
    assert len(data.train) + len(data.validation) == len(lines) - 1


def test_explicit_format_mismatch_names_the_missing_field(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "train.jsonl", rows(GOOD, GOOD))
    message = data_error(tiny_tokenizer, path=path, format="chat")
    assert message.startswith(f"{path}:1: field 'messages' is missing")
    assert "set by data.format" in message


def test_missing_file_says_which_path_and_which_setting(tmp_path, tiny_tokenizer):
    path = tmp_path / "nope" / "train.jsonl"
    message = data_error(tiny_tokenizer, path=str(path))
    assert str(path) in message and "not found" in message and "check data.path" in message

    good = write_lines(tmp_path / "train.jsonl", rows(GOOD, GOOD))
    message = data_error(tiny_tokenizer, path=good, validation_path=str(path))
    assert str(path) in message and "check data.validation_path" in message


def test_unsupported_extension(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.csv"
    path.write_text("instruction,output\nx,y\n", encoding="utf-8")
    message = data_error(tiny_tokenizer, path=str(path))
    assert str(path) in message and "'.csv'" in message and ".jsonl" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, tiny_tokenizer, content):
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    message = data_error(tiny_tokenizer, path=str(path))
    assert message.startswith(str(path)) and "empty" in message


def test_empty_validation_file(tmp_path, tiny_tokenizer):
    train = write_lines(tmp_path / "train.jsonl", rows(GOOD))
    (tmp_path / "val.jsonl").write_text("", encoding="utf-8")
    message = data_error(tiny_tokenizer, path=train, validation_path=str(tmp_path / "val.jsonl"))
    assert "val.jsonl" in message and "empty" in message


def test_bad_row_in_validation_file_names_that_file(tmp_path, tiny_tokenizer):
    train = write_lines(tmp_path / "train.jsonl", rows(GOOD, GOOD))
    val = write_lines(tmp_path / "val.jsonl", rows(GOOD, {"instruction": "x", "output": None}))
    message = data_error(tiny_tokenizer, path=train, validation_path=val)
    assert message.startswith(f"{val}:2: field 'output' must be a string, got null")


def test_every_row_bad_is_an_error_even_when_skipping(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "train.jsonl", rows({"instruction": "x"}, "not json", {"output": "y"}))
    message = data_error(tiny_tokenizer, path=path, skip_bad_rows=True)
    assert "every row is bad (3 skipped)" in message
    assert f"{path}:1: field 'output' is missing" in message


def test_validation_split_that_would_be_empty(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "train.jsonl", rows(GOOD, GOOD, GOOD))
    message = data_error(tiny_tokenizer, path=path, validation_fraction=0.05)
    assert path in message and "validation split would be empty" in message
    assert "data.validation_fraction" in message and "data.validation_path" in message


def test_validation_split_that_leaves_nothing_to_train_on(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "train.jsonl", rows(GOOD))
    message = data_error(tiny_tokenizer, path=path, validation_fraction=0.9)
    assert "leaves none to train on" in message


def test_nothing_left_after_truncation(tmp_path, tiny_tokenizer):
    long_prompt = {"instruction": " ".join(["word"] * 100), "output": "yes"}
    path = write_lines(tmp_path / "train.jsonl", rows(long_prompt, long_prompt))
    message = data_error(tiny_tokenizer, path=path, max_seq_len=16)
    assert path in message and "no training examples left" in message
    assert "data.max_seq_len=16" in message


def test_malformed_json_list_names_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": "x" "output": "y"}\n]\n')
    message = data_error(
        tiny_tokenizer, path=str(path), skip_bad_rows=True
    )  # a broken list cannot be skipped
    assert message.startswith(f"{path}:3: invalid JSON: Expecting ',' delimiter (column 23)")


def test_rows_of_no_known_format(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "train.jsonl", rows({"question": "q", "answer": "a"}, {"prompt": "p"}))
    message = data_error(tiny_tokenizer, path=path)
    assert message.startswith(f"{path}:1: cannot tell the row format from its keys ('question', 'answer')")
    assert "data.format" in message


def test_json_file_holding_one_object(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data": [GOOD, GOOD]}, indent=2), encoding="utf-8")
    message = data_error(tiny_tokenizer, path=str(path))
    assert str(path) in message and "one JSON object" in message and "'data'" in message


def test_invalid_utf8_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "\xff"}\n')
    message = data_error(tiny_tokenizer, path=str(path))
    assert message.startswith(f"{path}:2: not valid UTF-8")


def test_bad_row_in_parquet_names_the_row(tmp_path, tiny_tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"instruction": "x", "input": "", "output": ""}, GOOD]), path)
    message = data_error(tiny_tokenizer, path=str(path))
    assert message.startswith(f"{path}, row 2: field 'output' is empty")


def test_corrupt_parquet(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"not parquet at all")
    message = data_error(tiny_tokenizer, path=str(path))
    assert str(path) in message and "cannot be read as Parquet" in message


def test_directory_that_is_not_a_saved_dataset(tmp_path, tiny_tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    message = data_error(tiny_tokenizer, path=str(folder))
    assert str(folder) in message and "save_to_disk" in message


def test_txt_file_with_a_structured_format(tmp_path, tiny_tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("one\n\ntwo\n", encoding="utf-8")
    message = data_error(tiny_tokenizer, path=str(path), format="alpaca")
    assert str(path) in message and "data.format" in message


def test_chat_rows_need_a_chat_template(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    path = write_lines(tmp_path / "chat.jsonl", rows(GOOD_CHAT, GOOD_CHAT))
    message = data_error(tokenizer, path=path)
    assert path in message and "chat template" in message


def test_unknown_builtin(tiny_tokenizer):
    message = data_error(tiny_tokenizer, path="builtin:nope")
    assert "data.path" in message and "builtin:nope" in message and "builtin:sample-instructions" in message


def test_relative_path_is_shown_as_given(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("data")
    write_lines(tmp_path / "data" / "train.jsonl", rows(GOOD, {"instruction": "x"}, GOOD))
    message = data_error(tiny_tokenizer, path="data/train.jsonl")
    assert message == (
        "data/train.jsonl:2: field 'output' is missing (alpaca rows need 'instruction' and 'output' strings "
        "and may have an 'input' string). Fix the row, or set data.skip_bad_rows=true to skip bad rows."
    )
