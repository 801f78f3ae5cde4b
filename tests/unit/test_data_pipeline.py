"""prepare_data end to end: every source format, the seeded split, validation files, packing, skipping."""

from __future__ import annotations

import json

import pytest

from ftune.config import DataConfig
from ftune.data import IGNORE_INDEX, prepare_data
from ftune.sample_data import generate_rows, to_chat

N = 40


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def alpaca_rows(n: int = N, seed: int = 0) -> list[dict]:
    return generate_rows(n, seed=seed)


def _alpaca_jsonl(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows())


def _chat_jsonl(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [to_chat(row) for row in alpaca_rows()])


def _text_jsonl(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [{"text": row["instruction"]} for row in alpaca_rows()])


def _json_list(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(alpaca_rows(), indent=1), encoding="utf-8")
    return str(path)


def _txt(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(
        "\n\n".join(f"{r['instruction']}\n{r['output']}" for r in alpaca_rows()) + "\n", encoding="utf-8"
    )
    return str(path)


def _parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([to_chat(row) for row in alpaca_rows()]), path)
    return str(path)


def _saved_dataset(tmp_path):
    import datasets

    path = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(alpaca_rows())}).save_to_disk(str(path))
    return str(path)


SOURCES = {
    "alpaca_jsonl": (_alpaca_jsonl, "alpaca"),
    "chat_jsonl": (_chat_jsonl, "chat"),
    "text_jsonl": (_text_jsonl, "text"),
    "json_list": (_json_list, "alpaca"),
    "txt": (_txt, "text"),
    "parquet_chat": (_parquet, "chat"),
    "save_to_disk": (_saved_dataset, "alpaca"),
}


@pytest.mark.parametrize("name", list(SOURCES))
def test_every_source_format_gives_one_example_per_row(tmp_path, tiny_tokenizer, name):
    make, fmt = SOURCES[name]
    data = prepare_data(DataConfig(path=make(tmp_path), validation_fraction=0.25), tiny_tokenizer)
    assert (len(data.train), len(data.validation)) == (30, 10)
    assert data.stats.format == fmt and data.stats.rows_read == N
    assert fmt in data.summary()
    for example in data.train + data.validation:
        assert len(example.input_ids) == len(example.labels) > 0
        assert example.num_trained > 0
    if fmt == "text":
        assert all(e.prompt_ids is None for e in data.validation)
    else:
        assert all(e.prompt_ids and e.reference for e in data.validation)
        assert all(e.prompt_ids is None and e.reference is None for e in data.train)


def test_chat_and_alpaca_versions_of_a_row_tokenize_identically(tmp_path, tiny_tokenizer):
    alpaca_path = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())
    chat_path = write_jsonl(tmp_path / "chat.jsonl", [to_chat(row) for row in alpaca_rows()])
    alpaca = prepare_data(DataConfig(path=alpaca_path), tiny_tokenizer)
    chat = prepare_data(DataConfig(path=chat_path), tiny_tokenizer)
    assert [e.input_ids for e in alpaca.train] == [e.input_ids for e in chat.train]
    assert [e.labels for e in alpaca.train] == [e.labels for e in chat.train]


def test_format_detection_is_reported(tmp_path, tiny_tokenizer):
    data = prepare_data(DataConfig(path=_chat_jsonl(tmp_path)), tiny_tokenizer)
    assert (data.stats.format, data.stats.format_origin) == ("chat", "detected from line 1")
    assert "chat, detected from line 1" in data.summary()
    data = prepare_data(DataConfig(path=_chat_jsonl(tmp_path), format="chat"), tiny_tokenizer)
    assert data.stats.format_origin == "set by data.format"


def references(data) -> list[str]:
    return [example.reference for example in data.validation]


