"""The whole system through Kubernetes objects: the kopf operator drives real runs on the
tiny models. Generation (vLLM) runs in an Indexed Job's pods, the reward server in a
Deployment behind a Service that the annotate Job reaches by its DNS name, and DeepSpeed
training in a PyTorchJob that Kubeflow's training operator turns into a master pod
(`launcher: pytorchjob`, 2 rounds) or in a plain batch Job (`launcher: job`, 1 round). The
local-exec kubelet runs every container's command as a real process on this machine."""

from __future__ import annotations

import json
import shutil

import pytest
from clusterutil import wait_for
from kubernetes import client

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
GROUP, VERSION, PLURAL = "iterdpo.io", "v1alpha1", "iterativedporuns"


# spec.reward with the RewardModel stage: the demo's reward-model recipe (examples/tiny-local.yaml)
TRAINED_REWARD = {"training": {
    "base": "/iterdpo/tiny/policy", "data": {"dataset": "/iterdpo/tiny/preferences.jsonl"}, "heldOutShare": 0.1,
    "learningRate": 1e-3, "epochs": 2, "scheduler": "constant", "warmupRatio": 0.0, "weightDecay": 0.0,
    "globalBatchSize": 32, "microBatchSize": 8, "nprocPerNode": 2, "zeroStage": 2, "precision": "fp32",
    "gradientCheckpointing": False,
}}  # fmt: skip


def _tiny_run(name: str, tiny, volume, *, iterations: int, launcher: str, generation: dict, training: dict,
              max_prompts: int | None = None, reward: dict | None = None) -> dict:  # fmt: skip
    """An IterativeDPORun on the tiny models, copied onto the PV behind the run's claim
    (`volume`, bound by the operator fixture and mounted at /iterdpo). `reward` replaces
    the hand-wired reward model (e.g. TRAINED_REWARD)."""
    for source in (tiny.policy, tiny.reward, tiny.preferences, *tiny.prompts[:iterations]):
        if not (volume / "tiny" / source.name).exists():
            copy = shutil.copytree if source.is_dir() else shutil.copy
            copy(source, volume / "tiny" / source.name)
    limit = {"maxPrompts": max_prompts} if max_prompts else {}
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "IterativeDPORun", "metadata": {"name": name},
        "spec": {
            "iterations": iterations,
            "policy": {"model": "/iterdpo/tiny/policy"},
            "prompts": {"perIteration": [{"dataset": f"/iterdpo/tiny/{p.name}", **limit} for p in tiny.prompts[:iterations]]},
            "generation": {"maxNewTokens": 24, "gpuMemoryUtilization": 0.1, "enforceEager": True, **generation},
            "reward": {**(reward or {"model": "/iterdpo/tiny/reward"}), "maxLength": 256, "batchTokens": 8192,
                       "startupTimeoutSeconds": 120},
            "training": {"learningRate": 5e-3, "scheduler": "constant", "warmupRatio": 0.0, "microBatchSize": 4,
                         "nprocPerNode": 2, "maxLength": 128, "maxPromptLength": 48, "zeroStage": 2, "precision": "fp32",
                         "gradientCheckpointing": False, **training},
            "kubernetes": {"volume": {"claimName": "iterdpo-data"}, "launcher": launcher, "stageRetries": 0,
                           "resources": {s: {"gpus": 0} for s in ("rm", "generate", "reward", "annotate", "train")}},
        },
    }  # fmt: skip


def _run_to_the_end(control_plane, local_exec, operator, ns: str, body: dict, timeout: float) -> dict:
    """Create the run, wait until it is Succeeded or Failed; its status, which must be Succeeded."""
    api = client.CustomObjectsApi(control_plane.api_client)
    api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    name = body["metadata"]["name"]
    status = lambda: api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}  # noqa: E731

    def finished():
        operator.check_alive()
        return status().get("phase") in ("Succeeded", "Failed")

    try:
        wait_for(f"run {name} finished", finished, control_plane, timeout=timeout, interval=2)
    finally:
        print(json.dumps(status(), indent=1))
    final = status()
    assert final["phase"] == "Succeeded", _logs(local_exec, ns)
    for it in final["iterations"]:
        if it["iteration"] == 0:  # the RewardModel stage's round
            continue
        samples = body["spec"]["generation"]["samplesPerPrompt"]
        assert it["generation"]["samples"] == samples * it["generation"]["prompts"]
        assert it["scoring"]["pairs"] + it["scoring"]["tiesDropped"] + it["scoring"]["promptsLeftOut"] == it["generation"]["prompts"]
        assert it["training"]["checkpoint"].startswith(f"/iterdpo/runs/{name}/")
    return final


