"""ftune export: the merged model gives the adapter-on-base logits; bad inputs are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from ftune.entrypoint import run_job
from serve.export import main, merge_adapter


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    from serve.synthetic import write_random_adapters

    return write_random_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"), {"a": 5})["a"]


def test_merged_model_matches_adapter_on_base(adapter, tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_adapter(adapter, tmp_path / "merged")  # base read from adapter_config.json
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert json.loads((out / "ftune_export.json").read_text())["base"] == str(tiny_model_dir)

    ids = torch.tensor([tiny_tokenizer("Merge me, then compare the logits.")["input_ids"]])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():
        expected, got, plain = reference(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-2, "the adapter must change the logits, or this test proves nothing"
    assert AutoTokenizer.from_pretrained(out)("hi")["input_ids"] == tiny_tokenizer("hi")["input_ids"]


def test_cli_errors_exit_2_with_a_message(adapter, tmp_path, capsys):
    assert run_job(main, ["--adapter", str(tmp_path / "nope"), "--merge", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert run_job(main, ["--adapter", str(adapter), "--merge", str(occupied)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (occupied / "keep.txt").read_text() == "mine"
