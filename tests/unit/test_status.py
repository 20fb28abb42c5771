"""Status transitions: conditions, phase, and the per-round figures."""

from iterdpo.local.report import reward_trend, status_table
from iterdpo.stages import GenerationFigures, ScoringFigures
from iterdpo.status import (
    RunStatus,
    accepted,
    interrupted,
    set_condition,
    stage_failed,
    stage_finished,
    stage_started,
    succeeded,
)


def test_condition_time_moves_only_when_status_flips():
    conditions = set_condition([], "Progressing", "True", "A", "", "t1")
    conditions = set_condition(conditions, "Progressing", "True", "B", "still", "t2")
    assert conditions[0].last_transition_time == "t1" and conditions[0].reason == "B"
    conditions = set_condition(conditions, "Progressing", "False", "C", "", "t3")
    assert conditions[0].last_transition_time == "t3"


def test_a_run_goes_pending_running_failed_running_succeeded():
    status = accepted(RunStatus(), "abc", "t0")
    assert status.phase == "Pending" and status.condition("Valid").status == "True"
    status = stage_started(status, 1, "Generate", "/sft", "t1")
    assert (status.phase, status.current_iteration, status.current_stage) == ("Running", 1, "Generate")
    status = stage_failed(status, 1, "Generate", "StageFailed", "shard 0 exited 1", "t2")
    assert status.phase == "Failed"
    assert status.condition("Failed").message == "round 1: Generate failed: shard 0 exited 1"
    status = stage_started(status, 1, "Generate", "/sft", "t3")
    assert status.phase == "Running" and status.condition("Failed").status == "False"
    status = stage_finished(status, 1, "Generate", GenerationFigures(prompts=4, samples=16, seconds=2), "t4")
    assert status.iteration(1).generation.samples == 16
    status = interrupted(status, "t5")
    assert status.condition("Progressing").reason == "Interrupted"
    status = succeeded(status, "/final", "t6")
    assert status.phase == "Succeeded" and status.final_policy == "/final"
    assert status.condition("Succeeded").status == "True"


def test_status_json_has_the_documented_shape():
    status = stage_started(RunStatus(), 1, "Generate", "/sft", "t1")
    status = stage_finished(status, 1, "Generate", GenerationFigures(prompts=4, samples=16, seconds=2), "t2")
    data = status.to_json()
    assert data["phase"] == "Running" and data["currentIteration"] == 1 and data["currentStage"] == "Generate"
    assert data["iterations"] == [
        {"iteration": 1, "policy": "/sft", "generation": {"prompts": 4, "samples": 16, "promptsLeftOut": 0, "seconds": 2.0}}
    ]
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(data["conditions"][0])
    assert RunStatus.model_validate(data) == status


def _scored(status, iteration, mean):
    status = stage_started(status, iteration, "Score", "/p", "t")
    figures = ScoringFigures(
        mean_reward=mean, min_reward=-1, max_reward=1, pairs=3, ties_dropped=0, prompts_left_out=0, seconds=1
    )
    return stage_finished(status, iteration, "Score", figures, "t")


def test_reward_trend_and_table():
    status = _scored(_scored(RunStatus(), 1, -0.41), 3, 0.87)
    assert reward_trend(status) == "round 1 mean reward -0.410 -> round 3 +0.870"
    table = status_table("demo", status, 3)
    assert table.splitlines()[0] == "run demo: Running (round 3 of 3, Score)"
    assert "mean reward" in table.splitlines()[1]
    assert "-0.410" in table and "+0.870" in table


def test_a_round_with_nothing_scored_shows_dashes_not_a_crash():
    from iterdpo.stages import STAGE_TABLE, ScoreSummary, Stage

    score = STAGE_TABLE[Stage.SCORE]
    summary = ScoreSummary(mean_reward=None, min_reward=None, max_reward=None, pairs=0, ties_dropped=0,
                           prompts_left_out=5, seconds=0.1)  # fmt: skip
    figures = score.figures_of([summary], 2.0, None)
    assert score.line(figures).startswith("mean reward - (min -, max -), 0 pairs")
    status = stage_finished(stage_started(RunStatus(), 1, "Score", "/p", "t"), 1, "Score", figures, "t")
    assert "   -" in status_table("demo", status) and reward_trend(status) is None


def test_status_figures_have_four_decimals_so_kubectl_shows_a_short_reward():
    from iterdpo.stages import STAGE_TABLE, ScoreSummary, Stage

    score = STAGE_TABLE[Stage.SCORE]
    summary = ScoreSummary(mean_reward=0.12345678901234566, min_reward=-1.00000000004, max_reward=2.5, pairs=3,
                           ties_dropped=0, prompts_left_out=0, seconds=0.1)  # fmt: skip
    figures = score.figures_of([summary], 2.0, None)
    assert (figures.mean_reward, figures.min_reward, figures.max_reward) == (0.1235, -1.0, 2.5)


def test_a_malformed_summary_is_a_stage_failure_not_a_crash():
    import pytest

    from iterdpo.stages import STAGE_TABLE, Stage, SummaryError

    train, score = STAGE_TABLE[Stage.TRAIN], STAGE_TABLE[Stage.SCORE]
    with pytest.raises(SummaryError, match=r"pod x left no valid TrainSummary \(rewardAccuracy: Field required"):
        train.summary.parse('{"stage": "train", "loss": 0.5}', source="pod x")
    with pytest.raises(SummaryError, match=r"meanReward: Input should be a valid number"):
        score.summary.parse('{"stage": "score", "meanReward": "high"}', source="f")
    with pytest.raises(SummaryError, match=r"stage: Input should be 'score'"):  # another stage's summary
        score.summary.parse('{"stage": "annotate", "meanReward": 1}', source="f")
    with pytest.raises(SummaryError, match=r"not JSON|Invalid JSON"):
        score.summary.parse("Traceback (most recent call last):", source="f")
    with pytest.raises(SummaryError, match="Train should leave one summary, found 2"):
        train.figures_of([None, None], 1.0, None)
