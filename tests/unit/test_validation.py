"""Kubernetes-only checks of a run: what the CRD schema cannot know."""

from __future__ import annotations

import copy

import pytest

from iterdpo_operator.validation import InvalidRun, validate_resource

BODY = {
    "apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "r", "namespace": "ml"},
    "spec": {"policy": {"model": "/iterdpo/models/policy"}, "prompts": {"dataset": "org/prompts"},
             "reward": {"model": "org/rm"}, "training": {"nprocPerNode": 8, "globalBatchSize": 128},
             "kubernetes": {"volume": {"claimName": "data"}}},
}  # fmt: skip


def problems(**changes) -> str:
    body = copy.deepcopy(BODY)
    for dotted, value in changes.items():
        node = body["spec"]
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    with pytest.raises(InvalidRun) as exc:
        validate_resource(body)
    return str(exc.value)


def test_a_valid_cluster_run_passes():
    run = validate_resource(BODY)
    assert run.metadata.namespace == "ml"


def test_claim_is_required():
    assert "spec.kubernetes.volume.claimName: required" in problems(kubernetes={"volume": {}})


def test_relative_and_outside_paths_are_named():
    text = problems(policy__model="./policy", reward__model="/models/rm", storage={"root": "/scratch/runs"})
    assert "spec.policy.model: './policy' is relative" in text
    assert "spec.reward.model: '/models/rm' cannot exist in the pods" in text
    assert "spec.storage.root: '/scratch/runs' cannot exist in the pods" in text


def test_per_iteration_prompt_paths_are_checked_by_index():
    text = problems(iterations=2, prompts={"perIteration": [{"dataset": "/iterdpo/a.jsonl"}, {"dataset": "/tmp/b.jsonl"}]})
    assert "spec.prompts.perIteration[1].dataset" in text and "perIteration[0]" not in text


def test_gpu_counts_must_fit_the_recipe():
    text = problems(kubernetes={"volume": {"claimName": "d"}, "resources": {"train": {"gpus": 4}, "generate": {"gpus": 1}}},
                    generation={"tensorParallelSize": 2})  # fmt: skip
    assert "spec.kubernetes.resources.train.gpus" in text and "set it to 8" in text
    assert "spec.kubernetes.resources.generate.gpus" in text and "at least 2" in text


def test_schema_errors_name_the_field():
    assert "spec.pairing.strategy" in problems(pairing={"strategy": "best_worst"})
