"""Driver-side progress: a Ray Train callback that prints step/total, loss, tokens/s and ETA."""

from __future__ import annotations

import time
from typing import Any

from ray.train import UserCallback


def format_duration(seconds: float) -> str:
    """Compact h/m/s rendering, e.g. 1h02m, 3m05s, 42s."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressPrinter(UserCallback):
    """Prints one line per report from rank 0's metrics (runs in the Train controller)."""

    def __init__(self, name: str, every_s: float = 0.0):
        self.name = name
        self.every_s = every_s
        self._last_print = 0.0
        self._started: float | None = None
        self._first_step: int | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        """Print progress for the report rank 0 just made."""
        m = metrics[0] if metrics else {}
        if "step" not in m or "total_steps" not in m or m.get("jit_commit"):
            return  # jit_commit: the repeat that confirms a just-in-time checkpoint was taken in
        now = time.monotonic()
        if self._started is None or m["step"] <= (self._first_step or 0):
            self._started, self._first_step = now, m["step"]
        done = m["step"] - (self._first_step or 0)
        eta = (now - self._started) / done * (m["total_steps"] - m["step"]) if done > 0 else float("nan")
        important = checkpoint is not None or "eval_perplexity" in m or m["step"] == m["total_steps"]
        if not important and now - self._last_print < self.every_s:
            return
        self._last_print = now
        parts = [
            f"[{self.name}] step {m['step']}/{m['total_steps']}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.2e}",
            f"{m['tokens_per_s']:,.0f} tok/s",
            f"ETA {format_duration(eta) if eta == eta else '?'}",
        ]
        if "eval_perplexity" in m:
            parts.append(f"eval loss {m['eval_loss']:.4f} (ppl {m['eval_perplexity']:.2f})")
            if m.get("exact_match") is not None:
                parts.append(f"exact match {m['exact_match']:.2%}")
        if checkpoint is not None:
            parts.append("checkpoint" + (" (just-in-time, preemption notice)" if m.get("jit_checkpoint") else ""))
        print(" | ".join(parts), flush=True)
