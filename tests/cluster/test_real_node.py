"""The real node (realnode.py: kubelet, containerd, runc, CNI, kube-proxy, CoreDNS) running
the built images: what the instant and local-exec kubelets cannot show. A pod's security
context is enforced by runc, a namespace's Pod Security level by the API server, Services
are reached through kube-proxy by their DNS names, and a pod calls the API with its
ServiceAccount token over TLS.
"""

from __future__ import annotations

import pytest
from clusterutil import wait_for
from kubernetes import client
from realnode import NODE
from test_images import DEBIAN, IMAGES

from iterdpo_operator.builders import CONTAINER_SECURITY, POD_SECURITY

pytestmark = pytest.mark.slow


def restricted_pod(name: str, image: str, command: list[str], **spec) -> dict:
    """A pod as the operator makes its stage pods: its security contexts and a /tmp emptyDir."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"restartPolicy": "Never", "securityContext": POD_SECURITY, "automountServiceAccountToken": False,
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never", "command": command,
                                     "securityContext": CONTAINER_SECURITY,
                                     "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
                     "volumes": [{"name": "tmp", "emptyDir": {}}], **spec}}  # fmt: skip


def finished(cluster, ns: str, name: str, timeout: float = 120) -> client.V1Pod:
    core = client.CoreV1Api(cluster.api_client)

    def done():
        pod = core.read_namespaced_pod(name, ns)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return wait_for(f"pod {name} to finish", done, cluster, timeout=timeout)


def logs(cluster, ns: str, name: str) -> list[str]:
    """Through the API server and the kubelet's own server (:10250), as `kubectl logs` reads them."""
    return cluster.kubectl("logs", "-n", ns, name).stdout.splitlines()


def test_the_node_is_ready_untainted_and_the_kubelet_has_only_a_node_identity(real_cluster):
    node = client.CoreV1Api(real_cluster.api_client).read_node(NODE)
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    assert not node.spec.taints  # node-lifecycle lifted the not-ready taint admission put on it
    assert node.status.node_info.container_runtime_version.startswith("containerd://")
    assert node.status.node_info.kubelet_version == "v1.34.4"
    token = real_cluster.control_plane.node_tokens[NODE]
    whoami = real_cluster.kubectl("--token", token, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert whoami.stdout == f"system:node:{NODE}"
    # the Node authorizer: a node reads only what its own pods use
    denied = real_cluster.kubectl("--token", token, "get", "secret", "-n", "kube-system", "x", check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()


def test_a_restricted_pod_runs_the_runtime_image_as_its_user_on_a_read_only_root(real_cluster, real_ns):
    script = ("id -u; touch /tmp/probe && echo tmp-writable; touch /probe 2> /dev/null || echo root-read-only; "
              "touch /opt/iterdpo/probe 2> /dev/null || echo venv-read-only; "
              "python -c 'import torch, vllm, deepspeed; print(\"imports-ok\")' 2> /dev/null | grep -x imports-ok")  # fmt: skip
    client.CoreV1Api(real_cluster.api_client).create_namespaced_pod(
        real_ns, restricted_pod("probe", IMAGES["runtime-cpu"], ["bash", "-c", script]))
    pod = finished(real_cluster, real_ns, "probe", timeout=300)
    assert pod.status.phase == "Succeeded", pod.status
    assert logs(real_cluster, real_ns, "probe") == ["1000", "tmp-writable", "root-read-only", "venv-read-only", "imports-ok"]


def test_run_as_non_root_refuses_an_image_whose_user_is_root(real_cluster, real_ns):
    pod = restricted_pod("root", DEBIAN, ["true"])
    pod["spec"]["securityContext"] = {k: v for k, v in POD_SECURITY.items() if k not in ("runAsUser", "runAsGroup")}
    client.CoreV1Api(real_cluster.api_client).create_namespaced_pod(real_ns, pod)
    core = client.CoreV1Api(real_cluster.api_client)

    def refused():
        statuses = core.read_namespaced_pod("root", real_ns).status.container_statuses or []
        waiting = [s.state.waiting for s in statuses if s.state.waiting]
        return waiting[0] if waiting and waiting[0].reason == "CreateContainerConfigError" else None

    waiting = wait_for("the kubelet to refuse the root image", refused, real_cluster, timeout=60)
    assert "runAsNonRoot" in waiting.message and "root" in waiting.message


def test_the_api_server_refuses_a_pod_the_restricted_level_forbids(real_cluster, real_ns):
    pod = restricted_pod("lax", IMAGES["runtime-cpu"], ["true"])
    pod["spec"]["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": True}
    with pytest.raises(client.ApiException) as refused:
        client.CoreV1Api(real_cluster.api_client).create_namespaced_pod(real_ns, pod)
    assert refused.value.status == 403 and "restricted" in refused.value.body


def test_a_pod_reaches_a_service_by_its_dns_name_and_the_api_with_its_token(real_cluster, real_ns):
    core = client.CoreV1Api(real_cluster.api_client)
    rbac = client.RbacAuthorizationV1Api(real_cluster.api_client)
    server = restricted_pod("web", IMAGES["operator"], ["python", "-m", "http.server", "8080", "--bind", "0.0.0.0"])
    server["spec"]["restartPolicy"] = "Always"
    server["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 1}
    core.create_namespaced_pod(real_ns, server)
    core.create_namespaced_service(real_ns, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})  # fmt: skip
    core.create_namespaced_service_account(real_ns, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(real_ns, {"metadata": {"name": "reader"}, "rules": [
        {"apiGroups": [""], "resources": ["services"], "verbs": ["list"]}]})  # fmt: skip
    rbac.create_namespaced_role_binding(real_ns, {"metadata": {"name": "reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": real_ns}]})  # fmt: skip
    script = f"""
import socket, time, urllib.request
from kubernetes import client, config
for attempt in range(60):  # the Service's endpoints follow the server's readiness
    try:
        status = urllib.request.urlopen("http://web.{real_ns}.svc/", timeout=5).status
        break
    except OSError as e:
        time.sleep(1)
print("web", status, socket.gethostbyname("web.{real_ns}.svc.cluster.local"))
config.load_incluster_config()  # the projected token and ca.crt; TLS verified
print("services", [s.metadata.name for s in client.CoreV1Api().list_namespaced_service("{real_ns}").items])
"""
    caller = restricted_pod("caller", IMAGES["operator"], ["python", "-c", script],
                            serviceAccountName="reader", automountServiceAccountToken=True)  # fmt: skip
    core.create_namespaced_pod(real_ns, caller)
    pod = finished(real_cluster, real_ns, "caller", timeout=180)
    out = logs(real_cluster, real_ns, "caller")
    assert pod.status.phase == "Succeeded", out
    web_ip = core.read_namespaced_service("web", real_ns).spec.cluster_ip
    assert out == [f"web 200 {web_ip}", "services ['web']"]


def test_a_pod_cannot_reach_beyond_the_machine(real_cluster, real_ns):
    """No default route in pods (REAL_NODE.md's CNI): the pods' network ends at this machine."""
    script = ("import socket\ntry:\n socket.create_connection(('1.1.1.1', 80), timeout=3)\n print('reached')\n"
              "except OSError as e:\n print('unreachable')")  # fmt: skip
    client.CoreV1Api(real_cluster.api_client).create_namespaced_pod(
        real_ns, restricted_pod("out", IMAGES["operator"], ["python", "-c", script]))
    finished(real_cluster, real_ns, "out")
    assert logs(real_cluster, real_ns, "out") == ["unreachable"]