def test_split_is_deterministic_per_seed(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(200))
    first = prepare_data(DataConfig(path=path, seed=1, validation_fraction=0.1), tiny_tokenizer)
    again = prepare_data(DataConfig(path=path, seed=1, validation_fraction=0.1), tiny_tokenizer)
    other = prepare_data(DataConfig(path=path, seed=2, validation_fraction=0.1), tiny_tokenizer)
    assert len(first.validation) == 20 and len(first.train) == 180
    assert references(first) == references(again)
    assert [e.input_ids for e in first.train] == [e.input_ids for e in again.train]
    assert [e.input_ids for e in first.validation] != [e.input_ids for e in other.validation]
    # Train and validation partition the rows: no row is in both, none is lost.
    all_ids = sorted(tuple(e.input_ids) for e in first.train + first.validation)
    assert all_ids == sorted(tuple(e.input_ids) for e in other.train + other.validation)


def test_max_validation_rows_caps_the_held_out_rows(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(200))
    data = prepare_data(DataConfig(path=path, validation_fraction=0.5, max_validation_rows=7), tiny_tokenizer)
    assert (len(data.train), len(data.validation)) == (193, 7)


def test_validation_path_is_used_instead_of_a_split(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(30, seed=0))
    val_rows = [to_chat(row) for row in alpaca_rows(12, seed=9)]  # another format is fine
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    data = prepare_data(DataConfig(path=train, validation_path=val, max_validation_rows=10), tiny_tokenizer)
    assert len(data.train) == 30
    assert references(data) == [row["messages"][-1]["content"] for row in val_rows[:10]]
    assert data.stats.validation_source == val and f"from {val}" in data.summary()


def test_max_rows_limits_the_training_file(tmp_path, tiny_tokenizer):
    data = prepare_data(
        DataConfig(path=_alpaca_jsonl(tmp_path), max_rows=20, validation_fraction=0.25), tiny_tokenizer
    )
    assert (len(data.train), len(data.validation), data.stats.rows_read) == (15, 5, 20)


def test_packing_fills_every_sequence_and_keeps_every_trained_token(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(100))
    cfg = DataConfig(path=path, max_seq_len=64, validation_fraction=0.1)
    plain = prepare_data(cfg, tiny_tokenizer)
    packed = prepare_data(cfg.model_copy(update={"packing": True}), tiny_tokenizer)
    assert all(len(e.input_ids) == len(e.labels) == len(e.position_ids) == 64 for e in packed.train)
    assert len(packed.train) < len(plain.train)
    assert packed.stats.packed_sequences == len(packed.train)
    # The same trained tokens, in the same order, each still aligned with its input position.
    trained = [l for e in plain.train for l in e.labels if l != IGNORE_INDEX]
    assert [l for e in packed.train for l in e.labels if l != IGNORE_INDEX] == trained
    for e in packed.train:
        assert all(l in (IGNORE_INDEX, t) for l, t in zip(e.labels, e.input_ids))
    # Positions restart at every packed example: one restart per example.
    assert sum(e.position_ids.count(0) for e in packed.train) == len(plain.train)
    assert packed.validation == plain.validation  # validation is never packed
    assert "packed into" in packed.summary()


def test_skip_bad_rows_reports_lines_and_reasons(tmp_path, tiny_tokenizer):
    rows = [json.dumps(row) for row in alpaca_rows(20)]
    rows[1] = json.dumps({"instruction": "no answer"})
    rows[6] = "{not json"
    rows[12] = json.dumps({"instruction": "x", "output": 3})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = prepare_data(
        DataConfig(path=str(path), skip_bad_rows=True, validation_fraction=0.25), tiny_tokenizer
    )
    assert data.stats.skipped_lines == [2, 7, 13]
    reasons = [row.reason for row in data.stats.skipped]
    assert "field 'output' is missing" in reasons[0]
    assert "invalid JSON" in reasons[1]
    assert "field 'output' must be a string" in reasons[2]
    assert all(row.file == str(path) for row in data.stats.skipped)
    assert len(data.train) + len(data.validation) == 17
    assert "3 bad rows skipped" in data.summary() and "lines 2, 7, 13" in data.summary()


def test_builtin_sample_dataset_is_the_default(tiny_tokenizer, sample_data_path):
    data = prepare_data(DataConfig(max_rows=100), tiny_tokenizer)
    assert data.stats.source == str(sample_data_path)
    assert (len(data.train), len(data.validation)) == (95, 5)
