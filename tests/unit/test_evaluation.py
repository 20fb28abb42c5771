"""The Evaluate stage's arithmetic, its gates and the final-policy choice (iterdpo/evaluation.py),
and how the planner and the status end a run a gate stopped."""

import pytest

from iterdpo.evaluation import (
    final_policy,
    kl_k1,
    nearest_rank,
    outcome,
    prompt_digest,
    tripped_gate,
    wilson_interval,
    win_rate,
)
from iterdpo.planner import Finished, next_step
from iterdpo.runfile import parse_run
from iterdpo.stages import EvaluationFigures, Stage
from iterdpo.status import RunStatus, finished, stage_finished, stage_started

NOW = "2026-12-03T00:00:00Z"


def run_with(evaluation: dict | None, iterations: int = 3):
    spec = {
        "iterations": iterations,
        "policy": {"model": "/models/sft"},
        "prompts": {"dataset": "/data/prompts.jsonl"},
        "reward": {"model": "/models/rm", "maxLength": 512, "batchTokens": 4096},
        "storage": {"root": "/runs"},
    }
    if evaluation is not None:
        spec["evaluation"] = {"prompts": {"dataset": "/data/held-out.jsonl"}, **evaluation}
    return parse_run({"apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun",
                      "metadata": {"name": "ev"}, "spec": spec})  # fmt: skip


def figures(iteration: int, *, judge=0.0, win=None, length=20.0, ratio=None, kl=0.0) -> EvaluationFigures:
    return EvaluationFigures(
        policy=f"/p{iteration}", prompts=10, prompts_left_out=0, samples=10, mean_reward=judge, judge_reward=judge,
        win_rate=win, win_rate_low=None if win is None else max(0.0, win - 0.1),
        win_rate_high=None if win is None else min(1.0, win + 0.1), judged_by="judge", length_mean=length,
        length_p90=length, length_ratio=ratio, truncated_share=0.0, kl=kl, seconds=1.0,
    )  # fmt: skip


def evaluated(*rounds: EvaluationFigures) -> RunStatus:
    status = RunStatus()
    for i, f in enumerate(rounds):
        status = stage_started(status, i, Stage.EVALUATE, f.policy, NOW)
        status = stage_finished(status, i, Stage.EVALUATE, f, NOW)
    return status


# -- figures ---------------------------------------------------------------------------------
def test_the_prompt_digest_is_the_content_not_the_row_or_extra_keys():
    a = [{"role": "user", "content": "hi"}]
    assert prompt_digest(a) == prompt_digest([{"role": "user", "content": "hi", "name": "x"}])
    assert prompt_digest(a) != prompt_digest([{"role": "user", "content": "hi "}])
    assert prompt_digest(a) != prompt_digest([{"role": "system", "content": "hi"}])


def test_a_tie_counts_half_a_win():
    assert [outcome(2, 1), outcome(1, 1), outcome(0, 1)] == [1.0, 0.5, 0.0]
    rate = win_rate([1.0, 0.5, 0.0, 0.5])
    assert rate.rate == 0.5 and rate.prompts == 4 and rate.low < 0.5 < rate.high
    assert win_rate([]) is None


def test_the_wilson_interval_stays_inside_0_1_and_narrows_with_more_prompts():
    low, high = wilson_interval(1.0, 32)
    assert high == 1.0 and 0.89 < low < 0.90  # 32 wins of 32: not [1, 1]
    assert wilson_interval(0.0, 5)[0] == 0.0
    wide, narrow = wilson_interval(0.5, 10), wilson_interval(0.5, 1000)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    assert narrow == pytest.approx((0.469, 0.531), abs=1e-3)
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def test_k1_is_the_mean_log_ratio_and_refuses_unequal_lengths():
    assert kl_k1([-1.0, -2.0], [-3.0, -2.0]) == 1.0
    assert kl_k1([], []) == 0.0
    with pytest.raises(ValueError, match="2 policy log-probs but 1 reference"):
        kl_k1([-1.0, -2.0], [-1.0])


def test_p90_by_nearest_rank_is_a_value_that_occurs():
    assert nearest_rank(list(range(1, 11)), 0.9) == 9
    assert nearest_rank([5.0], 0.9) == 5.0 and nearest_rank([], 0.9) == 0.0
    assert nearest_rank([3, 1, 2], 1.0) == 3


