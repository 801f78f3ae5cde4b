"""Rank-0 run records: metrics.jsonl, summary.json and the wandb run (offline without an API key)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ftune.config import TrackingConfig
from ftune.storage import Storage

log = logging.getLogger(__name__)


def wandb_mode(cfg: TrackingConfig) -> str:
    """Resolve ``auto``: online with an API key, offline files otherwise."""
    if cfg.wandb != "auto":
        return cfg.wandb
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunRecorder:
    """Appends step metrics to metrics.jsonl and mirrors them to wandb. Rank 0 only.

    With object storage (``storage`` remote) ``run_dir`` is a local staging copy: the history is
    taken from storage when training (re)starts, on whichever node rank 0 now runs, and ``sync``
    puts it back, so deleting the staging directory or losing rank 0's node loses no rows that a
    checkpoint covers.
    """

    def __init__(
        self,
        run_dir: Path,
        tracking: TrackingConfig,
        *,
        name: str,
        config: dict[str, Any],
        storage: Storage | None = None,
    ):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self._name = name
        self._storage = storage if storage is not None and storage.is_remote else None
        if self._storage is not None:
            self._storage.download_file(self.metrics_path, name, "metrics.jsonl")
        self._wandb = None
        mode = wandb_mode(tracking)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=tracking.project,
                entity=tracking.entity,
                group=tracking.group,
                tags=tracking.tags,
                name=name,
                id=name,
                resume="allow",
                mode=mode,
                dir=str(run_dir),
                config=config,
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, metrics: dict[str, Any]) -> None:
        """Record one row of metrics (must contain ``step``)."""
        row = {"time": time.time(), **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=int(metrics["step"]))

    def sync(self) -> None:
        """Upload metrics.jsonl to object storage (nothing to do for a local run directory)."""
        if self._storage is not None and self.metrics_path.exists():
            self._storage.upload_file(self.metrics_path, self._name, "metrics.jsonl")

    def finish(self, summary: dict[str, Any]) -> Path:
        """Write summary.json and close the wandb run."""
        path = self.run_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2, sort_keys=True))
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self._wandb.finish()
        return path
