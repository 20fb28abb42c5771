"""The from-source control plane plus the instant kubelet behave like a cluster for the
things the operator relies on: scheduling GPU pods, Job success/failure/indexing,
Deployments and garbage collection, RBAC, and the Kubeflow CRDs."""

from __future__ import annotations

import base64
import json
import pytest
from clusterutil import wait_for
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster


def job_body(name: str, *, gpus: int = 0, backoff: int = 6, completions: int | None = None, indexed: bool = False) -> dict:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff,
            "completions": completions,
            "parallelism": completions,
            "completionMode": "Indexed" if indexed else "NonIndexed",
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "registry.invalid/none:0", "resources": resources}],
                }
            },
        },
    }


def job_condition(control_plane, ns: str, name: str) -> str | None:
    job = client.BatchV1Api(control_plane.api_client).read_namespaced_job_status(name, ns)
    for c in job.status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return c.type
    return None


def test_kubectl_lists_ready_node_and_applies(control_plane, ns):
    nodes = {n["metadata"]["name"]: n for n in json.loads(control_plane.kubectl("get", "nodes", "-o", "json").stdout)["items"]}
    node = nodes["iterdpo-node-0"]
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    manifest = json.dumps({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": {"k": "v"}})
    control_plane.kubectl("apply", "-n", ns, "-f", "-", input=manifest)
    out = control_plane.kubectl("get", "configmap", "applied", "-n", ns, "-o", "jsonpath={.data.k}").stdout
    assert out == "v"


def test_gpu_job_is_scheduled_and_completes(control_plane, ns):
    batch = client.BatchV1Api(control_plane.api_client)
    batch.create_namespaced_job(ns, job_body("gpu", gpus=1))
    assert wait_for("Job gpu Complete", lambda: job_condition(control_plane, ns, "gpu"), control_plane) == "Complete"
    pods = client.CoreV1Api(control_plane.api_client).list_namespaced_pod(ns, label_selector="job-name=gpu").items
    assert [p.spec.node_name for p in pods] == ["iterdpo-node-0"]
    assert pods[0].status.phase == "Succeeded"


def test_failing_job_fails_after_backoff_limit(control_plane, ns):
    control_plane.kubelet.rule = lambda pod: (1, "boom")
    client.BatchV1Api(control_plane.api_client).create_namespaced_job(ns, job_body("fails", backoff=1))
    assert wait_for("Job fails Failed", lambda: job_condition(control_plane, ns, "fails"), control_plane, timeout=90) == "Failed"
    pods = client.CoreV1Api(control_plane.api_client).list_namespaced_pod(ns, label_selector="job-name=fails").items
    assert len(pods) == 2  # first try + one retry (backoffLimit 1)
    term = pods[0].status.container_statuses[0].state.terminated
    assert (term.exit_code, term.message) == (1, "boom")


def test_indexed_job_annotates_completion_index(control_plane, ns):
    client.BatchV1Api(control_plane.api_client).create_namespaced_job(ns, job_body("idx", completions=3, indexed=True))
    assert wait_for("Job idx Complete", lambda: job_condition(control_plane, ns, "idx"), control_plane) == "Complete"
    pods = client.CoreV1Api(control_plane.api_client).list_namespaced_pod(ns, label_selector="job-name=idx").items
    indexes = sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1", "2"]


def _deployment(name: str) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="main", image="registry.invalid/none:0")]),
            ),
        ),
    )


def _available(apps, ns, name) -> bool:
    dep = apps.read_namespaced_deployment_status(name, ns)
    return any(c.type == "Available" and c.status == "True" for c in dep.status.conditions or []) and dep.status.available_replicas == 2


def test_deployment_becomes_available(control_plane, ns):
    apps = client.AppsV1Api(control_plane.api_client)
    apps.create_namespaced_deployment(ns, _deployment("web"))
    wait_for("Deployment web Available", lambda: _available(apps, ns, "web"), control_plane)


def test_deleting_deployment_collects_replicaset(control_plane, ns):
    apps = client.AppsV1Api(control_plane.api_client)
    core = client.CoreV1Api(control_plane.api_client)
    apps.create_namespaced_deployment(ns, _deployment("gc"))
    wait_for("ReplicaSet of gc", lambda: apps.list_namespaced_replica_set(ns).items, control_plane)
    wait_for("pods of gc", lambda: len(core.list_namespaced_pod(ns).items) == 2, control_plane)
    apps.delete_namespaced_deployment("gc", ns)  # default propagation: background (garbage collector)
    wait_for("ReplicaSet garbage-collected", lambda: not apps.list_namespaced_replica_set(ns).items, control_plane)
    wait_for("pods garbage-collected", lambda: not core.list_namespaced_pod(ns).items, control_plane)


