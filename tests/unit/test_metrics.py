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
