"""What the operator tests share: a small run, and instant-kubelet rules that play each
stage's pods, leaving the summary its program would."""

from __future__ import annotations

import json

from kubernetes import client

GROUP, VERSION, PLURAL = "iterdpo.io", "v1alpha1", "iterativedporuns"


def summaries(fail: dict[str, str] | None = None, hold: set[str] = frozenset()):
    """An instant-kubelet rule: per component, a plausible summary; `fail` maps a component
    to the message its pod dies with; `hold` keeps those components' pods running."""
    fail = fail or {}

    def rule(pod: client.V1Pod):
        labels = pod.metadata.labels or {}
        component = labels.get("app.kubernetes.io/component") or labels.get("training.kubeflow.org/replica-type")
        if component in hold:
            return None
        if component in fail:
            return 1, fail[component]
        it = int(labels.get("iterdpo.io/iteration", "1"))
        if component == "generate":
            return 0, json.dumps({"stage": "generate", "prompts": 10, "samples": 80, "promptsLeftOut": 1})
        if component == "annotate":
            return 0, json.dumps({"stage": "annotate", "meanReward": 0.5 * it, "minReward": -1.0, "maxReward": 2.0,
                                  "pairs": 9, "tiesDropped": 1, "promptsLeftOut": 0})  # fmt: skip
        if component == "train":
            return 0, json.dumps({"stage": "train", "loss": 0.5 / it, "rewardAccuracy": 0.75, "rewardMargin": 0.3 * it,
                                  "checkpoint": f"/iterdpo/runs/r/iter-{it:02d}/train/policy"})  # fmt: skip
        return 0, ""

    return rule


def run_body(name: str, **spec_overrides) -> dict:
    spec = {
        "iterations": 2,
        "policy": {"model": "/iterdpo/models/policy"},
        "prompts": {"dataset": "/iterdpo/prompts.jsonl"},
        "reward": {"model": "/iterdpo/models/reward", "maxLength": 256, "batchTokens": 4096},
        "generation": {"shards": 2},
        "training": {"nodes": 1, "nprocPerNode": 2, "globalBatchSize": 8, "maxLength": 128, "maxPromptLength": 48},
        "kubernetes": {"volume": {"claimName": "iterdpo-data"}, "retryBackoffSeconds": 1},
    }
    for key, value in spec_overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "IterativeDPORun", "metadata": {"name": name}, "spec": spec}


