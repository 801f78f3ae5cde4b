"""The training job end to end on a local Ray cluster: DeepSpeed ZeRO-2 over peft, CPU + gloo."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.adapters import add_adapter, load_adapter
from ftune.config import TrainJobConfig
from ftune.model import load_base_model
from ftune.yaml_config import load_config
from train.job import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "train" / "tiny.yaml"


def tiny_job(tmp_path: Path, *overrides: str) -> TrainJobConfig:
    return load_config(
        TrainJobConfig, TINY, [f"storage.path={tmp_path}", "tracking.wandb=offline", "data.max_validation_rows=64", *overrides]
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SHARED_RUN = ("train.max_steps=60", "train.eval_every=30", "train.checkpoint_every=20", "train.keep_checkpoints=2")
"""Settings of the module's shared 2-worker run (and of its one-worker twin)."""


@pytest.fixture(scope="module")
def two_worker_run(ray_local, tmp_path_factory):
    """One 2-worker ZeRO-2 run of the tiny config, shared by the checks below.

    One exact-match reference example for two workers: rank 1's share is empty, yet it must join every
    collective of the evaluation (test_fewer_exact_match_examples_than_workers_...); a hang there fails
    the module at pytest's timeout.
    """
    tmp = tmp_path_factory.mktemp("runs")
    cfg = tiny_job(tmp, *SHARED_RUN, "train.exact_match_examples=1")
    SIGINT_AROUND_RUN["before"] = signal.getsignal(signal.SIGINT)
    summary = run_training(cfg, name="two-workers")
    SIGINT_AROUND_RUN["after"] = signal.getsignal(signal.SIGINT)
    return cfg, summary, tmp / "two-workers"


SIGINT_AROUND_RUN: dict[str, object] = {}
"""This process's SIGINT handler before and after the shared run (Ray Train installs its own for a run)."""


def test_ctrl_c_is_the_process_own_again_after_the_run(two_worker_run):
    assert SIGINT_AROUND_RUN["after"] is SIGINT_AROUND_RUN["before"]


def test_run_records_and_eval_loss_falls(two_worker_run):
    cfg, summary, run_dir = two_worker_run
    assert summary["steps"] == 60 and summary["world_size"] == 2
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5, summary
    rows = read_metrics(run_dir)
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert all({"loss", "lr", "tokens_per_s", "step_time_s"} <= r.keys() for r in steps)
    assert {r["step"] for r in rows if "eval_perplexity" in r} == {0, 30, 60}
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("steps", "tokens", "eval_loss_before", "eval_loss_after", "tokens_per_s", "wall_time_s", "adapter_path"):
        assert saved[key] is not None
    # keep_checkpoints=2: of step 20/40/60 the best two by eval loss survive; the final one is best.
    checkpoints = sorted(p.name for p in run_dir.glob("checkpoint_step*"))
    assert len(checkpoints) == 2 and "checkpoint_step0000060" in checkpoints


def test_base_frozen_and_every_lora_weight_changed(two_worker_run, tiny_model_dir):
    cfg, summary, run_dir = two_worker_run
    trained = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    torch.manual_seed(cfg.train.seed)  # the loop initialises the adapter under this seed
    initial = add_adapter(load_base_model(cfg.model, dtype=torch.float32), cfg.lora)
    init_state = {n: p.detach() for n, p in initial.named_parameters() if "lora_" in n}
    assert len(trained) == len(init_state) > 0
    for name, value in init_state.items():
        key = name.replace(".default", "")
        assert not torch.equal(trained[key], value), f"{key} did not change"
    fresh = load_base_model(cfg.model, dtype=torch.float32)
    base_checksum = summary["base_weights_sha256"]
    from train.loop import frozen_weights_sha256

    assert frozen_weights_sha256(fresh) == base_checksum