def _pods(control_plane, ns: str, local_exec) -> list[client.V1Pod]:
    pods = client.CoreV1Api(control_plane.api_client).list_namespaced_pod(ns).items
    assert pods and {p.spec.node_name for p in pods} == {local_exec.node_name}
    return pods


def test_operator_runs_two_real_rounds_through_kubernetes(control_plane, local_exec, operator, ns, tiny, tmp_path):
    """The whole workflow: a real reward-model training pod (a PyTorchJob's master) before
    round 1, then two rounds scored by the reward Deployment serving what it trained."""
    volume = tmp_path / "pv"  # the PV behind the run's claim (the operator fixture binds it)
    body = _tiny_run("real", tiny, volume, iterations=2, launcher="pytorchjob",
                     generation={"samplesPerPrompt": 8, "shards": 2},
                     training={"epochs": 2, "globalBatchSize": 16}, reward=TRAINED_REWARD)  # fmt: skip
    status = _run_to_the_end(control_plane, local_exec, operator, ns, body, timeout=1200)

    trained, first, second = status["iterations"]
    rm = trained["rewardModel"]
    assert rm["checkpoint"] == "/iterdpo/runs/real/iter-00/reward_model/model" and rm["heldOutAccuracy"] >= 0.9
    assert rm["pairs"] + rm["heldOutPairs"] + rm["pairsLeftOut"] == len(tiny.preferences.read_text().splitlines())
    assert (volume / "runs" / "real" / "iter-00" / "reward_model" / "model" / "model.safetensors").exists()
    reward_logs = [log.read_text() for log in (local_exec.root / "pods").glob(f"{ns}_real-reward-*/*.log")]
    assert reward_logs and all("loaded /iterdpo/runs/real/iter-00/reward_model/model" in text for text in reward_logs)
    assert second["policy"] == first["training"]["checkpoint"]  # round 2 generated with round 1's policy
    assert second["scoring"]["meanReward"] > first["scoring"]["meanReward"]  # DPO on the trained RM's pairs helps
    # the artifacts are on the volume, where the pods wrote them
    checkpoint = volume / "runs" / "real" / "iter-02" / "train" / "policy"
    assert (checkpoint / "config.json").exists() and (volume / "runs" / "real" / "iter-01" / "score" / "stats.json").exists()
    masters = [p for p in _pods(control_plane, ns, local_exec)
               if (p.metadata.labels or {}).get("training.kubeflow.org/replica-type") == "master"]  # fmt: skip
    assert len(masters) == 3  # one PyTorchJob master for the reward model, one per round, made by Kubeflow's operator


def test_operator_trains_in_a_plain_job_with_launcher_job(control_plane, local_exec, operator, ns, tiny, tmp_path):
    """`launcher: job`: torchrun alone in a batch Job's pod. Its rendezvous publishes the pod's
    host name (socket.getfqdn()) as MASTER_ADDR, which must resolve to the pod IP there."""
    volume = tmp_path / "pv"
    body = _tiny_run("plain", tiny, volume, iterations=1, launcher="job", max_prompts=16,
                     generation={"samplesPerPrompt": 4, "shards": 1},
                     training={"epochs": 1, "globalBatchSize": 8})  # fmt: skip
    (it,) = _run_to_the_end(control_plane, local_exec, operator, ns, body, timeout=600)["iterations"]
    assert it["generation"]["prompts"] == 16
    assert (volume / "runs" / "plain" / "iter-01" / "train" / "policy" / "config.json").exists()

    train = [p for p in _pods(control_plane, ns, local_exec) if p.metadata.labels.get("app.kubernetes.io/component") == "train"]
    assert [(o.kind, o.name) for p in train for o in p.metadata.owner_references] == [("Job", "plain-i01-train-a1")]
    assert not any(k.startswith("training.kubeflow.org/") for p in train for k in p.metadata.labels)
    pytorchjobs = client.CustomObjectsApi(control_plane.api_client).list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs")
    assert pytorchjobs["items"] == []


def _logs(local_exec, ns: str) -> str:
    """The tail of every container log of the namespace, for a failure message."""
    out = []
    for log in sorted((local_exec.root / "pods").glob(f"{ns}_*/*.log")):
        out.append(f"--- {log.parent.name}/{log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)
