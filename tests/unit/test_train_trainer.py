"""The trainer leaves out Ray Data's set-up when it has no datasets, and keeps it when it has some; it never starts
Ray Train's per-run placement-group cleaner."""

from __future__ import annotations

from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from train.trainer import LoraTrainer


def callback_types(trainer) -> set[type]:
    return {type(c) for c in trainer._create_default_callbacks()}


def test_no_ray_data_setup_without_datasets():
    trainer = LoraTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    types = callback_types(trainer)
    assert DatasetsCallback not in types and PlacementGroupCleanerCallback not in types
    assert any(t.__name__ == "BackendSetupCallback" for t in types)  # the rest of Ray's callbacks stay


def test_ray_data_setup_kept_with_datasets():
    trainer = LoraTrainer(
        lambda: None,
        scaling_config=ScalingConfig(num_workers=1),
        datasets={"train": lambda: None},  # a dataset factory, never called here
    )
    types = callback_types(trainer)
    assert DatasetsCallback in types and PlacementGroupCleanerCallback not in types