def test_rbac_denies_then_allows_service_account(control_plane, ns):
    core = client.CoreV1Api(control_plane.api_client)
    rbac = client.RbacAuthorizationV1Api(control_plane.api_client)
    core.create_namespaced_service_account(ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="bot")))
    tr = core.create_namespaced_service_account_token(
        "bot", ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600))
    )
    cfg = client.Configuration()
    cfg.host = control_plane.control_plane.server
    cfg.verify_ssl = False
    cfg.api_key = {"authorization": f"Bearer {tr.status.token}"}
    with client.ApiClient(cfg) as bot_client:
        bot = client.CoreV1Api(bot_client)
        cm = lambda n: client.V1ConfigMap(metadata=client.V1ObjectMeta(name=n))  # noqa: E731
        with pytest.raises(ApiException) as denied:
            bot.create_namespaced_config_map(ns, cm("denied"))
        assert denied.value.status == 403
        rbac.create_namespaced_role(ns, client.V1Role(
            metadata=client.V1ObjectMeta(name="cm-writer"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["create", "get"])]))  # fmt: skip
        rbac.create_namespaced_role_binding(ns, client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="bot-cm-writer"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="cm-writer"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="bot", namespace=ns)]))  # fmt: skip

        def allowed():  # the RBAC authorizer's informer catches up within a moment
            try:
                return bot.create_namespaced_config_map(ns, cm("allowed"))
            except ApiException as e:
                if e.status == 403:
                    return None
                raise

        wait_for("bot allowed to create a ConfigMap", allowed, control_plane, timeout=20)
    claims = json.loads(base64.urlsafe_b64decode(tr.status.token.split(".")[1] + "=="))
    assert claims["sub"] == f"system:serviceaccount:{ns}:bot"


def test_kubeflow_pytorchjob_crd_installed(control_plane):
    out = control_plane.kubectl("get", "crd", "pytorchjobs.kubeflow.org", "-o", "jsonpath={.status.conditions[?(@.type=='Established')].status}")
    assert out.stdout == "True"


def _pytorchjob(name: str, workers: int) -> dict:
    template = {"spec": {"containers": [{"name": "pytorch", "image": "registry.invalid/none:0", "command": ["torchrun"]}]}}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if workers:
        replicas["Worker"] = {"replicas": workers, "restartPolicy": "Never", "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
            "spec": {"nprocPerNode": "2", "pytorchReplicaSpecs": replicas}}  # fmt: skip


def _pytorchjob_state(control_plane, ns: str, name: str) -> str | None:
    obj = client.CustomObjectsApi(control_plane.api_client).get_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", name)
    true = {c["type"] for c in (obj.get("status") or {}).get("conditions") or [] if c["status"] == "True"}
    return "Succeeded" if "Succeeded" in true else "Failed" if "Failed" in true else None


def test_kubeflow_training_operator_runs_a_pytorchjob(control_plane, ns):
    """The real training operator (v1.8.1, built from its Go module) creates the master and
    worker pods with torchrun's rendezvous env, and the job succeeds with its master."""
    client.CustomObjectsApi(control_plane.api_client).create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", _pytorchjob("pt", workers=1))
    assert wait_for("PyTorchJob pt done", lambda: _pytorchjob_state(control_plane, ns, "pt"), control_plane) == "Succeeded"
    pods = {p.metadata.labels["training.kubeflow.org/replica-type"]: p
            for p in client.CoreV1Api(control_plane.api_client).list_namespaced_pod(ns).items}  # fmt: skip
    assert sorted(pods) == ["master", "worker"]
    env = {r: {e.name: e.value for e in p.spec.containers[0].env or []} for r, p in pods.items()}
    assert env["master"]["PET_MASTER_ADDR"] == "pt-master-0" and env["master"]["PET_NNODES"] == "2"
    assert (env["master"]["PET_NODE_RANK"], env["worker"]["PET_NODE_RANK"]) == ("0", "1")
    assert env["master"]["PET_NPROC_PER_NODE"] == "2"
    services = [s.metadata.name for s in client.CoreV1Api(control_plane.api_client).list_namespaced_service(ns).items]
    assert "pt-master-0" in services


def test_kubeflow_pytorchjob_fails_when_its_master_fails(control_plane, ns):
    control_plane.kubelet.rule = lambda pod: (1, "rank 0 crashed")
    client.CustomObjectsApi(control_plane.api_client).create_namespaced_custom_object(
        "kubeflow.org", "v1", ns, "pytorchjobs", _pytorchjob("ptf", workers=0))
    assert wait_for("PyTorchJob ptf done", lambda: _pytorchjob_state(control_plane, ns, "ptf"), control_plane) == "Failed"
