"""The end-to-end run on the real node (realnode.py), as a cluster runs it: `helm install` of
the chart with the built operator image, so the operator runs in its pod as the chart's
ServiceAccount, then a 2-round tiny run in a namespace whose Pod Security level is
"restricted", every stage pod running the built runtime-cpu image with its security
context enforced by runc: Generate in an Indexed Job (2 shards), the reward Deployment
reached through its Service by DNS name with its token, annotate, and DeepSpeed training in
a PyTorchJob's master pod made by Kubeflow's training operator. Then the same run file
through `iterdpo run` on this machine: the figures must be the same.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from clusterutil import bound_claim, wait_for
from kubernetes import client
from realnode import NODE
from test_chart_install import Helm
from test_images import IMAGES, UID
from test_operator_local_exec import GROUP, PLURAL, VERSION, _tiny_run

import helmbin
from iterdpo.atomic import read_json
from iterdpo.local.processes import resolve_executable

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROUNDS, PROMPTS, SAMPLES = 2, 16, 4


def _repository_and_tag(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    return repository, tag


def _pod_logs(cluster, ns: str) -> str:
    """Every container's log tail in `ns`, through `kubectl logs` (the kubelet's own API)."""
    out = []
    for pod in client.CoreV1Api(cluster.api_client).list_namespaced_pod(ns).items:
        for c in pod.spec.containers:
            text = cluster.kubectl("logs", "-n", ns, pod.metadata.name, "-c", c.name, "--tail", "15", check=False)
            out.append(f"--- {pod.metadata.name}/{c.name} ({pod.status.phase})\n{text.stdout}{text.stderr}")
    return "\n".join(out)


def _figures(iteration: dict) -> dict:
    """What must match between the cluster's run and the local one."""
    g, s = iteration["generation"], iteration["scoring"]
    return {"prompts": g["prompts"], "samples": g["samples"], "promptsLeftOut": g["promptsLeftOut"],
            "pairs": s["pairs"], "tiesDropped": s["tiesDropped"], "meanReward": round(s["meanReward"], 3)}  # fmt: skip


def test_the_chart_and_a_two_round_run_on_the_real_node_from_the_built_images(real_cluster, real_ns, tiny,
                                                                              tmp_path):  # fmt: skip
    helm_bin = helmbin.helm_path()
    if helm_bin is None:
        pytest.skip(helmbin.WHY_MISSING)
    ns = real_ns
    volume = tmp_path / "pv"
    (volume / "tiny").mkdir(parents=True)
    spec = {"generation": {"samplesPerPrompt": SAMPLES, "shards": 2, "seed": 7},
            "training": {"epochs": 1, "globalBatchSize": 8}}  # fmt: skip
    body = _tiny_run("e2e", tiny, volume, iterations=ROUNDS, launcher="pytorchjob", max_prompts=PROMPTS, **spec)
    body["spec"]["kubernetes"]["imagePullPolicy"] = "Never"  # the images are in the node's containerd only
    # A hostPath volume keeps its owner (fsGroup changes only volumes that support ownership):
    # the pods' user must own it, as a storage class's provisioner would arrange.
    for path in (volume, *volume.rglob("*")):
        os.chown(path, UID, UID)
    bound_claim(real_cluster, ns, volume, name="iterdpo-data")

    helm = Helm(helm_bin, real_cluster.kubeconfig, tmp_path / "helm")
    operator_repo, operator_tag = _repository_and_tag(IMAGES["operator"])
    stage_repo, stage_tag = _repository_and_tag(IMAGES["runtime-cpu"])
    helm.install("iterdpo", ns, f"watch.namespaces={{{ns}}}", f"operator.image.repository={operator_repo}",
                 f"operator.image.tag={operator_tag}", "operator.image.pullPolicy=Never", "operator.reconcileInterval=1",
                 f"stageDefaults.image.repository={stage_repo}", f"stageDefaults.image.tag={stage_tag}")  # fmt: skip
    apps = client.AppsV1Api(real_cluster.api_client)
    wait_for("the operator Deployment available", lambda: (apps.read_namespaced_deployment("iterdpo", ns).status
                                                           .available_replicas or 0) == 1, real_cluster, timeout=180)  # fmt: skip

    api = client.CustomObjectsApi(real_cluster.api_client)
    api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    def status() -> dict:
        return api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "e2e").get("status") or {}

    try:
        wait_for("run e2e finished", lambda: status().get("phase") in ("Succeeded", "Failed"), real_cluster,
                 timeout=1500, interval=3)  # fmt: skip
    except AssertionError as e:
        raise AssertionError(f"{e}\n{json.dumps(status(), indent=1)}\n{_pod_logs(real_cluster, ns)}") from None
    final = status()
    assert final["phase"] == "Succeeded", f"{json.dumps(final, indent=1)}\n{_pod_logs(real_cluster, ns)}"

    # every pod ran on the real node, from the built images, as the restricted level requires
    pods = client.CoreV1Api(real_cluster.api_client).list_namespaced_pod(ns).items
    images = {c.image for p in pods for c in p.spec.containers}
    assert images == {IMAGES["operator"], IMAGES["runtime-cpu"]}, images
    assert {p.spec.node_name for p in pods} == {NODE}
    assert all(c.state.terminated is None or c.state.terminated.exit_code == 0
               for p in pods for c in p.status.container_statuses or ())  # fmt: skip
    components = {(p.metadata.labels or {}).get("app.kubernetes.io/component") for p in pods}
    assert {"generate", "annotate", "train"} <= components, components  # the reward pods went at scale-down
    reward = client.AppsV1Api(real_cluster.api_client).read_namespaced_deployment("e2e-reward", ns)
    assert reward.spec.replicas == 0 and reward.spec.template.spec.containers[0].image == IMAGES["runtime-cpu"]
    annotate = [c for p in pods if (p.metadata.labels or {}).get("app.kubernetes.io/component") == "annotate"
                for c in p.spec.containers]  # fmt: skip
    assert all(f"http://e2e-reward.{ns}.svc:" in " ".join(c.command + (c.args or [])) for c in annotate)
    masters = [p for p in pods if (p.metadata.labels or {}).get("training.kubeflow.org/replica-type") == "master"]
    assert len(masters) == ROUNDS  # Kubeflow's operator made one master pod per round
    checkpoint = volume / "runs" / "e2e" / f"iter-{ROUNDS:02d}" / "train" / "policy"
    assert (checkpoint / "config.json").stat().st_uid == UID  # written by the pods' user

    # the same spec through `iterdpo run` here (the volume's files by their host paths): the same
    # prompts, samples, pairs and rewards
    local_spec = json.loads(json.dumps(body["spec"]).replace('"/iterdpo/', f'"{volume}/'))
    del local_spec["kubernetes"]
    local = tmp_path / "local.yaml"
    local.write_text(yaml.safe_dump({**body, "metadata": {"name": "e2e"}, "spec": local_spec}))
    workdir = tmp_path / "local-runs"
    ran = subprocess.run([resolve_executable("iterdpo"), "run", str(local), "--workdir", str(workdir)],
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    local_status = read_json(workdir / "e2e" / "status.json")
    cluster_figures = [_figures(it) for it in final["iterations"]]
    local_figures = [_figures(it) for it in local_status["iterations"]]
    print(f"\ncluster {cluster_figures}\nlocal   {local_figures}")
    assert cluster_figures == local_figures
