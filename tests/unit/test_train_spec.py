"""The run spec: one constructor for a job and a trial, one run length, small enough to ship to every worker."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from ftune.config import TrainJobConfig
from train.phases import NO_PHASE_TIMER
from train.spec import RunSpec, total_steps

TRAIN = Path(__file__).resolve().parents[2] / "train"


def job(tmp_path, **train) -> TrainJobConfig:
    return TrainJobConfig.model_validate(
        {"storage": {"path": str(tmp_path / "runs")}, "train": {"global_batch_size": 8, "micro_batch_size": 4, **train}}
    )


def test_the_run_length_is_max_steps_or_whole_epochs_of_full_global_batches(tmp_path):
    assert total_steps(job(tmp_path, epochs=3).train, 20) == 3 * 2  # 20 examples: 2 full batches of 8 an epoch
    assert total_steps(job(tmp_path, epochs=3, max_steps=5).train, 20) == 5


def test_a_spec_names_where_the_run_lives_and_what_it_was_made_with(tmp_path):
    cfg = job(tmp_path, epochs=2)
    spec = RunSpec.of(cfg, "run-a", deepspeed_user={"gradient_clipping": 1.0}, train_examples=17)
    assert spec.name == "run-a" and spec.fingerprint == cfg.fingerprint()
    assert spec.storage_uri == str(tmp_path / "runs") and spec.endpoint_url is None
    assert spec.local_run_dir == str(tmp_path / "runs" / "run-a")
    assert spec.adapter_uri == spec.storage().uri_of("run-a", "adapter")
    assert spec.config() == cfg
    assert spec.total_steps() == 2 * 2
    assert (spec.data, spec.init_checkpoint, spec.adopt, spec.stop_signal, spec.phase_timer) == (
        None, None, False, None, None
    )


def test_a_spec_never_changes_and_copies_small(tmp_path):
    spec = RunSpec.of(job(tmp_path), "run-a", deepspeed_user=None, train_examples=17)
    started = spec.replace(init_checkpoint="runs/x/checkpoint_step0000003", adopt=True, phase_timer=NO_PHASE_TIMER)
    assert (spec.init_checkpoint, spec.adopt) == (None, False)
    assert (started.init_checkpoint, started.adopt, started.name) == ("runs/x/checkpoint_step0000003", True, "run-a")
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    shipped = pickle.loads(pickle.dumps(started))
    assert shipped.replace(phase_timer=None) == started.replace(phase_timer=None)
    assert type(shipped.phase_timer) is type(NO_PHASE_TIMER)
    assert len(pickle.dumps(started)) < 16_000  # the job as JSON and a few strings: no data, no tokenizer
