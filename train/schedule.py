"""Learning-rate schedule: linear warmup, then cosine or linear decay to zero (or constant)."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """A LambdaLR multiplier for step ``s`` (the scheduler's count of optimizer steps taken)."""

    def multiplier(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in steps for a ratio of the run."""
    return int(math.ceil(total_steps * warmup_ratio))
