"""Where a finished sweep keeps its results: the one description of a sweep directory's layout.

The sweep writes them (``tune.sweep``), serving reads the leaderboard and the winner (``ftune serve
--sweep DIR``), the demo summarises them. The driver's directory holds::

    spend.json            the ledger: per-trial cost, status, steps; spend over time; budget stop
    leaderboard.json/csv  one row per trial, best first (trial, config, eval_loss, cost, adapter_path)
    best/adapter/         the best trial's PEFT adapter (best/trial.json: its row)
    report.html           offline report, its plots embedded: curves, loss vs cost, spend vs budget

and the sweep's place in storage holds ``trials/<run>/`` (each trial's training runs). Both are the same
directory unless ``storage.path`` is on s3://, where the driver works in a local directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftune.storage import Storage

SPEND_FILE = "spend.json"
LEADERBOARD_JSON = "leaderboard.json"
LEADERBOARD_CSV = "leaderboard.csv"
REPORT_FILE = "report.html"
BEST_DIR = "best"
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class SweepResult:
    """A sweep's result files: the driver's local directory and the sweep's root in storage."""

    local_dir: Path
    """The driver's directory: ledger, leaderboard, report and the best adapter."""
    storage: Storage
    """The sweep's root in storage (``<storage.path>/sweeps/<name>``), where ``trials/`` lives."""

    @classmethod
    def open(cls, location: str | Path, endpoint_url: str | None = None) -> SweepResult:
        """The sweep at a local directory (``~`` expanded), or at a storage URI whose driver files were
        fetched into this machine's ``FTUNE_HOME/sweeps/<name>`` (as the driver and ``--resume`` do)."""
        if "://" not in str(location):
            local = Path(location).expanduser()
            return cls(local, Storage(str(local), endpoint_url))
        from ftune.builtin_assets import ftune_home

        storage = Storage(str(location).rstrip("/"), endpoint_url)
        name = storage.uri_of().rsplit("/", 1)[-1]  # a sweep lives at <storage.path>/sweeps/<name>
        return cls(ftune_home() / "sweeps" / name, storage)

    @property
    def spend_file(self) -> Path:
        """The spend ledger (``spend.json``)."""
        return self.local_dir / SPEND_FILE

    @property
    def leaderboard_json(self) -> Path:
        """Leaderboard rows, best first, as JSON (what serving reads)."""
        return self.local_dir / LEADERBOARD_JSON

    @property
    def leaderboard_csv(self) -> Path:
        """The same rows with each setting as a column."""
        return self.local_dir / LEADERBOARD_CSV

    @property
    def report(self) -> Path:
        """The offline HTML report, plots included."""
        return self.local_dir / REPORT_FILE

    @property
    def best_adapter(self) -> Path:
        """The winning trial's PEFT adapter."""
        return self.local_dir / BEST_DIR / "adapter"

    @property
    def best_trial(self) -> Path:
        """The winning trial's leaderboard row (JSON), next to its adapter."""
        return self.local_dir / BEST_DIR / "trial.json"

    @property
    def trials(self) -> Storage:
        """Where the trials' training runs live."""
        return self.storage.child(TRIALS_DIR)

    def adapter_dir(self, adapter_path: str | Path) -> Path:
        """A leaderboard row's local ``adapter_path``, relative ones taken from the sweep directory."""
        path = Path(str(adapter_path)).expanduser()
        return path if path.is_absolute() else self.local_dir / path