# -- gates -----------------------------------------------------------------------------------
def test_no_gates_never_trip_and_round_0_is_never_gated():
    assert tripped_gate(run_with(None), evaluated(figures(0))) is None
    assert tripped_gate(run_with({}), evaluated(figures(0), figures(1, kl=1e6))) is None
    gated = run_with({"gates": {"maxKl": 1.0}})
    assert tripped_gate(gated, evaluated(figures(0, kl=50.0))) is None


@pytest.mark.parametrize(
    ("gates", "round_1", "gate", "words"),
    [
        ({"maxLengthRatio": 1.5}, {"length": 40.0, "ratio": 2.0}, "maxLengthRatio", "x2.00 round 0's"),
        ({"minWinRate": 0.5}, {"win": 0.3}, "minWinRate", "win rate against round 0 is 0.300"),
        ({"maxKl": 10.0}, {"kl": 12.5}, "maxKl", "KL from the initial policy is 12.500 nats"),
    ],
)
def test_each_threshold_gate_trips_on_the_round_that_crosses_it(gates, round_1, gate, words):
    run = run_with({"gates": gates})
    trip = tripped_gate(run, evaluated(figures(0), figures(1, **round_1)))
    assert trip is not None and trip.gate == gate and trip.iteration == 1 and not trip.fail
    assert trip.message.startswith("round 1: ") and words in trip.message and f"gates.{gate}" in trip.message
    at_the_bound = {"maxLengthRatio": {"ratio": 1.5}, "minWinRate": {"win": 0.5}, "maxKl": {"kl": 10.0}}[gate]
    assert tripped_gate(run, evaluated(figures(0), figures(1, **at_the_bound))) is None


def test_the_first_round_that_crosses_a_gate_is_reported():
    run = run_with({"gates": {"maxKl": 1.0, "onTrip": "Failed"}})
    trip = tripped_gate(run, evaluated(figures(0), figures(1, kl=0.5), figures(2, kl=3.0), figures(3, kl=9.0)))
    assert (trip.iteration, trip.fail) == (2, True)


def test_judge_reward_falling_for_n_rounds_in_a_row_trips_and_a_flat_round_does_not():
    run = run_with({"gates": {"judgeRewardFallingRounds": 2}, "judge": {"model": "/models/judge", "maxLength": 512}})
    falling = evaluated(figures(0, judge=1.0), figures(1, judge=0.5), figures(2, judge=0.2))
    trip = tripped_gate(run, falling)
    assert trip.gate == "judgeRewardFallingRounds" and trip.iteration == 2
    assert "+1.000 -> +0.500 -> +0.200" in trip.message
    assert tripped_gate(run, evaluated(figures(0, judge=1.0), figures(1, judge=0.5))) is None  # only one fall
    assert tripped_gate(run, evaluated(figures(0, judge=1.0), figures(1, judge=1.0), figures(2, judge=0.2))) is None


# -- the final policy ------------------------------------------------------------------------
def test_without_evaluation_or_a_trip_last_keeps_the_last_checkpoint():
    assert final_policy(run_with(None), RunStatus()) == "/runs/ev/iter-03/train/policy"
    run = run_with({})
    assert final_policy(run, evaluated(figures(0), figures(1), figures(2), figures(3))) == "/runs/ev/iter-03/train/policy"


def test_a_trip_keeps_the_last_round_before_it_and_round_0_means_the_initial_policy():
    run = run_with({"gates": {"maxKl": 1.0}})
    assert final_policy(run, evaluated(figures(0), figures(1, kl=0.5), figures(2, kl=2.0))) == "/runs/ev/iter-01/train/policy"
    assert final_policy(run, evaluated(figures(0), figures(1, kl=2.0))) == "/models/sft"


@pytest.mark.parametrize(
    ("select", "expected"),
    [("judge-reward", "/runs/ev/iter-01/train/policy"), ("win-rate", "/runs/ev/iter-02/train/policy")],
)
def test_select_picks_the_best_round_the_earliest_on_a_tie(select, expected):
    run = run_with({"select": select, "judge": {"model": "/models/judge", "maxLength": 512}})
    status = evaluated(figures(0, judge=0.0), figures(1, judge=2.0, win=0.6), figures(2, judge=2.0, win=0.8),
                       figures(3, judge=1.0, win=0.8))  # fmt: skip
    assert final_policy(run, status) == expected


def test_win_rate_select_keeps_the_initial_policy_when_no_round_beats_it():
    run = run_with({"select": "win-rate"})
    assert final_policy(run, evaluated(figures(0), figures(1, win=0.4), figures(2, win=0.5))) == "/models/sft"


