"""Files that are not what a reader expects: UTF-16/UTF-32/binary text files, old-Mac line ends, JSON nested
past the parser's stack, escapes that are not text, damaged saved datasets. Each is a DataError naming
the file, the line and the fix (or a row data.skip_bad_rows skips), never another exception.
"""

from __future__ import annotations

import json

import pytest

from ftune.config import DataConfig
from ftune.data import prepare_data
from ftune.data.readers import read_source
from ftune.errors import DataError

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}
JSONL = "".join(json.dumps(row) + "\n" for row in [GOOD, GOOD, GOOD])


def skipping(path) -> DataConfig:
    return DataConfig(path=str(path), validation_fraction=0.5, skip_bad_rows=True)


def data_error(tokenizer, path, **cfg) -> str:
    cfg.setdefault("validation_fraction", 0.5)
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(path), **cfg), tokenizer)
    return str(e.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
@pytest.mark.parametrize(
    ("codec", "named", "iconv"),
    [
        ("utf-16", "UTF-16 (little-endian, with a byte-order mark)", "iconv -f UTF-16 "),
        ("utf-16-be", "UTF-16 (big-endian, without a byte-order mark)", "iconv -f UTF-16BE "),
        ("utf-16-le", "UTF-16 (little-endian, without a byte-order mark)", "iconv -f UTF-16LE "),
        ("utf-32", "UTF-32 (little-endian, with a byte-order mark)", "iconv -f UTF-32 "),
    ],
)
def test_utf16_and_utf32_files_are_named_with_the_conversion(tmp_path, suffix, codec, named, iconv):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(JSONL.encode(codec))
    with pytest.raises(DataError) as e:
        read_source(str(path))
    message = str(e.value)
    assert message.startswith(f"{path}:1: the file is {named}, not UTF-8"), message
    assert f"{iconv}-t UTF-8 {path} > {tmp_path / f'train.utf8{suffix}'}" in message
    assert "data.path" in message


def test_a_binary_file_is_not_read_as_text(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(bytes(range(256)) * 4 + b"\x00" * 1024)
    message = data_error(tiny_tokenizer, path)
    assert message.startswith(f"{path}:1: the file holds binary data (NUL bytes)")


def test_a_nul_byte_in_one_line_is_that_row_s_problem(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_bytes(JSONL.encode() + b'{"instruction": "a\x00", "output": "b"}\n' + JSONL.encode())
    message = data_error(tiny_tokenizer, path)
    assert message.startswith(f"{path}:4: a NUL byte at column 19"), message
    prepare_data(skipping(path), tiny_tokenizer)


@pytest.mark.parametrize("newline", ["\r", "\r\n", "\n"])
def test_every_line_ending_separates_rows_and_counts_lines(tmp_path, newline):
    bad = '{"instruction": "x", "output": }'
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(newline.join([json.dumps(GOOD), bad, "", json.dumps(GOOD)]).encode())
    rows = read_source(str(jsonl)).rows
    assert [(r.line, r.error is None) for r in rows] == [(1, True), (2, False), (4, True)]

    text = tmp_path / "notes.txt"
    text.write_bytes(newline.join(["one", "two", "", "three", ""]).encode())
    assert [(r.line, r.value["text"]) for r in read_source(str(text)).rows] == [(1, "one\ntwo"), (4, "three")]

    listed = tmp_path / "train.json"
    listed.write_bytes(newline.join(["[", json.dumps(GOOD) + ",", "", json.dumps(GOOD), "]"]).encode())
    assert [r.line for r in read_source(str(listed)).rows] == [2, 4]


def test_a_cr_only_file_names_the_bad_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(GOOD), json.dumps(GOOD), '{"instruction": 1}', json.dumps(GOOD)]
    path.write_bytes("\r".join(lines).encode())
    assert data_error(tiny_tokenizer, path).startswith(f"{path}:3: field 'instruction' must be a string")


DEEP = "[" * 100_000


def test_a_jsonl_line_nested_too_deep_is_a_bad_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(JSONL + '{"instruction": ' + DEEP + "\n" + JSONL, encoding="utf-8")
    message = data_error(tiny_tokenizer, path)
    assert message.startswith(f"{path}:4: the line is nested deeper than the JSON reader allows"), message
    assert "set data.skip_bad_rows=true" in message
    data = prepare_data(skipping(path), tiny_tokenizer)
    assert data.stats.skipped_lines == [4]


def test_a_json_list_row_nested_too_deep_names_its_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + DEEP + "\n]", encoding="utf-8")
    message = data_error(tiny_tokenizer, path)
    assert message.startswith(f"{path}:3: the row starting here is nested deeper"), message


def test_a_json_object_nested_too_deep_is_read_as_bad_lines(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.json"
    path.write_text('{"data":\n' + DEEP, encoding="utf-8")
    assert data_error(tiny_tokenizer, path).startswith(f"{path}:1: invalid JSON: Expecting value")


def test_an_unpaired_surrogate_escape_names_the_field(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(JSONL + '{"instruction": "a\\ud800b", "output": "x"}\n' + JSONL, encoding="utf-8")
    message = data_error(tiny_tokenizer, path)
    expected = f"{path}:4: field 'instruction' holds an unpaired surrogate ('\\ud800' at character 2)"
    assert message.startswith(expected), message
    data = prepare_data(skipping(path), tiny_tokenizer)
    assert data.stats.skipped_lines == [4]


def test_a_number_python_will_not_read_is_a_bad_row(tmp_path, tiny_tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(JSONL + '{"instruction": "a", "output": ' + "9" * 5000 + "}\n", encoding="utf-8")
    assert data_error(tiny_tokenizer, path).startswith(f"{path}:4: unreadable JSON: Exceeds the limit")


def test_a_damaged_saved_dataset_is_a_data_error(tmp_path, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([GOOD] * 4).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:100])
    message = data_error(tiny_tokenizer, folder)
    assert message.startswith(f"{folder}: cannot be read as a dataset saved with Dataset.save_to_disk")
    assert "save it again" in message
