"""Best and worst of K responses from pairwise comparisons: the selections a pairwise
preference model pairs with (reward kind pairwise).

A pairwise model says how likely response a beats response b; it gives no score to sort by,
so each prompt's pair comes from a tournament. Each selection is a generator that yields a
batch of comparisons (index pairs) and is sent back each one's probability that the first
wins: the annotator runs every prompt's tournament in lockstep and sends one round of all of
them to the server at once. Pure; the random parts draw from the caller's `random.Random`.

Comparisons for K responses (the report's code recommends a tournament; its question of how
many comparisons K candidates need has been open since 2024):

| selection         | comparisons   | K=8 |
| ---               | ---           | --- |
| bracket           | ceil(3K/2)-2  | 10  | pair off, then the winners' bracket for the best and the losers' for the worst
| knockout-random   | K-1           | 7   | a knockout for the best, a random other response as the worst
| knockout-knockout | 2K-3          | 13  | a knockout for the best, a reversed knockout of the rest for the worst
| all-pairs         | K(K-1)/2      | 28  | every pair once; most and fewest wins

A comparison at exactly 0.5 is a tie: counted, and settled by the caller's random draw; a
prompt whose every comparison tied has no pair (TIE).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

from iterdpo.pairing import TIE

Match = tuple[int, int]
Selection = Generator[list[Match], list[float], tuple[int, int] | None]  # None: no preference

SELECTIONS = {
    "bracket": "pair the K off, then a winners' bracket for the best and a losers' bracket for the worst: "
               "ceil(3K/2) - 2 comparisons (10 for K=8; an odd one out plays in both brackets)",
    "knockout-random": "a knockout for the best, and a random other response as the worst: K - 1 comparisons",
    "knockout-knockout": "a knockout for the best and a reversed knockout of the rest for the worst: 2K - 3 "
                         "comparisons",
    "all-pairs": "every pair once, chosen by most wins and rejected by fewest: K(K-1)/2 comparisons",
}  # fmt: skip


def expected_comparisons(selection: str, k: int) -> int:
    """How many comparisons a selection makes for K responses (K >= 2)."""
    return {
        "bracket": (3 * k + 1) // 2 - 2 if k > 2 else 1,
        "knockout-random": k - 1,
        "knockout-knockout": 2 * k - 3,
        "all-pairs": k * (k - 1) // 2,
    }[selection]


@dataclass
class Outcome:
    """A finished tournament: the pair (or TIE), and what it cost."""

    chosen: int | None
    rejected: int | None
    comparisons: int
    ties: int
    wins: dict[int, float] = field(default_factory=dict)  # wins per response, among the comparisons it played


class Referee:
    """Settles comparisons: a > 0.5 win, a < 0.5 loss, 0.5 a tie (counted, then drawn at random)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.comparisons = 0
        self.ties = 0
        self.wins: dict[int, float] = {}
        self.games: dict[int, int] = {}  # comparisons each response played

    def settle(self, matches: Sequence[Match], probabilities: Sequence[float]) -> list[tuple[int, int]]:
        """(winner, loser) of each match."""
        if len(matches) != len(probabilities):
            raise ValueError(f"{len(probabilities)} results for {len(matches)} comparisons")
        out = []
        for (a, b), p in zip(matches, probabilities):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"a comparison's probability must be in [0, 1] (got {p})")
            self.comparisons += 1
            self.wins.setdefault(a, 0.0)
            self.wins.setdefault(b, 0.0)
            self.games[a] = self.games.get(a, 0) + 1
            self.games[b] = self.games.get(b, 0) + 1
            if p == 0.5:
                self.ties += 1
                self.wins[a] += 0.5
                self.wins[b] += 0.5
                out.append((a, b) if self.rng.random() < 0.5 else (b, a))
            else:
                winner, loser = (a, b) if p > 0.5 else (b, a)
                self.wins[winner] += 1.0
                out.append((winner, loser))
        return out


def _knockout(players: list[int], referee: Referee, *, best: bool) -> Generator[list[Match], list[float], int]:
    """The last one standing: winners advance (best) or losers do (worst); an odd one out waits a round."""
    while len(players) > 1:
        matches = [(players[i], players[i + 1]) for i in range(0, len(players) - 1, 2)]
        settled = referee.settle(matches, (yield matches))
        players = [w if best else l for w, l in settled] + players[len(matches) * 2 :]
    return players[0]