# -- how a run ends ----------------------------------------------------------------------------
def test_the_planner_finishes_a_tripped_run_before_planning_the_next_round():
    run = run_with({"gates": {"minWinRate": 0.5}}, iterations=3)
    status = evaluated(figures(0), figures(1, win=0.2))
    step = next_step(run, status, spec_file="/etc/run.json", urls={"reward": "http://rm:8000"})
    assert isinstance(step, Finished) and step.gate.gate == "minWinRate" and step.final_policy == "/models/sft"


@pytest.mark.parametrize("on_trip", ["Succeeded", "Failed"])
def test_a_tripped_gate_ends_the_run_with_reason_gate_tripped(on_trip):
    run = run_with({"gates": {"maxLengthRatio": 1.2, "onTrip": on_trip}})
    status = evaluated(figures(0), figures(1, length=30.0, ratio=1.5))
    step = next_step(run, status, spec_file="/etc/run.json", urls={"reward": "http://rm:8000"})
    done = finished(status, step, NOW)
    assert done.phase == on_trip and done.final_policy == "/models/sft" and done.current_stage is None
    conditions = {c.type: c for c in done.conditions}
    assert conditions[on_trip].status == "True" and conditions[on_trip].reason == "GateTripped"
    assert "stopped by gates.maxLengthRatio: round 1:" in conditions[on_trip].message
    assert conditions["Progressing"].status == "False"
    other = "Failed" if on_trip == "Succeeded" else "Succeeded"
    assert conditions[other].status == "False"


def test_an_unfinished_evaluation_does_not_trip_and_the_run_goes_on():
    run = run_with({"gates": {"maxKl": 1.0}})
    status = stage_started(evaluated(figures(0)), 1, Stage.EVALUATE, "/p1", NOW)
    step = next_step(run, status, spec_file="/etc/run.json", urls={"reward": "http://rm:8000"})
    assert not isinstance(step, Finished)  # a started stage has no figures: no gate reads it


def test_the_status_table_shows_the_evaluation_columns_and_why_the_run_stopped():
    from iterdpo.local.report import status_table

    run = run_with({"gates": {"minWinRate": 0.5}})
    status = evaluated(figures(0, judge=0.25, length=10.0), figures(1, judge=0.5, win=0.25, length=15.0, ratio=1.5, kl=2.0))
    step = next_step(run, status, spec_file="/etc/run.json", urls={"reward": "http://rm:8000"})
    lines = status_table("ev", finished(status, step, NOW), 3).splitlines()
    header = lines[1].split()
    assert {"eval", "judge", "win", "kl"} <= set(header)
    cells = lines[3].split()  # ... judge, win, len x, kl, then gen s, score s, train s, eval s
    assert cells[0] == "1" and cells[-8:-4] == ["+0.500", "0.25", "1.50", "2.000"]
    assert lines[-2].startswith("stopped by gates.minWinRate: round 1: win rate against round 0 is 0.250")
    assert lines[-1] == "final policy: /models/sft"


