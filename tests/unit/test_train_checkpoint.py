"""Checkpoints: every kind of damage is a CorruptCheckpoint, found before the engine is touched; the driver
refuses a run whose checkpoints were made with another config.

A real DeepSpeed ZeRO-2 engine over the tiny model's peft adapter (one process, gloo) writes the checkpoint
each test damages in its own way.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftune.config import TrainJobConfig
from ftune.errors import UserError
from ftune.yaml_config import load_config
from train.checkpoint import (
    CorruptCheckpoint,
    TrainState,
    load_checkpoint,
    newest_readable_meta,
    save_checkpoint,
    verify_adapter,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """A one-process DeepSpeed engine that has taken one optimizer step (Adam state exists)."""
    import torch.distributed as dist

    from train.loop import build_engine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
        cfg = load_config(TrainJobConfig, REPO / "configs" / "train" / "tiny.yaml",
                          ["scaling.num_workers=1", "tracking.wandb=disabled", "lora.r=4", "lora.alpha=8"])
        eng, _ = build_engine(cfg, 1, 10, {})
        ids = torch.arange(3, 20).unsqueeze(0)
        for _ in range(eng.gradient_accumulation_steps()):
            eng.backward(eng(input_ids=ids, labels=ids).loss)
            eng.step()
        try:
            yield eng
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "checkpoint_step0000003"
    save_checkpoint(engine, TrainState(step=3, total_steps=10, config_fingerprint="abc"), out, rank=0)
    return out


def trainable(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def copy_of(saved: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / saved.name
    shutil.copytree(saved, ckpt)
    return ckpt


def rewrite(ckpt: Path, rel: str, data: bytes) -> None:
    """Replace a file and its manifest entry: what a writer with a bug (or another version) leaves behind."""
    (ckpt / rel).write_bytes(data)
    manifest = json.loads((ckpt / "manifest_rank0.json").read_text())
    manifest[rel] = hashlib.sha256(data).hexdigest()
    (ckpt / "manifest_rank0.json").write_text(json.dumps(manifest))


def edit_state(ckpt: Path, change) -> None:
    meta = json.loads((ckpt / "train_state.json").read_text())
    change(meta)
    rewrite(ckpt, "train_state.json", json.dumps(meta).encode())


def edit_tensors(ckpt: Path, change) -> None:
    tensors = load_file(str(ckpt / "engine_state.safetensors"))
    change(tensors)
    save_file(tensors, str(ckpt / "scratch.safetensors"))
    rewrite(ckpt, "engine_state.safetensors", (ckpt / "scratch.safetensors").read_bytes())


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def first_param(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.startswith("param/"))


DAMAGE = {
    "train_state.json truncated": (lambda c: truncate(c / "train_state.json"), "train_state.json is unreadable"),
    "manifest truncated": (lambda c: truncate(c / "manifest_rank0.json"), "manifest_rank0.json is unreadable"),
    "manifest not a mapping": (lambda c: (c / "manifest_rank0.json").write_text("[1, 2]"), "not a mapping of file"),
    "manifest lists too little": (lambda c: (c / "manifest_rank0.json").write_text("{}"), "does not list train_state.json"),
    "no manifest": (lambda c: (c / "manifest_rank0.json").unlink(), "rank 0 never finished writing"),
    "weights missing": (lambda c: (c / "engine_state.safetensors").unlink(), "engine_state.safetensors is missing"),
    "weights truncated": (lambda c: truncate(c / "engine_state.safetensors"), "does not match its checksum"),
    "train state not JSON": (lambda c: rewrite(c, "train_state.json", b'{"train_state": {"st'), "JSONDecodeError"),
    "train state a list": (lambda c: rewrite(c, "train_state.json", b"[]"), "not a mapping"),
    "step missing": (lambda c: edit_state(c, lambda m: m["train_state"].pop("step")), "train_state lacks step"),
    "world size a string": (lambda c: edit_state(c, lambda m: m["train_state"].update(world_size="1")), "not a count"),
    "counter missing": (lambda c: edit_state(c, lambda m: m.pop("global_steps")), "no 'global_steps'"),
    "weights not safetensors": (lambda c: rewrite(c, "engine_state.safetensors", b"\x08" + b"\x00" * 64), "unreadable"),
    "a parameter missing": (lambda c: edit_tensors(c, lambda t: t.pop(first_param(t))), "has no param/"),
    "a parameter reshaped": (lambda c: edit_tensors(c, lambda t: t.update({first_param(t): torch.zeros(3, 3)})),
                             "has shape (3, 3)"),
    "rng state empty": (lambda c: rewrite(c, "rng_rank0.json", b"{}"), "rng_rank0 is unreadable"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_every_kind_of_damage_is_corrupt_and_leaves_the_engine_alone(engine, saved, tmp_path, kind):
    damage, message = DAMAGE[kind]
    ckpt = copy_of(saved, tmp_path)
    damage(ckpt)
    before = trainable(engine)
    with pytest.raises(CorruptCheckpoint, match=re.escape(message)):
        load_checkpoint(engine, ckpt, rank=0, world_size=1, fingerprint="abc")
    after = trainable(engine)
    assert all(torch.equal(before[n], after[n]) for n in before), "a rejected checkpoint changed the weights"


def test_a_good_checkpoint_loads_and_unknown_keys_are_ignored(engine, saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    edit_state(ckpt, lambda m: m["train_state"].update(field_from_a_newer_version=7))
    with torch.no_grad():
        for p in engine.module.parameters():
            if p.requires_grad:
                p.add_(1.0)  # away from the saved values
    assert verify_checkpoint(ckpt) == 1
    state = load_checkpoint(engine, ckpt, rank=0, world_size=1, fingerprint="abc")
    assert (state.step, state.restarts, state.total_steps) == (3, 1, 10)
    weights = load_file(str(ckpt / "engine_state.safetensors"))
    for name, value in trainable(engine).items():
        torch.testing.assert_close(value, weights[f"param/{name}"], rtol=0, atol=0)


def test_the_adapter_alone_verifies_against_the_manifest(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    verify_adapter(ckpt)
    truncate(ckpt / "adapter" / "adapter_model.safetensors")
    with pytest.raises(CorruptCheckpoint, match="adapter/adapter_model.safetensors is missing or does not match"):
        verify_adapter(ckpt)
    (ckpt / "manifest_rank0.json").unlink()
    with pytest.raises(CorruptCheckpoint, match="never finished writing"):
        verify_adapter(ckpt)


def test_driver_refuses_a_run_checkpointed_with_another_config(saved, tmp_path):
    from train.job import build_trainer
    from train.spec import RunData, RunSpec

    run = tmp_path / "runs" / "job"
    shutil.copytree(saved, run / "checkpoint_step0000003")
    shutil.copytree(saved, run / "checkpoint_step0000006")
    truncate(run / "checkpoint_step0000006" / "train_state.json")  # the newest is damaged: the one before decides
    import pyarrow.fs as pafs

    name, meta = newest_readable_meta(pafs.LocalFileSystem(), str(run))
    assert name == "checkpoint_step0000003" and meta.state.config_fingerprint == "abc"
    cfg = TrainJobConfig()
    spec = RunSpec(job={}, name="job", fingerprint="def", deepspeed_user=None, storage_uri=str(tmp_path / "runs"),
                   endpoint_url=None, local_run_dir=str(tmp_path / "runs" / "job"), adapter_uri="", train_examples=0)
    # Refused in the driver, before Ray is asked for anything (no Ray runs in this test).
    with pytest.raises(UserError, match=r"run 'job' .* different model/lora/data/train config .*checkpoint_step0000003: "
                                        r"abc; this job: def\)\. Give the job a new name"):
        build_trainer(cfg, spec, RunData(train=[], validation=[]))
    assert newest_readable_meta(pafs.LocalFileSystem(), str(tmp_path / "runs" / "other")) is None
