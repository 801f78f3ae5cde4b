"""A trial's Train-run bookkeeping (no Ray): a trial Tune stopped never starts its run; the registry pickles light
and is found again through the sweep's session."""

from __future__ import annotations

import pickle

from tune.budget import SpendLedger
from tune.config import BudgetConfig
from tune.placement_groups import PlacementGroupRegistry, abort_run, end_run, start_run, was_stopped
from tune.sweep_session import SweepSession


def test_trial_stopped_before_its_run_starts_never_starts_it():
    abort_run("stopped-early", timeout_s=0.1)  # Tune's stop reached the trial before run_trial registered its run
    assert was_stopped("stopped-early")
    assert start_run("stopped-early") is None  # so no controller, workers or placement group are created
    end_run("stopped-early")  # harmless without a run
    assert not was_stopped("another-trial")


def test_registry_pickles_to_its_sweep_uri_and_finds_the_live_one(tmp_path):
    live = PlacementGroupRegistry(str(tmp_path))  # what open() makes, minus its Ray queue
    ledger = SpendLedger.open(tmp_path, BudgetConfig(), rate_usd_per_h=1.0, estimate_trial_s=1.0, report_interval_s=1.0)
    session = SweepSession.begin(str(tmp_path), ledger, placement_groups=live)
    try:
        copy = pickle.loads(pickle.dumps(live))
        assert copy.queue is None and copy.groups == {} and copy.runs == {} and copy.sweep_uri == str(tmp_path)
        assert copy.live() is live
    finally:
        session.end()
    assert copy.live() is None  # the sweep's run in this process is over