def test_the_plot_draws_four_panels_with_evaluation_one_without_and_says_what_it_cannot(tmp_path, monkeypatch):
    import sys

    from PIL import Image

    from iterdpo.local.plot import PlotError, plot_status
    from iterdpo.stages import ScoringFigures

    status = evaluated(figures(0, judge=0.1), figures(1, judge=0.4, win=0.7, ratio=1.2, kl=1.5))
    out = plot_status("ev", status, tmp_path / "ev.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["ev.png"]
    scoring = ScoringFigures(mean_reward=0.2, min_reward=0, max_reward=1, pairs=3, ties_dropped=0, prompts_left_out=0,
                             seconds=1.0)  # fmt: skip
    plain = stage_finished(stage_started(RunStatus(), 1, Stage.SCORE, "/p", NOW), 1, Stage.SCORE, scoring, NOW)
    one = plot_status("plain", plain, tmp_path / "plain.png")
    with Image.open(out) as four, Image.open(one) as single:
        assert four.width > 3 * single.width and four.height == single.height
    assert plot_status("ev", status, tmp_path / "ev.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(PlotError, match="run new has no finished round to draw yet"):
        plot_status("new", RunStatus(), tmp_path / "new.png")
    with pytest.raises(PlotError, match=r"the file name must end in \.png, \.svg or \.pdf"):
        plot_status("ev", status, tmp_path / "ev.gif")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotError, match=r"--plot needs matplotlib: pip install 'iterdpo\[plot\]'"):
        plot_status("ev", status, tmp_path / "again.png")


# -- rollback: a round starts from the best round so far -------------------------------------------
def _through_round(run, *evaluations: EvaluationFigures) -> RunStatus:
    """Round 0 evaluated, then rounds 1..n generated, scored, trained and evaluated."""
    from iterdpo.stages import GenerationFigures, ScoringFigures, TrainingFigures

    status = evaluated(evaluations[0])
    for i, f in enumerate(evaluations[1:], 1):
        status = stage_started(status, i, Stage.GENERATE, f"/p{i}", NOW)
        for stage, done in ((Stage.GENERATE, GenerationFigures(prompts=1, samples=2, seconds=1.0)),
                            (Stage.SCORE, ScoringFigures(mean_reward=0.0, pairs=1, ties_dropped=0, prompts_left_out=0,
                                                         seconds=1.0)),
                            (Stage.TRAIN, TrainingFigures(loss=0.5, reward_accuracy=0.5, reward_margin=0.1,
                                                          checkpoint=f"/runs/ev/iter-{i:02d}/train/policy", seconds=1.0)),
                            (Stage.EVALUATE, f)):  # fmt: skip
            status = stage_finished(status, i, stage, done, NOW)
    return status


def _argv(step) -> list[str]:
    return [a for job in step.jobs for a in job.argv]


def test_rollback_starts_the_next_round_from_the_best_round_so_far():
    from iterdpo.evaluation import start_policy

    run = run_with({"select": "judge-reward", "rollback": True, "judge": {"model": "/models/judge", "maxLength": 512}},
                   iterations=4)  # fmt: skip
    worse = _through_round(run, figures(0, judge=1.0), figures(1, judge=0.2))  # round 1 made it worse
    assert start_policy(run, worse, 2) == "/models/sft"
    gen = next_step(run, worse, spec_file="/etc/run.json", urls={"reward": "http://rm:8000", "judge": "http://j:8001"})
    assert (gen.iteration, gen.stage, gen.policy) == (2, Stage.GENERATE, "/models/sft")
    argv = _argv(gen)
    assert argv[argv.index("--policy") + 1] == "/models/sft"

    better = _through_round(run, figures(0, judge=1.0), figures(1, judge=0.2), figures(2, judge=3.0))
    assert start_policy(run, better, 3) == "/runs/ev/iter-02/train/policy"

    # Without rollback the same figures change nothing: round 2 starts from round 1's checkpoint, no flag.
    plain = run_with({"select": "judge-reward", "judge": {"model": "/models/judge", "maxLength": 512}}, iterations=4)
    step = next_step(plain, worse, spec_file="/etc/run.json", urls={"reward": "http://rm:8000", "judge": "http://j:8001"})
    assert step.policy == "/runs/ev/iter-01/train/policy" and "--policy" not in _argv(step)


def test_rollback_passes_the_start_to_train_but_not_to_score_or_evaluate():
    from iterdpo.planner import stage_step

    run = run_with({"select": "win-rate", "rollback": True}, iterations=3)
    for stage, flagged in ((Stage.GENERATE, True), (Stage.SCORE, False), (Stage.TRAIN, True), (Stage.EVALUATE, False)):
        step = stage_step(run, 2, stage, spec_file="/etc/run.json", urls={"reward": "http://rm:8000"}, policy="/models/sft")
        assert step.policy == "/models/sft" and ("--policy" in _argv(step)) == flagged, stage
    assert "--policy" not in _argv(stage_step(run, 2, Stage.TRAIN, spec_file="/etc/run.json",
                                              urls={"reward": "http://rm:8000"}))  # fmt: skip


def test_with_reference_previous_the_rolled_back_start_is_also_the_reference():
    from iterdpo.layout import reference_for

    run = run_with({"select": "win-rate", "rollback": True})
    previous = run.model_copy(update={"spec": run.spec.model_copy(update={"reference": "previous"})})
    assert reference_for(previous, 2, "/models/sft") == "/models/sft"
    assert reference_for(previous, 2) == "/runs/ev/iter-01/train/policy"
    initial = run.model_copy(update={"spec": run.spec.model_copy(update={"reference": "initial"})})
    assert reference_for(initial, 2, "/runs/ev/iter-01/train/policy") == "/models/sft"
