"""Every pairing strategy, ties included."""

import random

import pytest

from iterdpo.pairing import TIE, Pair, choose_pair, prompt_rng


def pair(rewards, strategy, lengths=None, seed=0, penalty=0.0):
    return choose_pair(
        rewards, lengths or [10] * len(rewards), strategy, rng=random.Random(seed), length_penalty=penalty
    )


def test_max_min_is_best_vs_worst():
    assert pair([0.1, 0.9, -0.5, 0.3], "max_min") == Pair(chosen=1, rejected=2, margin=pytest.approx(1.4))


def test_max_max_is_best_vs_second_best():
    assert pair([0.1, 0.9, -0.5, 0.3], "max_max") == Pair(chosen=1, rejected=3, margin=pytest.approx(0.6))


def test_max_random_takes_the_best_and_another():
    for seed in range(20):
        result = pair([0.1, 0.9, -0.5, 0.3], "max_random", seed=seed)
        assert result.chosen == 1 and result.rejected in (0, 2, 3)


def test_random_orders_the_two_by_reward():
    for seed in range(20):
        result = pair([0.1, 0.9, -0.5, 0.3], "random", seed=seed)
        rewards = [0.1, 0.9, -0.5, 0.3]
        assert rewards[result.chosen] > rewards[result.rejected]


def test_length_penalty_changes_the_choice():
    rewards, lengths = [1.0, 0.9, 0.0], [1000, 10, 10]
    assert pair(rewards, "max_min_length_penalty", lengths, penalty=0.0) == Pair(0, 2, pytest.approx(1.0))
    # Adjusted: 1.0 - 0.002 * 1000 = -1.0 (worst), 0.9 - 0.02 = 0.88 (best), 0.0 - 0.02 = -0.02.
    result = pair(rewards, "max_min_length_penalty", lengths, penalty=0.002)
    assert (result.chosen, result.rejected) == (1, 0)
    assert result.margin == pytest.approx(-0.1)  # margins stay in raw reward units


@pytest.mark.parametrize("strategy", ["max_min", "max_max", "max_random", "random", "max_min_length_penalty"])
def test_all_equal_rewards_are_a_tie(strategy):
    assert pair([0.5, 0.5, 0.5], strategy) == TIE


def test_max_max_tie_at_the_top_only():
    assert pair([0.9, 0.9, 0.1], "max_max") == TIE
    assert pair([0.9, 0.9, 0.1], "max_min") == Pair(0, 2, pytest.approx(0.8))


def test_fewer_than_two_responses_is_a_reason():
    assert pair([0.3], "max_min") == "fewer than 2 responses (1)"


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="unknown pairing strategy"):
        pair([0.1, 0.2], "best")


def test_prompt_rng_is_reproducible_and_distinct():
    assert prompt_rng(42, 1, "7").random() == prompt_rng(42, 1, "7").random()
    assert prompt_rng(42, 1, "7").random() != prompt_rng(42, 2, "7").random()
