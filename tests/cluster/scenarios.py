"""What the operator tests share: a small run, and instant-kubelet rules that play each
stage's pods, leaving the summary its program would (built from the stage's own summary
model, so a fake cannot drift from what the real programs emit)."""

from __future__ import annotations

from kubernetes import client

from iterdpo.lineage import Lineage
from iterdpo.stages import EvaluateSummary, GenerateSummary, RewardModelSummary, ScoreSummary, TrainSummary

GROUP, VERSION, PLURAL = "iterdpo.io", "v1alpha1", "iterativedporuns"


def summaries(fail: dict[str, str] | None = None, hold: set[str] = frozenset(), shards: int = 2):
    """An instant-kubelet rule: per component, a plausible summary; `fail` maps a component
    to the message its pod dies with; `hold` keeps those components' pods running; `shards`
    is the run's generation.shards (run_body's is 2)."""
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
            shard = int((pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index", "0"))
            return 0, GenerateSummary(shard=shard, shards=shards, prompts=10, prompts_out=9, samples=72,
                                      prompts_left_out=1, seconds=1.0).to_message()  # fmt: skip
        if component == "annotate":
            return 0, ScoreSummary(mean_reward=0.5 * it, min_reward=-1.0, max_reward=2.0, pairs=9, ties_dropped=1,
                                   prompts_left_out=0, seconds=1.0).to_message()  # fmt: skip
        if component == "rm":
            return 0, RewardModelSummary(pairs=90, pairs_left_out=2, left_out_reasons=["line 3: not valid JSON"] * 2,
                                         pairs_truncated=0, held_out_pairs=10, held_out_accuracy=0.9,
                                         held_out_margin=1.25, loss=0.25, seconds=1.0,
                                         checkpoint="/iterdpo/runs/r/iter-00/reward_model/model").to_message()  # fmt: skip
        if component == "train":
            checkpoint, pairs = f"/iterdpo/runs/r/iter-{it:02d}/train/policy", f"/iterdpo/runs/r/iter-{it:02d}/score/pairs.jsonl"
            lineage = Lineage(read={pairs: f"sha256:{it:064x}"}, wrote={checkpoint: f"sha256:{it + 100:064x}"})
            return 0, TrainSummary(loss=0.5 / it, reward_accuracy=0.75, reward_margin=0.3 * it, seconds=1.0,
                                   checkpoint=checkpoint, pairs=9, pairs_truncated=0, lineage=lineage).to_message()  # fmt: skip
        if component == "evaluate":  # round it: KL it, length 20 + 10 it tokens, and a win rate from round 1 on
            policy = "/iterdpo/models/policy" if it == 0 else f"/iterdpo/runs/r/iter-{it:02d}/train/policy"
            won = None if it == 0 else 0.75
            return 0, EvaluateSummary(policy=policy, prompts=12, prompts_left_out=0, left_out_reasons=[], overlap=0,
                                      samples=12, mean_reward=0.5 * it, judge_reward=None, win_rate=won,
                                      win_rate_low=won and 0.5, win_rate_high=won and 0.9, judged_by="reward",
                                      length_mean=20.0 + 10 * it, length_p90=30.0 + 10 * it,
                                      length_ratio=None if it == 0 else (20.0 + 10 * it) / 20.0, truncated_share=0.0,
                                      kl=float(it), seconds=1.0).to_message()  # fmt: skip
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


