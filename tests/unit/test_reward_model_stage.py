"""The RewardModel stage as the core and the operator see it: spec, plan, status, layout,
paths, summary, and its Kubernetes child (the program itself: tests/e2e, tests/component)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from iterdpo.errors import UsageError
from iterdpo.layout import RunLayout, reward_model_for
from iterdpo.local.report import status_table
from iterdpo.planner import next_step
from iterdpo.runfile import SpecError, load_for_stage, parse_run
from iterdpo.stages import (
    LEFT_OUT_SHOWN,
    REWARD_MODEL,
    STAGE_TABLE,
    GenerationFigures,
    RewardModelFigures,
    RewardModelSummary,
    Stage,
)
from iterdpo.status import RunStatus, stage_finished, stage_started, succeeded

NOW = "2026-12-02T00:00:00Z"
RM = {"base": "/models/base", "data": {"dataset": "/data/prefs.jsonl"}}
SPECS = Path(__file__).parent / "golden_specs"


def body(reward: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "demo"},
        "spec": {"iterations": 2, "policy": {"model": "/models/sft"}, "prompts": {"dataset": "/data/p.jsonl"},
                 "reward": reward if reward is not None else {"training": RM}, "storage": {"root": "/runs"}, **spec},
    }  # fmt: skip


RUN = parse_run(body())
FIGURES = RewardModelFigures(pairs=90, pairs_left_out=2, pairs_truncated=1, held_out_pairs=10, held_out_accuracy=0.9,
                             held_out_margin=1.5, loss=0.3, checkpoint="/runs/demo/iter-00/reward_model/model",
                             seconds=12.0)  # fmt: skip


# -- spec ----------------------------------------------------------------------------------
def test_reward_training_takes_the_reports_defaults_and_holds_out_a_share():
    t = RUN.spec.reward.training
    assert (t.learning_rate, t.epochs, t.weight_decay, t.global_batch_size, t.zero_stage) == (2e-6, 1, 0.001, 512, 3)
    assert (t.scheduler, t.warmup_ratio, t.precision) == ("cosine", 0.03, "bf16")
    assert t.held_out == 0.05 and t.data.format == "auto" and t.data.margin_field is None
    split = parse_run(body({"training": {**RM, "heldOutSplit": "test"}})).spec.reward.training
    assert split.held_out == 0.0
    # DPO training keeps its own defaults
    assert (RUN.spec.training.learning_rate, RUN.spec.training.epochs) == (5e-7, 2)


@pytest.mark.parametrize(
    ("reward", "blamed"),
    [
        ({}, "spec.reward.model: is required unless reward.training trains the reward model"),
        ({"model": "/m/rm", "training": RM}, "spec.reward.training: trains the reward model every round scores with"),
        ({"training": {**RM, "data": {"dataset": "/d.jsonl", "marginField": "chosen"}}},
         "spec.reward.training.data.rejectedField: chosenField, rejectedField, promptField and marginField must"),
        ({"training": {**RM, "globalBatchSize": 10, "microBatchSize": 4}},
         "spec.reward.training.globalBatchSize: must be a multiple of microBatchSize x nprocPerNode x nodes = 4 x 1"),
        ({"training": {**RM, "bogus": 1}}, "spec.reward.training.bogus: unknown field"),
        ({"training": {**RM, "data": {"dataset": "/d.jsonl", "format": "pairs"}}},
         "spec.reward.training.data.format: unknown value 'pairs'; allowed: 'auto', 'implicit' or 'explicit'"),
    ],
)  # fmt: skip
def test_bad_reward_training_is_refused_naming_the_field(reward, blamed):
    with pytest.raises(SpecError) as err:
        parse_run(body(reward))
    assert err.value.problems[0].startswith(blamed), err.value.problems


def test_relative_paths_of_reward_training_resolve_against_the_run_file(tmp_path):
    from iterdpo.runfile import load_run

    manifest = body({"training": {"base": "./base", "data": {"dataset": "../prefs.jsonl"}}})
    path = tmp_path / "runs" / "run.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(manifest))
    t = load_run(path).spec.reward.training
    assert t.base == str(tmp_path / "runs" / "base") and t.data.dataset == str(tmp_path / "prefs.jsonl")


def test_local_checks_name_the_base_and_the_data_and_refuse_many_nodes(tmp_path):
    from iterdpo.localpaths import local_path_problems, runner_problems

    run = parse_run(body({"training": {"base": str(tmp_path / "nope"), "data": {"dataset": str(tmp_path / "p.txt")}}}))
    problems = [p for p in local_path_problems(run) if p.startswith("spec.reward")]
    assert problems[0].startswith(f"spec.reward.training.base: {tmp_path / 'nope'} does not exist")
    assert problems[1].startswith("spec.reward.training.data.dataset:")
    many = parse_run(body({"training": {**RM, "nodes": 2}}))
    assert runner_problems(many) == ["spec.reward.training.nodes: iterdpo run trains on this machine only; set 1, "
                                     "or run it on Kubernetes (got 2)"]  # fmt: skip


# -- plan, status, layout ------------------------------------------------------------------
def test_the_reward_model_is_trained_first_as_round_0_then_the_rounds_run():
    step = next_step(RUN, RunStatus(), spec_file="/runs/demo/run.json")
    assert (step.iteration, step.stage, step.services) == (0, Stage.REWARD_MODEL, ())
    (job,) = step.jobs
    assert job.argv == ("torchrun", "--nnodes=1", "--nproc-per-node=1", "-m", "iterdpo_trainer.reward_model",
                        "--spec", "/runs/demo/run.json", "--iteration", "0")  # fmt: skip
    status = stage_started(RunStatus(), 0, Stage.REWARD_MODEL, "/models/sft", NOW)
    assert status.condition("Progressing").message == "before round 1: RewardModel is running"
    status = stage_finished(status, 0, Stage.REWARD_MODEL, FIGURES, NOW)
    after = next_step(RUN, status, spec_file="/runs/demo/run.json")
    assert (after.iteration, after.stage) == (1, Stage.GENERATE)
    assert status.to_json()["iterations"][0]["rewardModel"]["heldOutAccuracy"] == 0.9


def test_without_reward_training_there_is_no_round_0():
    plain = parse_run(body({"model": "/models/rm"}))
    step = next_step(plain, RunStatus(), spec_file="/x")
    assert (step.iteration, step.stage) == (1, Stage.GENERATE)
    assert not REWARD_MODEL.enabled(plain) and REWARD_MODEL.enabled(RUN)


def test_every_round_scores_with_the_trained_model():
    assert reward_model_for(RUN) == "/runs/demo/iter-00/reward_model/model"
    assert reward_model_for(parse_run(body({"model": "/models/rm"}))) == "/models/rm"
    layout = RunLayout.of(RUN)
    assert REWARD_MODEL.markers(layout, 0, RUN) == (layout.reward_model_metrics(),)
    assert layout.reward_model().parent == layout.reward_model_left_out().parent == layout.stage_dir(0, Stage.REWARD_MODEL)


def test_the_table_shows_round_0_only_for_a_run_that_has_it():
    status = stage_finished(stage_started(RunStatus(), 0, Stage.REWARD_MODEL, "/m", NOW), 0, Stage.REWARD_MODEL,
                            FIGURES, NOW)  # fmt: skip
    status = stage_started(status, 1, Stage.GENERATE, "/m", NOW)
    status = stage_finished(status, 1, Stage.GENERATE, GenerationFigures(prompts=4, samples=8, seconds=3), NOW)
    lines = status_table("demo", status, 2).splitlines()
    assert lines[0] == "run demo: Running (round 1 of 2, Generate)"
    assert "rm s  gen s" in lines[1]
    assert lines[2].split()[0] == "0" and lines[2].split()[-5:] == ["12", "-", "-", "-", "-"]
    plain = stage_started(RunStatus(), 1, Stage.GENERATE, "/m", NOW)
    assert "rm s" not in status_table("demo", plain, 2)
    done = succeeded(status, "/final", NOW)
    assert done.condition("Succeeded").message == "1 rounds finished"  # round 0 is not a round


def test_load_for_stage_says_where_the_stage_runs(tmp_path):
    hub = {"policy": {"model": "org/sft"}, "prompts": {"dataset": "org/prompts"}}
    for manifest, iteration, message in (
        (body({"training": {"base": "org/base", "data": {"dataset": "org/prefs"}}}, **hub), 1, "--iteration: RewardModel runs in round 0 only (spec.iterations is 2); got 1"),
        (body({"model": "org/rm"}, **hub), 0, "RewardModel is not a stage of this run"),
    ):
        path = tmp_path / "run.json"
        path.write_text(json.dumps(manifest))
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_for_stage(path, iteration, Stage.REWARD_MODEL)


# -- summary -> figures ---------------------------------------------------------------------
def test_the_summary_fits_a_termination_message_and_becomes_the_figures():
    reasons = [f"line {i}: " + "x" * 5000 for i in range(10)]
    from iterdpo_trainer.reward_model import summary_of

    from iterdpo.contracts import RewardModelMetrics

    metrics = RewardModelMetrics(
        pairs=90, pairs_left_out=10, left_out_reasons=reasons, pairs_truncated=1, pairs_repeated_to_fill_last_step=0,
        held_out_pairs=10, held_out_pairs_truncated=0, steps=[], final_loss=0.312345678, held_out=[],
        held_out_accuracy=0.91234567, held_out_margin=1.5, seconds=9.0, checkpoint="/ck", base="/b", world_size=2,
    )  # fmt: skip
    summary = summary_of(metrics)
    message = summary.to_message()
    assert len(message.encode()) < 4096 and len(summary.left_out_reasons) == LEFT_OUT_SHOWN
    parsed = RewardModelSummary.parse(message, source="pod x")
    figures = REWARD_MODEL.figures_of([parsed], 30.04, RUN)
    assert (figures.held_out_accuracy, figures.loss, figures.seconds, figures.pairs_left_out) == (0.9123, 0.3123, 30.0, 10)
    assert REWARD_MODEL.line(figures).startswith("reward model: 90 pairs (10 left out, 1 truncated), loss 0.3123, "
                                                  "held-out accuracy 0.912")  # fmt: skip


def test_held_out_draw_is_seeded_and_always_leaves_a_training_pair():
    from iterdpo_trainer.reward_model import split_held_out

    pairs = list(range(100))
    train, held = split_held_out(pairs, 0.1, 42)
    assert len(held) == 10 and sorted(train + held) == pairs and train == sorted(train)
    assert split_held_out(pairs, 0.1, 42) == (train, held) and split_held_out(pairs, 0.1, 7)[1] != held
    assert split_held_out(pairs, 0.0, 42) == (pairs, [])
    assert split_held_out([1, 2], 0.9, 42)[0] and len(split_held_out([1, 2], 0.01, 42)[1]) == 1
    assert split_held_out([1], 0.5, 42) == ([1], [])


def test_the_reader_gets_the_specs_columns():
    from iterdpo_trainer.preferences import DEFAULT_MARGIN_FIELD
    from iterdpo_trainer.reward_model import source_of

    data = parse_run(body({"training": {**RM, "data": {"dataset": "/d.jsonl", "format": "explicit", "chosenField": "win",
                                                       "maxPairs": 5}}})).spec.reward.training.data  # fmt: skip
    source = source_of(data)
    assert (source.format, source.chosen_field, source.max_rows, source.margin_field) == ("explicit", "win", 5,
                                                                                          DEFAULT_MARGIN_FIELD)  # fmt: skip
    assert source_of(data, "test").split == "test"


# -- Kubernetes ------------------------------------------------------------------------------
def _cluster_run(**training):
    from iterdpo_operator.validation import validate_resource

    manifest = yaml.safe_load((SPECS / "multinode.yaml").read_text())
    manifest["spec"]["reward"] = {"training": {"base": "/data/base", "data": {"dataset": "/data/prefs.jsonl"},
                                               "nodes": 2, "nprocPerNode": 4, "globalBatchSize": 64, **training}}  # fmt: skip
    manifest["metadata"]["name"] = "r" * 40
    return validate_resource(manifest)


def test_the_operator_trains_the_reward_model_with_its_own_nodes_and_processes():
    from iterdpo_operator import stage_children as sc

    run = _cluster_run()
    child = sc.child_manifest(run, Stage.REWARD_MODEL, 0, 1, "uid")
    assert child["kind"] == "PyTorchJob" and child["metadata"]["name"] == "r" * 40 + "-i00-rm-a1"
    assert len(child["metadata"]["name"] + "-worker-0") <= 63  # the pods' names, as Kubeflow makes them
    assert child["spec"]["nprocPerNode"] == "4" and child["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    (container,) = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert "iterdpo_trainer.reward_model" in container["command"] + container.get("args", [])
    rendered = [m["kind"] for m in sc.render_round(run, 0)]
    assert rendered == ["ConfigMap", "PyTorchJob"]  # round 0: the reward model only
    assert sc.stage_timeout(run, Stage.REWARD_MODEL) == STAGE_TABLE[Stage.REWARD_MODEL].timeout_seconds


def test_the_operator_checks_the_reward_model_pods_gpus_against_its_processes():
    from iterdpo_operator.validation import InvalidRun, validate_resource

    manifest = yaml.safe_load((SPECS / "multinode.yaml").read_text())
    manifest["spec"]["reward"] = {"training": {"base": "/data/base", "data": {"dataset": "/data/prefs.jsonl"},
                                               "nprocPerNode": 4, "globalBatchSize": 64}}  # fmt: skip
    manifest["spec"]["kubernetes"]["resources"]["rm"] = {"gpus": 8}
    with pytest.raises(InvalidRun, match=r"spec.kubernetes.resources.rm.gpus: torchrun starts "
                                         r"reward.training.nprocPerNode = 4 processes per pod"):  # fmt: skip
        validate_resource(copy.deepcopy(manifest))
    manifest["spec"]["reward"]["training"]["base"] = "/elsewhere/base"
    manifest["spec"]["kubernetes"]["resources"]["rm"] = {}
    with pytest.raises(InvalidRun, match=r"spec.reward.training.base: '/elsewhere/base' cannot exist in the pods"):
        validate_resource(manifest)


def test_serve_reward_with_the_spec_serves_the_trained_checkpoint(tmp_path):
    from iterdpo_reward_server.settings import SettingsError, settings_from_args

    path = tmp_path / "run.json"
    path.write_text(json.dumps(body(storage={"root": str(tmp_path)})))
    with pytest.raises(SettingsError, match=r"the reward model of spec.reward.training \(the RewardModel stage writes "
                                            r"it\): .*iter-00/reward_model/model does not exist"):  # fmt: skip
        settings_from_args(["--spec", str(path)])


def test_a_held_out_split_of_a_single_file_is_refused(tmp_path):
    """A JSONL (or JSON, Parquet) file has one split: its 'test' split would be the training pairs again."""
    from iterdpo.localpaths import local_path_problems

    data = tmp_path / "prefs.jsonl"
    data.write_text("{}\n")
    run = parse_run(body({"training": {**RM, "data": {"dataset": str(data)}, "heldOutSplit": "test"}}))
    assert [p for p in local_path_problems(run) if "heldOutSplit" in p] == [
        f"spec.reward.training.heldOutSplit: {data} is one file, which has one split: hold out a share instead "
        "(heldOutShare), or give a folder or hub dataset that has a 'test' split"]


def test_every_trainable_kind_has_an_objective_of_that_name():
    from iterdpo.spec import TRAINABLE_KINDS
    from iterdpo_trainer.rm_train import OBJECTIVES

    assert tuple(OBJECTIVES) == TRAINABLE_KINDS
    assert all(objective.name == kind for kind, objective in OBJECTIVES.items())