def bracket(k: int, referee: Referee) -> Selection:
    if k == 2:
        ((w, l),) = referee.settle([(0, 1)], (yield [(0, 1)]))
        return w, l
    matches = [(i, i + 1) for i in range(0, k - 1, 2)]
    settled = referee.settle(matches, (yield matches))
    odd = [k - 1] if k % 2 else []  # an odd one out plays in both brackets: it may be either end
    winners = [w for w, _ in settled] + odd
    losers = [l for _, l in settled] + odd
    best_run = _knockout(winners, referee, best=True)
    worst_run = _knockout(losers, referee, best=False)
    best = worst = None
    pending_best, pending_worst = next(best_run, None), next(worst_run, None)
    while True:  # both brackets advance together: one batch per round
        batch = (pending_best or []) + (pending_worst or [])
        if not batch:
            break
        results = yield batch
        nb = len(pending_best or [])
        pending_best, best = _advance(best_run, pending_best, results[:nb], best)
        pending_worst, worst = _advance(worst_run, pending_worst, results[nb:], worst)
    best = winners[0] if best is None else best
    worst = losers[0] if worst is None else worst
    if best == worst:  # the odd one out won one bracket and lost the other (an intransitive judge)
        wins = referee.wins
        worst = min((i for i in range(k) if i != best), key=lambda i: (wins[i], i))
    return best, worst


def _advance(run, pending, results, final):
    """Send a sub-tournament its results; (its next batch or None, its winner once it has one)."""
    if pending is None:
        return None, final
    try:
        return run.send(results), final
    except StopIteration as stop:
        return None, stop.value


def knockout_random(k: int, referee: Referee) -> Selection:
    best = yield from _knockout(list(range(k)), referee, best=True)
    return best, referee.rng.choice([i for i in range(k) if i != best])


def knockout_knockout(k: int, referee: Referee) -> Selection:
    best = yield from _knockout(list(range(k)), referee, best=True)
    worst = yield from _knockout([i for i in range(k) if i != best], referee, best=False)
    return best, worst


def all_pairs(k: int, referee: Referee) -> Selection:
    matches = [(a, b) for a in range(k) for b in range(a + 1, k)]
    referee.settle(matches, (yield matches))
    wins = referee.wins
    best = max(range(k), key=lambda i: (wins[i], -i))
    worst = min((i for i in range(k) if i != best), key=lambda i: (wins[i], i))
    return None if wins[best] == wins[worst] else (best, worst)  # equal wins (a cycle): no preference


_RUNS: dict[str, Callable[[int, Referee], Selection]] = {
    "bracket": bracket,
    "knockout-random": knockout_random,
    "knockout-knockout": knockout_knockout,
    "all-pairs": all_pairs,
}


class Tournament:
    """One prompt's selection, driven batch by batch: `pending` comparisons, then `record`."""

    def __init__(self, k: int, selection: str, rng: random.Random):
        if selection not in _RUNS:
            raise ValueError(f"unknown selection {selection!r}; known: {', '.join(_RUNS)}")
        self.k = k
        self.referee = Referee(rng)
        self.outcome: Outcome | str | None = None
        self.pending: list[Match] = []
        if k < 2:
            self.outcome = f"fewer than 2 responses ({k})"
            return
        self._run = _RUNS[selection](k, self.referee)
        self.pending = next(self._run)

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def record(self, probabilities: Sequence[float]) -> None:
        """Each pending comparison's probability that its first response wins."""
        try:
            self.pending = self._run.send(list(probabilities))
        except StopIteration as stop:
            r = self.referee
            self.pending = []
            if stop.value is None or r.ties == r.comparisons:  # nothing told the responses apart
                self.outcome = TIE
            else:
                best, worst = stop.value
                self.outcome = Outcome(best, worst, r.comparisons, r.ties, dict(r.wins))


def run_all(tournaments: Sequence[Tournament], compare: Callable[[list[Match | tuple]], list[float]]) -> int:
    """Drive every tournament to its end, one batch of all their pending comparisons at a time
    (`compare` gets (tournament index, a, b) triples); returns the number of batches."""
    batches = 0
    while True:
        asked = [(t, a, b) for t, tour in enumerate(tournaments) if not tour.done for a, b in tour.pending]
        if not asked:
            return batches
        results = compare(asked)
        batches += 1
        start = 0
        for t, tour in enumerate(tournaments):
            if tour.done:
                continue
            n = len(tour.pending)
            tour.record(results[start : start + n])
            start += n
