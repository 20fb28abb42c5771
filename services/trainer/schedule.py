"""What is trained when: the learning-rate curve and the order of pairs, as pure functions.

Every rank computes the same plan from the same seed, so no rank needs to be told
which pairs the others take.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import cycle, islice


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """ceil(warmup_ratio x total_steps); rounded first so 0.07 x 100 is 7, not 8."""
    return math.ceil(round(warmup_ratio * total_steps, 9))


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warmup rises linearly as (step + 1) / (warmup + 1): never 0, so a round with
    only a few steps still learns on its first one (Hugging Face's ramp starts at 0).
    Then cosine falls to 0 at step == total_steps, linear likewise, constant stays 1.
    """
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown scheduler {kind!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


@dataclass(frozen=True)
class StepPlan:
    """How n pairs make optimizer steps of global_batch pairs each."""

    pairs: int
    global_batch: int
    epochs: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.pairs / self.global_batch)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def repeated_per_epoch(self) -> int:
        """Pairs trained twice in an epoch to fill its last step (wrapping around the order)."""
        return self.steps_per_epoch * self.global_batch - self.pairs

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        """Pair indices of one epoch, shuffled by (seed, epoch), padded by wrapping to whole steps."""
        order = list(range(self.pairs))
        random.Random(f"{seed}/{epoch}").shuffle(order)  # str seeds hash the same in every process
        return list(islice(cycle(order), self.steps_per_epoch * self.global_batch))

    def step_indices(self, order: list[int], step_in_epoch: int) -> list[int]:
        start = step_in_epoch * self.global_batch
        return order[start : start + self.global_batch]


def rank_micro_batches(step_indices: list[int], *, rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: a contiguous 1/world slice, split by micro_batch."""
    per_rank = len(step_indices) // world_size
    mine = step_indices[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