def test_exported_adapter_reproduces_trained_logits(two_worker_run):
    cfg, summary, run_dir = two_worker_run
    final = run_dir / "checkpoint_step0000060" / "engine_state.safetensors"
    state = load_file(str(final))
    torch.manual_seed(0)
    trained = add_adapter(load_base_model(cfg.model, dtype=torch.float32), cfg.lora)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if param.requires_grad:
                param.copy_(state[f"param/{name}"])
    trained.eval()
    reloaded = load_adapter(load_base_model(cfg.model, dtype=torch.float32, for_training=False), run_dir / "adapter")
    ids = torch.arange(3, 40).unsqueeze(0)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_one_and_two_workers_same_loss_curve(two_worker_run, tmp_path):
    # The shared 2-worker run's settings on one worker (gradient accumulation 2): the same 60 losses.
    cfg, _, two_dir = two_worker_run
    one = tiny_job(tmp_path, *SHARED_RUN, "train.exact_match_examples=0", "scaling.num_workers=1")
    assert one.train.model_dump() | {"exact_match_examples": 0} == cfg.train.model_dump() | {"exact_match_examples": 0}
    run_training(one, name="one-worker")
    curves = {workers: [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
              for workers, run_dir in ((1, tmp_path / "one-worker"), (2, two_dir))}
    assert len(curves[1]) == len(curves[2]) == 60
    torch.testing.assert_close(torch.tensor(curves[2]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-5)
    assert curves[1][-1] < curves[1][0]


@pytest.mark.parametrize("variant", ["model.load_in_4bit=true", "lora.use_dora=true"], ids=["qlora", "dora"])
def test_qlora_and_dora_train(ray_local, tmp_path, variant):
    cfg = tiny_job(
        tmp_path, variant, "train.max_steps=30", "train.eval_every=30", "train.exact_match_examples=0", "scaling.num_workers=1"
    )
    summary = run_training(cfg, name="variant")
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.2, summary
    adapter_config = json.loads((tmp_path / "variant" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is cfg.lora.use_dora
    if cfg.model.load_in_4bit:
        assert_trained_on_nf4_base(cfg, summary)


def assert_trained_on_nf4_base(cfg: TrainJobConfig, summary: dict) -> None:
    """The base the run trained on was bitsandbytes NF4: its linear layers are Linear4bit with an NF4 quant state.

    The model is rebuilt the way the workers built it; its frozen-weight checksum equals the run's, so these
    are the packed 4-bit weights the run trained over (an unquantized base has other bytes).
    """
    import bitsandbytes as bnb

    from ftune.model import resolve_precision
    from train.loop import frozen_weights_sha256

    torch.manual_seed(cfg.train.seed)
    model = add_adapter(load_base_model(cfg.model, dtype=resolve_precision(cfg.train.precision, cfg.scaling.use_gpu)),
                        cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    wrapped = {name: m.base_layer for name, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")}
    assert wrapped, "no LoRA-wrapped layer"
    for name, base in wrapped.items():
        assert isinstance(base, bnb.nn.Linear4bit), f"{name} is {type(base).__name__}, not bitsandbytes Linear4bit"
        assert base.weight.quant_state is not None and base.weight.quant_state.quant_type == "nf4", name
        packed_bytes = base.weight.numel() * base.weight.element_size()  # two 4-bit values a byte
        assert packed_bytes * 2 == base.in_features * base.out_features, f"{name} is not packed 4-bit"
    assert frozen_weights_sha256(model) == summary["base_weights_sha256"]


def test_fewer_exact_match_examples_than_workers_runs_every_collective_on_every_rank(two_worker_run):
    # Rank 1's share of the one reference example is empty, yet it must join the exact-match all-reduce, or
    # the ranks' collectives pair up wrongly: an error, or a hang (the shared run never ends).
    _, summary, run_dir = two_worker_run
    assert summary["steps"] == 60 and summary["world_size"] == 2
    rows = [r for r in read_metrics(run_dir) if "exact_match" in r]
    assert [r["step"] for r in rows] == [0, 30, 60]
    assert all(r["exact_match_examples"] == 1 for r in rows), rows
    assert summary["exact_match_after"] in (0.0, 1.0)
