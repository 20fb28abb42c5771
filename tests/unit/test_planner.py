"""The planner's decision for every status a run can be in."""

import pytest

from iterdpo.planner import Finished, next_step
from iterdpo.runfile import parse_run
from iterdpo.stages import GenerationFigures, ScoringFigures, TrainingFigures
from iterdpo.status import (
    RunStatus,
    stage_failed,
    stage_finished,
    stage_started,
)

NOW = "2026-11-27T00:00:00Z"
RUN = parse_run(
    {
        "apiVersion": "iterdpo.io/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": "demo"},
        "spec": {
            "iterations": 2,
            "policy": {"model": "/models/sft"},
            "prompts": {"dataset": "/data/prompts.jsonl"},
            "generation": {"shards": 3, "samplesPerPrompt": 4},
            "reward": {"model": "/models/rm", "maxLength": 512, "batchTokens": 4096},
            "training": {"nprocPerNode": 8, "globalBatchSize": 128, "microBatchSize": 1},
            "storage": {"root": "/runs"},
        },
    }
)
GEN = GenerationFigures(prompts=10, samples=40, seconds=1.0)
SCORE = ScoringFigures(
    mean_reward=0.1, min_reward=-1, max_reward=1, pairs=9, ties_dropped=1, prompts_left_out=0, seconds=1.0
)
TRAIN = TrainingFigures(loss=0.6, reward_accuracy=0.7, reward_margin=0.2, checkpoint="/x", seconds=1.0)
FIGURES = {"Generate": GEN, "Score": SCORE, "Train": TRAIN}


def status_after(*done: tuple[int, str]) -> RunStatus:
    status = RunStatus()
    for iteration, stage in done:
        status = stage_started(status, iteration, stage, "/p", NOW)
        status = stage_finished(status, iteration, stage, FIGURES[stage], NOW)
    return status


def plan(status):
    return next_step(RUN, status, spec_file="/etc/run.json", urls={"reward": "http://rm:8000"})


ORDER = [(1, "Generate"), (1, "Score"), (1, "Train"), (2, "Generate"), (2, "Score"), (2, "Train")]


@pytest.mark.parametrize("done", range(len(ORDER)))
def test_next_stage_follows_round_order(done):
    step = plan(status_after(*ORDER[:done]))
    assert (step.iteration, step.stage) == ORDER[done]


def test_all_done_is_finished_with_the_last_checkpoint():
    assert plan(status_after(*ORDER)) == Finished(final_policy="/runs/demo/iter-02/train/policy")


def test_generate_has_one_command_per_shard():
    step = plan(RunStatus())
    assert step.policy == "/models/sft"
    assert [job.argv for job in step.jobs] == [
        ("iterdpo", "generate", "--spec", "/etc/run.json", "--iteration", "1", "--shard", str(i)) for i in range(3)
    ]
    assert step.services == ()


def test_score_runs_the_reward_server_as_a_service():
    step = plan(status_after(*ORDER[:1]))
    [service] = step.services
    assert service.command.argv == (  # the server reads spec.reward from the run file: one declaration
        "iterdpo", "serve-reward", "--spec", "/etc/run.json", "--host", "0.0.0.0", "--port", "8000",
    )
    assert service.url == "http://rm:8000"
    [job] = step.jobs
    assert job.argv == (
        "iterdpo", "annotate", "--spec", "/etc/run.json", "--iteration", "1", "--reward-url", "http://rm:8000"
    )


def test_train_is_torchrun_of_the_trainer():
    [job] = plan(status_after(*ORDER[:2])).jobs
    assert job.argv == (
        "torchrun", "--nnodes=1", "--nproc-per-node=8", "-m", "iterdpo_trainer",
        "--spec", "/etc/run.json", "--iteration", "1",
    )


def test_round_two_generates_with_round_one_checkpoint():
    step = plan(status_after(*ORDER[:3]))
    assert step.policy == "/runs/demo/iter-01/train/policy"


def test_a_started_but_unfinished_stage_is_planned_again():
    status = stage_started(status_after(*ORDER[:1]), 1, "Score", "/p", NOW)
    assert (plan(status).iteration, plan(status).stage) == (1, "Score")


def test_a_failed_stage_is_planned_again():
    status = stage_failed(stage_started(RunStatus(), 1, "Generate", "/p", NOW), 1, "Generate", "StageFailed", "x", NOW)
    assert status.phase == "Failed"
    assert (plan(status).iteration, plan(status).stage) == (1, "Generate")


def test_reference_previous_uses_the_generating_policy():
    from iterdpo.layout import reference_for

    previous = RUN.model_copy(update={"spec": RUN.spec.model_copy(update={"reference": "previous"})})
    assert reference_for(RUN, 2) == "/models/sft"
    assert reference_for(previous, 2) == "/runs/demo/iter-01/train/policy"
    assert reference_for(previous, 1) == "/models/sft"


def test_an_unknown_stage_is_an_error_naming_it_not_a_fall_through():
    from iterdpo.planner import stage_step

    with pytest.raises(ValueError, match=r"unknown stage 'Judge'; known: SFT, RewardModel, Generate, Score, Train, Evaluate"):
        stage_step(RUN, 1, "Judge", spec_file="/f", host="h")


def test_every_table_has_an_entry_for_every_stage():
    from iterdpo.stages import Stage, table_of

    with pytest.raises(TypeError, match=r"my table has no entry for stage\(s\) \['SFT', 'RewardModel', 'Score', 'Train', 'Evaluate'\]"):
        table_of({Stage.GENERATE: 1}, "my table")


def _stage(name, when, **kw):
    """A stage of a made-up table (the real table's entries with another name and cadence)."""
    import dataclasses

    from iterdpo.stages import GENERATE

    return dataclasses.replace(GENERATE, stage=name, when=when, **kw)


def test_a_stage_before_round_one_runs_as_round_zero_with_the_initial_policy():
    """When.BEFORE_ROUNDS (a reward model to train, a baseline to measure) is planned as round 0."""
    from iterdpo.stages import STAGES, When

    first = _stage("Generate", When.BEFORE_ROUNDS | When.EVERY_ROUND)
    table = (first, *STAGES[1:])
    step = next_step(RUN, RunStatus(), spec_file="/f", table=table)
    assert (step.iteration, step.stage, step.policy) == (0, "Generate", "/models/sft")
    done = stage_finished(stage_started(RunStatus(), 0, "Generate", "/p", NOW), 0, "Generate", GEN, NOW)
    assert (next_step(RUN, done, spec_file="/f", table=table).iteration, next_step(RUN, done, spec_file="/f",
            table=table).stage) == (1, "Generate")  # fmt: skip


def test_a_stage_that_is_not_enabled_is_skipped():
    from iterdpo.stages import STAGES

    table = (*STAGES, _stage("Generate", STAGES[0].when, enabled=lambda run: False))
    assert plan(status_after(*ORDER)) == next_step(RUN, status_after(*ORDER), spec_file="/etc/run.json",
                                                   urls={"reward": "http://rm:8000"}, table=table)  # fmt: skip
