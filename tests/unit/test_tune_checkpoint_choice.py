"""Which checkpoints a sweep uses: the leaderboard takes only an adapter its manifest vouches for, and a PBT
exploit whose donor checkpoint is gone (pruned by Ray, or half copied) is skipped instead of failing the sweep."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers.pbt import _PBTTrialState

from ftune.storage import Storage
from tune.leaderboard import adapter_of
from tune.schedulers import PBT_DIR, CheckpointPBT


def adapter_checkpoint(run_dir: Path, step: int, *, manifest: bool = True) -> Path:
    """A checkpoint directory holding an adapter and (unless told otherwise) rank 0's manifest of it."""
    ckpt = run_dir / f"checkpoint_step{step:07d}"
    files = {"adapter/adapter_config.json": b'{"r": 4}', "adapter/adapter_model.safetensors": f"w{step}".encode()}
    for rel, data in files.items():
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_bytes(data)
    if manifest:
        digests = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
        (ckpt / "manifest_rank0.json").write_text(json.dumps(digests))
    return ckpt


def test_leaderboard_takes_only_a_verified_checkpoint_adapter(tmp_path):
    run = tmp_path / "trial1"
    adapter_checkpoint(run, 5)
    adapter_checkpoint(run, 10)
    adapter_checkpoint(run, 15, manifest=False)  # rank 0 died before its manifest: never committed
    storage = Storage(str(tmp_path))
    assert adapter_of(storage, "trial1", 15) == str(run / "checkpoint_step0000010" / "adapter")
    (run / "checkpoint_step0000010" / "adapter" / "adapter_model.safetensors").write_bytes(b"w1")  # a partial upload
    assert adapter_of(storage, "trial1", 15) == str(run / "checkpoint_step0000005" / "adapter")
    assert adapter_of(storage, "trial1", 4) == str(run / "checkpoint_step0000005" / "adapter")  # none seen yet: newest
    (run / "checkpoint_step0000005" / "manifest_rank0.json").write_text('{"adapter/adapter_con')
    assert adapter_of(storage, "trial1", 15) is None


def stub(trial_id: str) -> Trial:
    trial = Trial("run_trial", config={"train.lr": 1e-3}, trial_id=trial_id, stub=True)
    trial.status = "RUNNING"
    return trial


@pytest.mark.parametrize("donor_state", ["pruned", "half-written"])
def test_pbt_skips_an_exploit_whose_donor_checkpoint_is_gone(tmp_path, capsys, donor_state):
    storage = Storage(str(tmp_path / "sweep"))
    pbt = CheckpointPBT(sweep_uri=str(tmp_path / "sweep"), storage=storage, total_steps=40, population_fits=True,
                        metric="eval_loss", mode="min", perturbation_interval=10,
                        hyperparam_mutations={"train.lr": [1e-3, 2e-3]})
    worse, donor = stub("worse"), stub("donor")
    for trial in (worse, donor):
        pbt._trial_state[trial] = _PBTTrialState(trial)
    source = tmp_path / "sweep" / "trials" / "donor" / "checkpoint_step0000010"
    if donor_state == "half-written":
        adapter_checkpoint(source.parent, 10, manifest=False)  # what a copy racing Ray's pruning may see
    pbt.latest["donor"] = (str(source), 10)
    # No Tune controller: reaching Tune's exploit (which needs one) would fail the test.
    pbt._checkpoint_or_exploit(worse, None, upper_quantile=[donor], lower_quantile=[worse])
    assert worse.config == {"train.lr": 1e-3}
    assert "donor" not in pbt.latest
    assert not storage.exists(PBT_DIR, "worse-x01"), "the failed copy was left behind"
    out = capsys.readouterr().out
    assert f"PBT: trial worse does not exploit donor: its checkpoint at step 10 ({source}) is gone or incomplete" in out
    assert "the trial continues unchanged" in out
