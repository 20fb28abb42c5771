"""The stage table and the registries that must agree with the spec: a new stage, reward kind,
loss type or launcher that is declared in one place but not its pair fails here, by name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from iterdpo.errors import StageError, UsageError, stage_main
from iterdpo.spec import LOSS_KINDS, SCORER_KINDS, TRAIN_LAUNCHERS, StageResources
from iterdpo.stages import PROGRAMS, STAGE_TABLE, STAGES, Stage, pods
from iterdpo.status import IterationStatus

REPO = Path(__file__).resolve().parents[2]


def test_every_stage_has_one_entry_with_its_own_names():
    assert [d.stage for d in STAGES] == list(Stage) and set(STAGE_TABLE) == set(Stage)
    for attr in ("status_field", "folder", "seconds_column"):
        values = [getattr(d, attr) for d in STAGES]
        assert len(set(values)) == len(values), attr
    tags = [d.summary.model_fields["stage"].default for d in STAGES]
    assert len(set(tags)) == len(tags) and all(tags)


def test_the_status_has_one_field_per_stage_typed_by_the_table():
    assert list(IterationStatus.model_fields) == ["iteration", "policy", "lineage", *(d.status_field for d in STAGES)]
    for d in STAGES:
        field = IterationStatus.model_fields[d.status_field]
        assert field.description == d.description and d.figures.__name__ in str(field.annotation)


def test_the_spec_has_one_resources_field_per_kind_of_pod():
    assert list(StageResources.model_fields) == [p.key for p in pods()] == ["sft", "rm", "generate", "reward", "annotate", "train", "judge", "evaluate"]
    schema = json.loads((REPO / "charts" / "iterdpo" / "values.schema.json").read_text())
    chart = schema["properties"]["stageDefaults"]["properties"]["resources"]["properties"]
    assert list(chart) == [p.key for p in pods()], "values.schema.json stageDefaults.resources: one key per pod"


def test_every_program_the_table_runs_exists():
    for program in PROGRAMS:
        module, _, function = program.target.partition(":")
        assert importlib.util.find_spec(module) is not None, program
        assert callable(getattr(importlib.import_module(module), function)), program


def test_the_operator_has_a_child_for_every_stage():
    from iterdpo_operator.stage_children import CHILDREN

    assert set(CHILDREN) == set(Stage)
    components = [CHILDREN[s].component for s in Stage]
    assert len(set(components)) == len(components)


def test_registries_agree_with_the_spec():
    from iterdpo_operator.launchers import LAUNCHERS
    from iterdpo_reward_server.scorers import SCORERS
    from iterdpo_trainer.loss import LOSSES

    assert set(SCORERS) == set(SCORER_KINDS), "a reward kind in the spec without a scorer, or the reverse"
    assert set(LOSSES) == set(LOSS_KINDS), "a loss type in the spec without a loss function, or the reverse"
    assert set(LAUNCHERS) == set(TRAIN_LAUNCHERS), "a launcher in the spec without a builder, or the reverse"


# -- one error vocabulary for the stage programs ---------------------------------------------
def _raise(exc):
    def body():
        raise exc

    return body


@pytest.mark.parametrize(
    "exc, code, line",
    [
        (UsageError("--iteration: Score runs in rounds 1..2"), 2, "p: error: --iteration: Score runs in rounds 1..2"),
        (StageError("pairs file x not found"), 1, "p: error: pairs file x not found"),
        (FileNotFoundError(2, "No such file or directory", "/x"), 1, "p: error: /x: No such file or directory"),
    ],
)
def test_stage_main_turns_each_kind_of_error_into_its_exit_code_and_one_line(exc, code, line, capsys):
    assert stage_main("p", _raise(exc)) == code
    assert capsys.readouterr().err.strip() == line


def test_a_bad_run_file_is_a_usage_error_for_every_program(tmp_path, capsys, monkeypatch):
    """The same mistake exits the same way in every stage program."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # the trainer's world of one, undone after the test
    from iterdpo_generator.generate import main as generate
    from iterdpo_reward_server.annotate import annotate_main as annotate
    from iterdpo_trainer.cli import main as train

    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: iterdpo.io/v1alpha1\nkind: IterativeDPORun\nmetadata: {name: b}\nspec: {}\n")
    common = ["--spec", str(bad), "--iteration", "1"]
    for prog, main, argv in (("iterdpo generate", generate, [*common, "--shard", "0"]),
                             ("iterdpo annotate", annotate, [*common, "--reward-url", "http://127.0.0.1:9"]),
                             ("iterdpo_trainer (rank 0)", train, common)):  # fmt: skip
        assert main(argv) == 2, prog
        err = capsys.readouterr().err
        assert f"{prog}: error: {bad} is not a valid IterativeDPORun:" in err and "spec.policy: required" in err, err
        assert "Traceback" not in err


def test_each_stage_marks_its_finished_work_with_files_in_its_own_folder():
    from iterdpo.layout import RunLayout
    from iterdpo.runfile import parse_run

    run = parse_run({"apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "r"},
                     "spec": {"policy": {"model": "/p"}, "prompts": {"dataset": "/q"}, "reward": {"model": "/rm"},
                              "generation": {"shards": 3}, "storage": {"root": "/runs"}}})  # fmt: skip
    layout = RunLayout.of(run)
    for d in STAGES:
        t = 2 if d.when.includes(2) else 0
        markers = d.markers(layout, t, run)
        assert markers and all(m.parent == layout.stage_dir(t, d.stage) for m in markers), d.stage
    assert len(STAGE_TABLE[Stage.GENERATE].markers(layout, 2, run)) == 3  # one per shard


def test_a_run_file_without_a_storage_root_is_a_usage_error_naming_the_field(tmp_path, capsys):
    from iterdpo_generator.generate import main as generate

    run = tmp_path / "run.yaml"
    run.write_text("apiVersion: iterdpo.io/v1alpha1\nkind: IterativeDPORun\nmetadata: {name: r}\n"
                   "spec: {policy: {model: /p}, prompts: {dataset: /q}, reward: {model: /rm}}\n")  # fmt: skip
    assert generate(["--spec", str(run), "--iteration", "1", "--shard", "0"]) == 2
    assert capsys.readouterr().err.startswith("iterdpo generate: error: spec.storage.root is not set")
