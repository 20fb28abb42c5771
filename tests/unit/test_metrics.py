"""The operator's metrics follow what a reconcile wrote: one phase series per run."""

from prometheus_client import generate_latest

from iterdpo.stages import ScoringFigures
from iterdpo.status import IterationStatus, RunStatus
from iterdpo_operator import metrics


def scraped() -> str:
    return generate_latest().decode()


def test_phase_moves_reward_is_recorded_and_a_deleted_run_leaves_nothing():
    running = RunStatus(phase="Running")
    metrics.record("ml", "m1", RunStatus(), running, ["StageStarted"])
    assert 'iterdpo_run_phase{namespace="ml",phase="Running",run="m1"} 1.0' in scraped()
    scoring = ScoringFigures(mean_reward=0.25, min_reward=0, max_reward=1, pairs=3, ties_dropped=0, prompts_left_out=0, seconds=42)
    done = RunStatus(phase="Succeeded", iterations=[IterationStatus(iteration=1, policy="p", scoring=scoring)])
    metrics.record("ml", "m1", running, done, ["StageSucceeded", "Succeeded"])
    text = scraped()
    assert 'phase="Running",run="m1"' not in text and 'iterdpo_run_phase{namespace="ml",phase="Succeeded",run="m1"} 1.0' in text
    assert 'iterdpo_run_mean_reward{namespace="ml",round="1",run="m1"} 0.25' in text
    assert 'iterdpo_stage_seconds_count{stage="Score"}' in text
    metrics.forget("ml", "m1")
    assert 'run="m1"' not in scraped()


def test_each_evaluation_figure_is_a_gauge_per_round_and_an_unset_one_is_not_exported():
    from iterdpo.stages import EvaluationFigures

    def evaluation(it: int, win):
        return EvaluationFigures(policy="p", prompts=8, prompts_left_out=0, samples=8, mean_reward=0.5, judge_reward=None,
                                 win_rate=win, win_rate_low=win and 0.25, win_rate_high=win and 0.875, judged_by="reward",
                                 length_mean=12.0 + it, length_p90=15.0, length_ratio=None if it == 0 else 13 / 12,
                                 truncated_share=0.125, kl=0.5 * it, seconds=3.0)  # fmt: skip

    rounds = [IterationStatus(iteration=i, policy="p", evaluation=evaluation(i, None if i == 0 else 0.625)) for i in (0, 1)]
    metrics.record("ml", "ev", RunStatus(), RunStatus(phase="Running", iterations=rounds), [])
    text = scraped()
    assert 'iterdpo_evaluation_win_rate{namespace="ml",round="1",run="ev"} 0.625' in text
    assert 'iterdpo_evaluation_win_rate{namespace="ml",round="0",run="ev"}' not in text  # round 0 has no win rate
    assert 'iterdpo_evaluation_kl{namespace="ml",round="1",run="ev"} 0.5' in text
    assert 'iterdpo_evaluation_length_mean{namespace="ml",round="0",run="ev"} 12.0' in text
    assert "iterdpo_evaluation_judge_reward{" not in text  # no judge
    assert 'iterdpo_stage_seconds_count{stage="Evaluate"} 2.0' in text
    metrics.forget("ml", "ev")
    assert 'run="ev"' not in scraped()
