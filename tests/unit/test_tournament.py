"""Pairwise selection: comparison counts, the best and worst found, ties, lockstep batches."""

from __future__ import annotations

import random

import pytest

from iterdpo.pairing import TIE
from iterdpo.tournament import SELECTIONS, Outcome, Tournament, expected_comparisons, run_all


def _oracle(quality):
    """A perfect, transitive judge: p(a beats b) is 1 or 0 (0.5 on equal quality)."""

    def compare(asked):
        return [1.0 if quality[t][a] > quality[t][b] else 0.0 if quality[t][a] < quality[t][b] else 0.5 for t, a, b in asked]

    return compare


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 8, 9, 16])
def test_each_selection_makes_its_stated_number_of_comparisons_and_finds_the_best(selection, k):
    rng = random.Random(k)
    quality = [rng.sample(range(100), k) for _ in range(5)]
    tours = [Tournament(k, selection, random.Random(i)) for i in range(5)]
    run_all(tours, _oracle(quality))
    for q, tour in zip(quality, tours):
        out = tour.outcome
        assert isinstance(out, Outcome) and out.ties == 0
        assert out.comparisons == expected_comparisons(selection, k)
        assert out.chosen == q.index(max(q)) and out.chosen != out.rejected
        if selection != "knockout-random":  # the others find the true worst with a transitive judge
            assert out.rejected == q.index(min(q))


def test_k8_costs_match_the_recipe_notes():
    assert {s: expected_comparisons(s, 8) for s in SELECTIONS} == {
        "bracket": 10, "knockout-random": 7, "knockout-knockout": 13, "all-pairs": 28}  # fmt: skip


def test_lockstep_batches_are_the_tournaments_rounds():
    quality = [list(range(8)) for _ in range(3)]
    for selection, rounds in {"bracket": 3, "knockout-random": 3, "knockout-knockout": 6, "all-pairs": 1}.items():
        tours = [Tournament(8, selection, random.Random(0)) for _ in range(3)]
        assert run_all(tours, _oracle(quality)) == rounds, selection


def test_a_tournament_of_ties_has_no_pair_and_counts_them():
    tour = Tournament(6, "bracket", random.Random(1))
    run_all([tour], lambda asked: [0.5] * len(asked))
    assert tour.outcome == TIE and tour.referee.ties == tour.referee.comparisons == expected_comparisons("bracket", 6)


def test_some_ties_are_settled_by_the_draw_and_counted():
    quality = [[3, 3, 1, 0]]
    tour = Tournament(4, "all-pairs", random.Random(2))
    run_all([tour], _oracle(quality))
    out = tour.outcome
    assert out.ties == 1 and out.chosen == 0 and out.rejected == 3
    assert out.wins == {0: 2.5, 1: 2.5, 2: 1.0, 3: 0.0}


def test_a_cycle_is_a_tie_for_all_pairs():
    # 0 beats 1, 1 beats 2, 2 beats 0: every response wins once
    beats = {(0, 1): 1.0, (1, 2): 1.0, (0, 2): 0.0}
    tour = Tournament(3, "all-pairs", random.Random(0))
    run_all([tour], lambda asked: [beats[(a, b)] for _, a, b in asked])
    assert tour.outcome == TIE


def test_fewer_than_two_responses_and_bad_input():
    assert Tournament(1, "bracket", random.Random(0)).outcome == "fewer than 2 responses (1)"
    with pytest.raises(ValueError, match="unknown selection 'swiss'"):
        Tournament(4, "swiss", random.Random(0))
    tour = Tournament(4, "bracket", random.Random(0))
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        tour.record([1.5, 0.0])
    with pytest.raises(ValueError, match="1 results for 2 comparisons"):
        Tournament(4, "bracket", random.Random(0)).record([1.0])


def test_the_random_worst_is_reproducible_per_seed():
    picks = set()
    for seed in range(20):
        tours = [Tournament(8, "knockout-random", random.Random(seed)) for _ in range(2)]
        run_all(tours, _oracle([list(range(8))] * 2))
        assert tours[0].outcome.rejected == tours[1].outcome.rejected  # same seed, same draw
        picks.add(tours[0].outcome.rejected)
    assert len(picks) > 1 and 7 not in picks  # random among the others, never the best
