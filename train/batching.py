"""Which examples each worker sees at each step: a function of (seed, step) alone.

Every optimizer step consumes one global batch from a seeded per-epoch permutation. The global batch
is cut into micro-batches in a fixed order and rank r takes a contiguous run of them, so the set of
micro-batches (and therefore the gradient) does not depend on the number of workers. This is what
makes 1-worker and 2-worker runs comparable, resumption exact and elastic resizing safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class BatchPlan:
    """Deterministic schedule of example indices per (step, rank)."""

    num_examples: int
    global_batch_size: int
    micro_batch_size: int
    seed: int
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError("global_batch_size must be a multiple of micro_batch_size")

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per pass over the data (the last partial batch is dropped)."""
        return self.num_examples // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of example indices for one epoch."""
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, epoch])
            self._orders = {epoch: rng.permutation(self.num_examples)}
        return self._orders[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        """Example indices of optimizer step ``step`` (0-based, counted over all epochs)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        start = offset * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def micro_batches(self, step: int, rank: int, world_size: int) -> list[np.ndarray]:
        """The micro-batches rank ``rank`` runs at ``step`` (gradient-accumulation order)."""
        batch = self.global_batch(step)
        chunks = np.split(batch, self.global_batch_size // self.micro_batch_size)
        if len(chunks) % world_size:
            raise ValueError(f"{len(chunks)} micro-batches cannot be split over {world_size} workers")
        per_rank = len(chunks) // world_size
        return chunks[rank * per_rank : (rank + 1) * per_rank]

    def epoch_of(self, step: int) -> int:
        """The epoch that step ``step`` belongs to."""
        return step // self.steps_per_epoch
