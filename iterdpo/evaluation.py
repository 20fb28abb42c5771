"""The Evaluate stage's arithmetic and the loop's gates: pure functions, no I/O.

The evaluator (`iterdpo_evaluator`) computes a round's figures with these; the planner asks
`tripped_gate` whether the run stops and `final_policy` which round's policy it keeps, from
the status alone, so the local runner and the operator stop the same way (level-based: the
same status gives the same answer however often it is asked).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iterdpo.layout import RunLayout, evaluated_policy, policy_for

if TYPE_CHECKING:
    from iterdpo.spec import IterativeDPORun
    from iterdpo.status import RunStatus

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


# -- figures ---------------------------------------------------------------------------------
def prompt_digest(messages: Sequence[dict]) -> str:
    """A prompt's content hash: its messages' roles and contents, whatever row or file holds it."""
    canonical = [{"role": m["role"], "content": m["content"]} for m in messages]
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def outcome(score: float, baseline: float) -> float:
    """A scalar judge's verdict on one response against the baseline's: 1 win, 0.5 tie, 0 loss."""
    return 1.0 if score > baseline else 0.5 if score == baseline else 0.0


def wilson_interval(p: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a share `p` of `n` trials (ties counted as half a win).
    Unlike the normal interval it stays inside [0, 1] and does not collapse at p = 0 or 1."""
    if n <= 0:
        return 0.0, 1.0
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n)))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class WinRate:
    rate: float
    low: float
    high: float
    prompts: int


def win_rate(per_prompt: Sequence[float]) -> WinRate | None:
    """The mean of per-prompt outcomes in [0, 1] (a prompt's samples averaged), with its interval."""
    if not per_prompt:
        return None
    rate = sum(per_prompt) / len(per_prompt)
    low, high = wilson_interval(rate, len(per_prompt))
    return WinRate(rate, low, high, len(per_prompt))


def kl_k1(policy_logps: Sequence[float], reference_logps: Sequence[float]) -> float:
    """Schulman's k1 estimate of KL(policy || reference) per response: the mean sequence
    log-ratio of responses sampled from the policy (each a sum over its tokens)."""
    if len(policy_logps) != len(reference_logps):
        raise ValueError(f"{len(policy_logps)} policy log-probs but {len(reference_logps)} reference ones")
    if not policy_logps:
        return 0.0
    return sum(p - r for p, r in zip(policy_logps, reference_logps)) / len(policy_logps)


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (a value that occurs; p90 of 10 values is the 9th)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


# -- gates and the final policy ----------------------------------------------------------------
@dataclass(frozen=True)
class GateTrip:
    gate: str  # the field of spec.evaluation.gates
    iteration: int
    message: str
    fail: bool  # gates.onTrip is Failed

    @property
    def reason(self) -> str:
        return "GateTripped"


def _evaluations(status: RunStatus) -> list[tuple[int, object]]:
    return sorted((it.iteration, it.evaluation) for it in status.iterations if getattr(it, "evaluation", None))


def tripped_gate(run: IterativeDPORun, status: RunStatus) -> GateTrip | None:
    """The first gate a finished evaluation crossed, in round order; None when none did."""
    spec = run.spec.evaluation
    if spec is None or not spec.gates.any:
        return None
    gates = spec.gates
    judge = {}
    for iteration, f in _evaluations(status):
        judge[iteration] = f.judge_reward
        if iteration == 0:
            continue
        trip = _check(gates, iteration, f, judge)
        if trip is not None:
            gate, message = trip
            return GateTrip(gate, iteration, f"round {iteration}: {message}", gates.on_trip == "Failed")
    return None


def _check(gates, iteration: int, f, judge: dict[int, float | None]) -> tuple[str, str] | None:
    if gates.max_length_ratio is not None and f.length_ratio is not None and f.length_ratio > gates.max_length_ratio:
        return ("maxLengthRatio", f"mean response length {f.length_mean:.1f} tokens is x{f.length_ratio:.2f} round 0's, "
                f"above gates.maxLengthRatio {gates.max_length_ratio:g}")  # fmt: skip
    if gates.min_win_rate is not None and f.win_rate is not None and f.win_rate < gates.min_win_rate:
        return ("minWinRate", f"win rate against round 0 is {f.win_rate:.3f} (95% interval {f.win_rate_low:.3f}-"
                f"{f.win_rate_high:.3f}), below gates.minWinRate {gates.min_win_rate:g}")  # fmt: skip
    if gates.max_kl is not None and f.kl > gates.max_kl:
        return "maxKl", f"estimated KL from the initial policy is {f.kl:.3f} nats, above gates.maxKl {gates.max_kl:g}"
    r = gates.judge_reward_falling_rounds
    if r is not None and iteration >= r:
        seq = [judge.get(k) for k in range(iteration - r, iteration + 1)]
        if None not in seq and all(b < a for a, b in zip(seq, seq[1:])):
            shown = " -> ".join(f"{v:+.3f}" for v in seq)
            return ("judgeRewardFallingRounds", f"the judge's mean reward fell in each of the last {r} rounds "
                    f"({shown}), gates.judgeRewardFallingRounds {r}")  # fmt: skip
    return None


def final_policy(run: IterativeDPORun, status: RunStatus) -> str:
    """status.finalPolicy: without evaluation, the last round's checkpoint; with it,
    evaluation.select's pick among the rounds evaluated that crossed no gate (round 0
    included), the earliest on a tie; without a gate crossed, `last` is the last round's."""
    spec = run.spec.evaluation
    trip = tripped_gate(run, status)
    if spec is None or (spec.select == "last" and trip is None):
        return str(RunLayout.of(run).checkpoint(run.spec.iterations))
    candidates = [(k, f) for k, f in _evaluations(status) if trip is None or k < trip.iteration]
    if not candidates:
        return evaluated_policy(run, 0)
    return evaluated_policy(run, _best(spec.select, candidates))


def _best(select: str, candidates: list[tuple[int, object]]) -> int:
    """The round `select` picks among (round, evaluation figures), the earliest on a tie."""
    if select == "last":
        return candidates[-1][0]

    def key(item) -> float:
        k, f = item
        value = f.judge_reward if select == "judge-reward" else (0.5 if k == 0 else f.win_rate)
        return -math.inf if value is None else value

    return max(candidates, key=key)[0]  # max keeps the first of equals: the earliest round


def start_policy(run: IterativeDPORun, status: RunStatus, iteration: int) -> str:
    """The policy round `iteration` starts from: the previous round's checkpoint (policy_for),
    or with evaluation.rollback the best round so far by evaluation.select among the rounds
    evaluated before it (round 0: the initial policy)."""
    spec = run.spec.evaluation
    if spec is None or not spec.rollback or iteration < 2:
        return policy_for(run, iteration)
    candidates = [(k, f) for k, f in _evaluations(status) if k < iteration]
    return evaluated_policy(run, _best(spec.select, candidates)) if candidates else policy_for(run, iteration)
