"""A run folder belongs to one recipe: a re-created run with another recipe cannot reuse it."""

from __future__ import annotations

import json

import pytest

from iterdpo.errors import StageError
from iterdpo.layout import RunLayout, claim_run_folder
from iterdpo.runfile import parse_run

BODY = {"apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "r"},
        "spec": {"policy": {"model": "org/p"}, "prompts": {"dataset": "org/q"}, "reward": {"model": "org/rm"}}}  # fmt: skip


def run_at(root, **spec):
    return parse_run({**BODY, "spec": {**BODY["spec"], "storage": {"root": str(root)}, **spec}})


def test_first_stage_marks_the_folder_and_the_same_recipe_passes(tmp_path):
    run = run_at(tmp_path)
    claim_run_folder(run)
    marker = json.loads(RunLayout.of(run).recipe_file.read_text())
    assert marker == {"name": "r", "specHash": run.spec_hash()}
    claim_run_folder(run)  # again: fine
    claim_run_folder(run_at(tmp_path, kubernetes={"image": "other:1"}))  # how it runs may change


def test_another_recipe_is_refused_with_what_to_do(tmp_path):
    claim_run_folder(run_at(tmp_path))
    with pytest.raises(StageError, match="holds the artifacts of another recipe.*metadata.name or spec.storage.root"):
        claim_run_folder(run_at(tmp_path, generation={"seed": 7}))


def test_added_rounds_are_the_same_recipe_grown_and_the_marker_follows(tmp_path):
    claim_run_folder(run_at(tmp_path))  # 3 rounds
    grown = run_at(tmp_path, iterations=5)
    claim_run_folder(grown)
    assert json.loads(RunLayout.of(grown).recipe_file.read_text())["specHash"] == grown.spec_hash()
    with pytest.raises(StageError, match="another recipe"):  # rounds cannot be taken away again
        claim_run_folder(run_at(tmp_path))
