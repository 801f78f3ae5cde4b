"""The shared before-training evaluation: its premise (an untrained adapter is the base model, whatever its rank,
alpha, dropout or scaling), its key (what may differ between runs that share it, and what may not), and its file
(a missing, damaged or foreign one means the run evaluates for itself)."""

from __future__ import annotations

import math

import pytest
import torch

from ftune.adapters import add_adapter
from ftune.config import TrainJobConfig
from ftune.data import Example
from ftune.model import load_base_model
from ftune.storage import Storage
from train.baseline import BASELINE_DIR, baseline_key, read_baseline, validation_digest, write_baseline

EXAMPLES = [Example(input_ids=[1, 5, 9, 2], labels=[-100, 5, 9, 2], prompt_ids=[1, 5], reference="9"),
              Example(input_ids=[1, 7, 2], labels=[-100, 7, 2], prompt_ids=[1], reference="7")]
VALIDATION = validation_digest(EXAMPLES)


def job(**sections) -> TrainJobConfig:
    return TrainJobConfig.model_validate(sections)


@pytest.mark.parametrize("lora, exact", [
    ({"r": 4, "alpha": 8, "dropout": 0.1}, True),
    ({"r": 32, "alpha": 7, "use_rslora": True, "bias": "all"}, True),
    ({"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}, True),
    ({"r": 8, "alpha": 16, "use_dora": True}, False),  # magnitude / its own norm: 1 up to rounding
])
def test_an_untrained_adapter_is_the_base_model(tiny_model_dir, lora, exact):
    cfg = job(model={"name_or_path": str(tiny_model_dir)}, lora=lora)
    ids = torch.tensor([[1, 17, 42, 99, 7, 3]])
    base = load_base_model(cfg.model, dtype=torch.float32, for_training=False).eval()
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        got = add_adapter(base, cfg.lora).eval()(input_ids=ids).logits
    if exact:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_the_key_ignores_only_what_an_untrained_adapter_does_not_depend_on():
    base = job()
    key = baseline_key(base, VALIDATION)
    searched = job(name="other", lora={"r": 64, "alpha": 3, "dropout": 0.3, "use_rslora": True},
                   train={"lr": 0.1, "seed": 7, "max_steps": 5, "global_batch_size": 64, "eval_every": 3,
                          "warmup_ratio": 0.5, "lr_schedule": "linear"},
                   storage={"path": "/elsewhere"}, tracking={"wandb": "disabled"})
    assert baseline_key(searched, VALIDATION) == key
    for changed in ({"lora": {"use_dora": True}}, {"lora": {"target_modules": ["q_proj"]}},
                    {"train": {"micro_batch_size": 2}}, {"train": {"eval_batches": 3}},
                    {"train": {"exact_match_examples": 0}}, {"train": {"precision": "bf16"}},
                    {"data": {"max_seq_len": 64}}, {"data": {"seed": 1}}, {"model": {"load_in_4bit": True}},
                    {"model": {"name_or_path": "/another/model"}}, {"scaling": {"num_workers": 3}}):
        assert baseline_key(job(**changed), VALIDATION) != key, changed
    assert baseline_key(base, validation_digest(EXAMPLES[:1])) != key  # other validation examples
    assert baseline_key(base, validation_digest([EXAMPLES[0], Example(input_ids=[1, 7, 2], labels=[-100, 7, 2], prompt_ids=[1],
                                                      reference="8")])) != key  # another reference answer


def test_shared_metrics_round_trip(tmp_path):
    storage = Storage(str(tmp_path))
    assert read_baseline(storage, "k1") is None
    write_baseline(storage, "k1", {"eval_loss": 2.5, "eval_perplexity": math.exp(2.5), "exact_match": 0.25}, "trial-a")
    assert read_baseline(storage, "k1") == {
        "metrics": {"eval_loss": 2.5, "eval_perplexity": math.exp(2.5), "exact_match": 0.25}, "run": "trial-a"}
    assert read_baseline(storage, "k2") is None


@pytest.mark.parametrize("text", [
    '{"metrics": {"eval_loss": 2.5}, "run": "tri',  # half written
    "",
    "[1, 2]",
    '{"metrics": {"eval_loss": "2.5"}, "run": "trial-a"}',
    '{"metrics": {"eval_loss": NaN}, "run": "trial-a"}',
    '{"metrics": {"eval_loss": Infinity}, "run": "trial-a"}',
    '{"metrics": {"eval_perplexity": 3.0}, "run": "trial-a"}',
    '{"metrics": {"eval_loss": 2.5}}',
])
def test_a_damaged_or_foreign_file_means_the_run_evaluates_itself(tmp_path, text):
    (tmp_path / BASELINE_DIR).mkdir()
    (tmp_path / BASELINE_DIR / "k1.json").write_text(text)
    assert read_baseline(Storage(str(tmp_path)), "k1") is None


def test_a_failed_write_only_warns(tmp_path, caplog):
    (tmp_path / BASELINE_DIR).write_text("a file where the directory goes")
    write_baseline(Storage(str(tmp_path)), "k1", {"eval_loss": 1.0}, "trial-a")
    assert "could not share" in caplog.text  # and nothing raised: the run goes on
