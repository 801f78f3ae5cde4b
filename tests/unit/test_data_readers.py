"""Readers: every supported source yields its rows with the right 1-based line (or row) numbers."""

from __future__ import annotations

import json

import pytest

from ftune.data.readers import read_source


def test_jsonl_skips_blank_lines_and_keeps_file_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n   \n{"text": "c"}\n', encoding="utf-8")
    source = read_source(str(path))
    assert [(row.line, row.value["text"]) for row in source.rows] == [(1, "a"), (3, "b"), (5, "c")]
    assert source.where(3) == f"{path}:3"


def test_jsonl_keeps_undecodable_lines_as_errors_for_the_skip_logic(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "bom"}\n{"text": \n{"text": "ok"}\n')
    rows = read_source(str(path)).rows
    assert rows[0].value == {"text": "bom"}  # a UTF-8 byte-order mark is not part of the row
    assert rows[1].line == 2 and rows[1].value is None and "invalid JSON" in rows[1].error
    assert rows[2].value == {"text": "ok"}


def test_json_list_rows_get_the_line_they_start_on(tmp_path):
    path = tmp_path / "train.json"
    rows = [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")  # each row spans 3 lines
    source = read_source(str(path))
    assert [row.value for row in source.rows] == rows
    assert [row.line for row in source.rows] == [2, 5, 8]


def test_json_file_may_hold_json_lines(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [row.value["text"] for row in read_source(str(path)).rows] == ["a", "b"]


def test_txt_paragraphs_are_rows_numbered_by_their_first_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\n\n\nnext one\n  \nlast\n", encoding="utf-8")
    source = read_source(str(path))
    assert source.fixed_format == "text"
    assert [(row.line, row.value) for row in source.rows] == [
        (1, {"text": "first line\nsecond line"}),
        (5, {"text": "next one"}),
        (7, {"text": "last"}),
    ]


def test_parquet_rows_are_numbered_from_one(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), path)
    source = read_source(str(path))
    assert [(row.line, row.value) for row in source.rows] == [(1, {"text": "a"}), (2, {"text": "b"})]
    assert source.where(2) == f"{path}, row 2"


def test_save_to_disk_directory_and_dataset_dict_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(single))
    assert [row.value for row in read_source(str(single)).rows] == [{"text": "a"}, {"text": "b"}]

    split = tmp_path / "dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"text": "t1"}, {"text": "t2"}, {"text": "t3"}]),
            "test": datasets.Dataset.from_list([{"text": "x"}]),
        }
    ).save_to_disk(str(split))
    source = read_source(str(split))
    assert [row.value["text"] for row in source.rows] == ["t1", "t2", "t3"]
    assert [row.line for row in source.rows] == [1, 2, 3]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_max_rows_reads_only_the_first_rows(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    if suffix == ".txt":
        path.write_text("\n\n".join(f"p{i}" for i in range(10)), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps([{"text": f"p{i}"} for i in range(10)]), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"text": f"p{i}"}) + "\n" for i in range(10)), encoding="utf-8")
    rows = read_source(str(path), max_rows=3).rows
    assert [row.value["text"] for row in rows] == ["p0", "p1", "p2"]


def test_builtin_sample_instructions_resolve_to_the_sample_file(sample_data_path):
    source = read_source("builtin:sample-instructions", max_rows=5)
    assert source.name == str(sample_data_path)
    assert len(source.rows) == 5
    assert set(source.rows[0].value) == {"instruction", "input", "output"}
