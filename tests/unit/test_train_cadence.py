"""The step cadence: which steps evaluate, checkpoint, report and end the run (clock readings by hand, no sleeps)."""

from __future__ import annotations

import math

from train.cadence import Cadence, StepActions

NEVER = -math.inf


def cadence(**changes) -> Cadence:
    settings = dict(total_steps=10, eval_every=4, checkpoint_every=5, report_interval_s=30.0,
                    preemption_check_interval_s=2.0)
    return Cadence(**{**settings, **changes})


def after(c: Cadence, step: int, clock: float = 100.0, last_report: float = 99.0, *, preempted: bool = False,
          stopping: bool = False) -> StepActions:
    return c.after_step(step, clock, last_report, preempted=preempted, stopping=stopping)


def test_a_quiet_step_does_nothing_but_train():
    assert after(cadence(), 1) == StepActions(evaluate=False, checkpoint=False, report=False, jit=False, last=False)


def test_evaluation_and_checkpoint_steps_follow_their_intervals_and_report():
    c = cadence()
    assert [s for s in range(1, 11) if after(c, s).evaluate] == [4, 8, 10]
    assert [s for s in range(1, 11) if after(c, s).checkpoint] == [5, 10]
    assert [s for s in range(1, 11) if after(c, s).report] == [4, 5, 8, 10]


def test_the_last_step_evaluates_checkpoints_and_ends():
    assert after(cadence(), 10) == StepActions(evaluate=True, checkpoint=True, report=True, jit=False, last=True)


def test_a_stop_request_makes_this_step_the_last():
    actions = after(cadence(), 3, stopping=True)
    assert actions == StepActions(evaluate=True, checkpoint=True, report=True, jit=False, last=True)


def test_after_a_preemption_notice_every_step_checkpoints_just_in_time():
    c = cadence()
    for step in (1, 2, 3):
        actions = after(c, step, preempted=True)
        assert actions.checkpoint and actions.jit and actions.report and not actions.evaluate and not actions.last


def test_reports_come_at_least_every_report_interval_of_rank_0s_clock():
    c = cadence(report_interval_s=30.0)
    assert not after(c, 1, clock=129.9, last_report=100.0).report
    assert after(c, 1, clock=130.0, last_report=100.0).report
    assert after(c, 1, clock=0.0, last_report=NEVER).report  # the first step always reports


def test_preemption_checks_are_spaced_by_their_interval():
    c = cadence(preemption_check_interval_s=2.0)
    assert c.check_preemption(5.0, NEVER)
    assert not c.check_preemption(6.9, 5.0)
    assert c.check_preemption(7.0, 5.0)
