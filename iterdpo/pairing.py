"""Choose one (chosen, rejected) pair from the K scored responses of a prompt.

Pure: the random strategies take their `random.Random` from the caller, seeded
per prompt, so a pairing is reproducible and independent of processing order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

TIE = "tie: chosen and rejected have the same score"


@dataclass(frozen=True)
class Pair:
    chosen: int  # index into the K responses
    rejected: int
    margin: float  # reward(chosen) - reward(rejected), raw rewards


def choose_pair(
    rewards: Sequence[float],
    lengths: Sequence[int],
    strategy: str,
    *,
    rng: random.Random,
    length_penalty: float = 0.0,
) -> Pair | str:
    """Return the pair, or the reason (a string) that this prompt yields none."""
    k = len(rewards)
    if k != len(lengths):
        raise ValueError(f"{k} rewards but {len(lengths)} lengths")
    if k < 2:
        return f"fewer than 2 responses ({k})"
    # Stable order: on equal scores the earlier response wins, so results are reproducible.
    order = sorted(range(k), key=lambda i: (-rewards[i], i))
    if strategy == "max_min":
        chosen, rejected = order[0], order[-1]
    elif strategy == "max_max":
        chosen, rejected = order[0], order[1]
    elif strategy == "max_random":
        chosen = order[0]
        rejected = rng.choice([i for i in range(k) if i != chosen])
    elif strategy == "random":
        a, b = rng.sample(range(k), 2)
        chosen, rejected = (a, b) if (rewards[a], -a) >= (rewards[b], -b) else (b, a)
    elif strategy == "max_min_length_penalty":
        adjusted = [r - length_penalty * n for r, n in zip(rewards, lengths)]
        by_adjusted = sorted(range(k), key=lambda i: (-adjusted[i], i))
        chosen, rejected = by_adjusted[0], by_adjusted[-1]
        if adjusted[chosen] == adjusted[rejected]:
            return TIE
        return Pair(chosen, rejected, rewards[chosen] - rewards[rejected])
    else:
        raise ValueError(f"unknown pairing strategy {strategy!r}")
    if rewards[chosen] == rewards[rejected]:
        return TIE
    return Pair(chosen, rejected, rewards[chosen] - rewards[rejected])


def prompt_rng(seed: int, iteration: int, prompt_id: str) -> random.Random:
    """A generator private to one prompt of one round."""
    return random.Random(f"{seed}/{iteration}/{prompt_id}")
