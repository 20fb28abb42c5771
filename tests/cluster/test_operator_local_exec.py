"""The whole system through Kubernetes objects: the kopf operator drives a real 2-round run
on the tiny models. Generation (vLLM) runs in an Indexed Job's pods, the reward server in a
Deployment behind a Service that the annotate Job reaches by its DNS name, and DeepSpeed
training in a PyTorchJob that Kubeflow's training operator turns into a master pod. The
local-exec kubelet runs every container's command as a real process on this machine."""

from __future__ import annotations

import json
import shutil

import pytest
from clusterutil import wait_for
from kubernetes import client

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
GROUP, VERSION, PLURAL = "iterdpo.io", "v1alpha1", "iterativedporuns"


def test_operator_runs_two_real_rounds_through_kubernetes(control_plane, local_exec, operator, ns, tiny, tmp_path):
    volume = tmp_path / "pv"  # the PV behind the run's claim (the operator fixture binds it)
    for source in (tiny.policy, tiny.reward, *tiny.prompts):
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, volume / "tiny" / source.name)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "IterativeDPORun", "metadata": {"name": "real"},
        "spec": {
            "iterations": 2,
            "policy": {"model": "/iterdpo/tiny/policy"},
            "prompts": {"perIteration": [{"dataset": f"/iterdpo/tiny/{p.name}"} for p in tiny.prompts[:2]]},
            "generation": {"samplesPerPrompt": 8, "maxNewTokens": 24, "shards": 2, "gpuMemoryUtilization": 0.1, "enforceEager": True},
            "reward": {"model": "/iterdpo/tiny/reward", "maxLength": 256, "batchTokens": 8192, "startupTimeoutSeconds": 120},
            "training": {"learningRate": 5e-3, "epochs": 2, "scheduler": "constant", "warmupRatio": 0.0, "globalBatchSize": 16,
                         "microBatchSize": 4, "nprocPerNode": 2, "maxLength": 128, "maxPromptLength": 48, "zeroStage": 2,
                         "precision": "fp32", "gradientCheckpointing": False},
            "kubernetes": {"volume": {"claimName": "iterdpo-data"}, "launcher": "pytorchjob", "stageRetries": 0,
                           "resources": {s: {"gpus": 0} for s in ("generate", "reward", "annotate", "train")}},
        },
    }  # fmt: skip
    api = client.CustomObjectsApi(control_plane.api_client)
    api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    def finished():
        operator.check_alive()
        return (api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "real").get("status") or {}).get("phase") in ("Succeeded", "Failed")

    try:
        wait_for("run real finished", finished, control_plane, timeout=900, interval=2)
    finally:
        print(json.dumps(api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "real").get("status"), indent=1))
    status = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "real")["status"]
    assert status["phase"] == "Succeeded", _logs(local_exec, ns)

    first, second = status["iterations"]
    for it in (first, second):
        assert it["generation"]["samples"] == 8 * it["generation"]["prompts"]
        assert it["scoring"]["pairs"] + it["scoring"]["tiesDropped"] + it["scoring"]["promptsLeftOut"] == it["generation"]["prompts"]
        assert it["training"]["checkpoint"].startswith("/iterdpo/runs/real/")
    assert second["policy"] == first["training"]["checkpoint"]  # round 2 generated with round 1's policy
    assert second["scoring"]["meanReward"] > first["scoring"]["meanReward"]  # DPO on the tiny RM's pairs helps
    # the artifacts are on the volume, where the pods wrote them
    checkpoint = volume / "runs" / "real" / "iter-02" / "train" / "policy"
    assert (checkpoint / "config.json").exists() and (volume / "runs" / "real" / "iter-01" / "score" / "stats.json").exists()
    pods = client.CoreV1Api(control_plane.api_client).list_namespaced_pod(ns).items
    assert pods and {p.spec.node_name for p in pods} == {local_exec.node_name}
    masters = [p for p in pods if (p.metadata.labels or {}).get("training.kubeflow.org/replica-type") == "master"]
    assert len(masters) == 2  # one PyTorchJob master per round, created by Kubeflow's operator


def _logs(local_exec, ns: str) -> str:
    """The tail of every container log of the namespace, for a failure message."""
    out = []
    for log in sorted((local_exec.root / "pods").glob(f"{ns}_*/*.log")):
        out.append(f"--- {log.parent.name}/{log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)
