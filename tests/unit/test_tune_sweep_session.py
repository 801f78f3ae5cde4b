"""The sweep's session: one key however the location is spelled, and a budget stop recorded and signalled once."""

from __future__ import annotations

from tune.budget import SpendLedger
from tune.config import BudgetConfig
from tune.sweep_session import SweepSession, sweep_key


def ledger(tmp_path) -> SpendLedger:
    return SpendLedger.open(tmp_path, BudgetConfig(usd=1.0), rate_usd_per_h=36.0, estimate_trial_s=1.0,
                            report_interval_s=1.0, clock=lambda: 0.0)


def test_session_is_found_by_one_key_however_the_location_is_spelled(tmp_path, monkeypatch):
    session = SweepSession.begin(tmp_path / "." / "sweep", ledger(tmp_path))
    try:
        monkeypatch.chdir(tmp_path)
        assert SweepSession.of("sweep") is session and SweepSession.of(str(tmp_path / "sweep")) is session
        assert sweep_key("s3://b/sweeps/s") == "s3://b/sweeps/s" and SweepSession.find("s3://b/sweeps/s") is None
    finally:
        session.end()
    assert SweepSession.find(tmp_path / "sweep") is None


class Signal:
    """Stands in for the ``StopSignal`` actor handle: records what ``request.remote`` was called with."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.request = self

    def remote(self, reason: str) -> None:
        self.requests.append(reason)


def test_request_stop_records_the_stop_and_raises_the_signal(tmp_path):
    signal = Signal()
    session = SweepSession.begin(tmp_path, ledger(tmp_path), stop_signal=signal)
    try:
        session.request_stop("budget reached", now=0.0)
        assert session.ledger.stop["reason"] == "budget reached" and signal.requests == ["budget reached"]
        assert len(session.ledger.history) == 1 and (tmp_path / "spend.json").is_file()
    finally:
        session.end()
