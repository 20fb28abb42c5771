"""The local-exec kubelet runs pods' commands as real local processes: env and the Job's
completion index, volumes (a PVC bound to a hostPath PV, a ConfigMap, emptyDir),
termination messages, exit codes, readiness probes, Services reached by their cluster
DNS name, SIGTERM on delete, and each pod's own host name."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap

import pytest
from clusterutil import bound_claim, wait_for
from kubernetes import client

pytestmark = pytest.mark.cluster
PY = sys.executable


def _job(name: str, script: str, *, completions: int = 1, indexed: bool = False, volumes=(), mounts=(), env=(),
         restart: str = "Never", backoff: int = 0, policy: str = "File") -> dict:  # fmt: skip
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff, "completions": completions, "parallelism": completions,
            "completionMode": "Indexed" if indexed else "NonIndexed",
            "template": {"spec": {
                "restartPolicy": restart, "volumes": list(volumes),
                "containers": [{"name": "main", "image": "python:3.11", "command": [PY, "-c", textwrap.dedent(script)],
                                "env": list(env), "volumeMounts": list(mounts), "terminationMessagePolicy": policy}]}},
        },
    }  # fmt: skip


def _job_state(cluster, ns: str, name: str) -> str | None:
    job = client.BatchV1Api(cluster.api_client).read_namespaced_job_status(name, ns)
    return next((c.type for c in job.status.conditions or [] if c.type in ("Complete", "Failed") and c.status == "True"), None)


def _pods(cluster, ns: str, selector: str) -> list[client.V1Pod]:
    return client.CoreV1Api(cluster.api_client).list_namespaced_pod(ns, label_selector=selector).items


def test_indexed_job_runs_with_env_volumes_and_termination_message(control_plane, local_exec, ns, tmp_path):
    bound_claim(control_plane, ns, tmp_path / "pv")
    core = client.CoreV1Api(control_plane.api_client)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "inputs"}, "data": {"greeting.txt": "hello"}})
    core.create_namespaced_secret(ns, {"metadata": {"name": "token"}, "stringData": {"value": "s3cret"}})
    script = """
        import json, os, pathlib
        index = os.environ["JOB_COMPLETION_INDEX"]
        greeting = pathlib.Path("/etc/inputs/greeting.txt").read_text()
        out = pathlib.Path("/data/out") / f"shard-{index}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"greeting": greeting, "token": os.environ["TOKEN"], "pod": os.environ["POD_NAME"],
                                   "ip": os.environ["POD_IP"], "scratch": os.path.isdir("/scratch")}))
        pathlib.Path("/dev/termination-log").write_text(json.dumps({"shard": int(index)}))
    """
    job = _job("work", script, completions=2, indexed=True,
               volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}},
                        {"name": "inputs", "configMap": {"name": "inputs"}}, {"name": "scratch", "emptyDir": {}}],
               mounts=[{"name": "data", "mountPath": "/data"}, {"name": "inputs", "mountPath": "/etc/inputs", "readOnly": True},
                       {"name": "scratch", "mountPath": "/scratch"}],
               env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "token", "key": "value"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}])  # fmt: skip
    client.BatchV1Api(control_plane.api_client).create_namespaced_job(ns, job)
    assert wait_for("Job work done", lambda: _job_state(control_plane, ns, "work"), control_plane, timeout=90) == "Complete"

    pods = {p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p for p in _pods(control_plane, ns, "job-name=work")}
    assert sorted(pods) == ["0", "1"]
    for index, pod in pods.items():
        assert pod.spec.node_name == local_exec.node_name
        written = json.loads((tmp_path / "pv" / "out" / f"shard-{index}.json").read_text())
        assert written == {"greeting": "hello", "token": "s3cret", "pod": pod.metadata.name, "ip": pod.status.pod_ip, "scratch": True}
        assert not pod.status.pod_ip.startswith("127.")
        terminated = pod.status.container_statuses[0].state.terminated
        assert (terminated.exit_code, json.loads(terminated.message)) == (0, {"shard": int(index)})
    assert not os.path.exists("/data/out")  # the volume was bound in the pod's mount namespace only


def test_failing_container_reports_exit_code_and_log_tail(control_plane, local_exec, ns):
    script = """
        import sys
        print("reading shard 7", flush=True)
        sys.exit("shard 7 is corrupt")
    """
    client.BatchV1Api(control_plane.api_client).create_namespaced_job(ns, _job("bad", script, policy="FallbackToLogsOnError"))
    assert wait_for("Job bad done", lambda: _job_state(control_plane, ns, "bad"), control_plane, timeout=90) == "Failed"
    (pod,) = _pods(control_plane, ns, "job-name=bad")
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1
    assert "shard 7 is corrupt" in terminated.message and "reading shard 7" in terminated.message


def test_service_reached_by_dns_name_once_ready(control_plane, local_exec, ns):
    apps = client.AppsV1Api(control_plane.api_client)
    server = "import http.server, os; http.server.HTTPServer((os.environ['POD_IP'], 8080), http.server.SimpleHTTPRequestHandler).serve_forever()"
    apps.create_namespaced_deployment(ns, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
                     "name": "web", "image": "python:3.11", "command": [PY, "-c", server], "workingDir": "/srv",
                     "ports": [{"name": "http", "containerPort": 8080}],
                     "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                     "volumeMounts": [{"name": "site", "mountPath": "/srv"}],
                     "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}],
                     "volumes": [{"name": "site", "emptyDir": {}}]}}}})  # fmt: skip
    client.CoreV1Api(control_plane.api_client).create_namespaced_service(ns, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})  # fmt: skip

    def available():
        dep = apps.read_namespaced_deployment_status("web", ns)
        return dep.status.available_replicas == 1

    wait_for("Deployment web available", available, control_plane, timeout=60)
    (pod,) = _pods(control_plane, ns, "app=web")
    slices = client.DiscoveryV1Api(control_plane.api_client).list_namespaced_endpoint_slice(ns, label_selector="kubernetes.io/service-name=web").items
    assert [a for s in slices for e in s.endpoints or [] for a in e.addresses] == [pod.status.pod_ip]

    script = f"""
        import pathlib, time, urllib.error, urllib.request
        for _ in range(50):  # as any client of a fresh Service: retry while endpoints propagate
            try:
                with urllib.request.urlopen("http://web.{ns}.svc.cluster.local/", timeout=10) as r:
                    pathlib.Path("/dev/termination-log").write_text(str(r.status))
                    break
            except urllib.error.URLError:
                time.sleep(0.2)
    """
    client.BatchV1Api(control_plane.api_client).create_namespaced_job(ns, _job("client", script))
    assert wait_for("Job client done", lambda: _job_state(control_plane, ns, "client"), control_plane, timeout=60) == "Complete"
    (client_pod,) = _pods(control_plane, ns, "job-name=client")
    assert client_pod.status.container_statuses[0].state.terminated.message == "200"


def test_deleting_a_pod_stops_its_process(control_plane, local_exec, ns, tmp_path):
    core = client.CoreV1Api(control_plane.api_client)
    pid_file = tmp_path / "pid"
    script = f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(600)"
    core.create_namespaced_pod(ns, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                 "containers": [{"name": "main", "image": "python:3.11", "command": [PY, "-c", script]}]}})  # fmt: skip
    wait_for("sleeper running", lambda: pid_file.exists() and pid_file.read_text(), control_plane, timeout=60)
    pid = int(pid_file.read_text())
    core.delete_namespaced_pod("sleeper", ns)
    wait_for("sleeper deleted", lambda: not core.list_namespaced_pod(ns, field_selector="metadata.name=sleeper").items, control_plane)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_image_stays_visible_under_a_volume_mounted_above_it(control_plane, local_exec, ns):
    """An emptyDir mounted above this checkout (as /tmp is above a clone in /tmp) must not hide
    the "image": the venv and the package still run, while the rest of that folder is the emptyDir."""
    from pathlib import Path

    above = Path(__file__).resolve().parents[3]  # the folder holding the checkout
    marker = above / f"written-in-pod-{ns}"
    script = f"""
        import pathlib, iterdpo
        pathlib.Path({str(marker)!r}).write_text("in the emptyDir")
        pathlib.Path("/dev/termination-log").write_text("imported " + iterdpo.__name__)
    """
    job = _job("image", script, volumes=[{"name": "scratch", "emptyDir": {}}], mounts=[{"name": "scratch", "mountPath": str(above)}])
    client.BatchV1Api(control_plane.api_client).create_namespaced_job(ns, job)
    assert wait_for("Job image done", lambda: _job_state(control_plane, ns, "image"), control_plane, timeout=60) == "Complete"
    (pod,) = _pods(control_plane, ns, "job-name=image")
    assert pod.status.container_statuses[0].state.terminated.message == "imported iterdpo"
    assert not marker.exists()  # it went to the emptyDir, not to the host folder


def test_resource_field_refs_come_from_the_containers_resources(control_plane, local_exec, ns):
    core = client.CoreV1Api(control_plane.api_client)
    script = "import os, pathlib; pathlib.Path('/dev/termination-log').write_text(os.environ['CPUS'])"

    def pod(name: str, resources: dict) -> dict:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"restartPolicy": "Never", "containers": [{
            "name": "main", "image": "python:3.11", "command": [PY, "-c", script], "resources": resources,
            "env": [{"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]}]}}  # fmt: skip

    core.create_namespaced_pod(ns, pod("limited", {"limits": {"cpu": "2"}}))
    core.create_namespaced_pod(ns, pod("unlimited", {}))
    phase = lambda n: core.read_namespaced_pod(n, ns).status.phase  # noqa: E731
    wait_for("both pods done", lambda: phase("limited") in ("Succeeded", "Failed") and phase("unlimited") == "Failed", control_plane)
    assert core.read_namespaced_pod("limited", ns).status.container_statuses[0].state.terminated.message == "2"
    unlimited = core.read_namespaced_pod("unlimited", ns).status
    assert unlimited.reason == "LocalExecSetupFailed" and "limits.cpu" in unlimited.message  # never a made-up value


def test_each_pod_has_its_own_host_name_resolving_to_its_ip(control_plane, local_exec, ns, tmp_path):
    """As on a node: `hostname`, socket.gethostname() and $HOSTNAME are spec.hostname or the pod
    name, and socket.getfqdn() (what torchrun publishes as MASTER_ADDR) resolves to the pod IP.
    The pod waits for its exec readiness probe, which runs with the container's env."""
    core = client.CoreV1Api(control_plane.api_client)
    machine = socket.gethostname()
    script = textwrap.dedent("""
        import json, os, pathlib, socket, subprocess, time
        mark = pathlib.Path(os.environ["MARK"])
        while not mark.exists():
            time.sleep(0.1)
        fqdn = socket.getfqdn()
        pathlib.Path("/dev/termination-log").write_text(json.dumps({
            "hostname": subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip(),
            "gethostname": socket.gethostname(), "env": os.environ["HOSTNAME"], "fqdn": fqdn,
            "ip": socket.gethostbyname(fqdn), "probe": mark.read_text()}))
    """)  # fmt: skip

    def pod(name: str, **spec) -> dict:
        probe = "import os, pathlib; pathlib.Path(os.environ['MARK']).write_text(os.environ['HOSTNAME'])"
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {"restartPolicy": "Never", **spec, "containers": [{
            "name": "main", "image": "python:3.11", "command": [PY, "-c", script],
            "env": [{"name": "MARK", "value": str(tmp_path / f"probed-{name}")}],
            "readinessProbe": {"exec": {"command": [PY, "-c", probe]}, "periodSeconds": 1}}]}}  # fmt: skip

    core.create_namespaced_pod(ns, pod("plain"))
    core.create_namespaced_pod(ns, pod("member", hostname="trainer-0", subdomain="workers"))
    phase = lambda n: core.read_namespaced_pod(n, ns).status.phase  # noqa: E731
    wait_for("both pods done", lambda: {phase("plain"), phase("member")} <= {"Succeeded", "Failed"}, control_plane, timeout=60)
    fqdn = f"trainer-0.workers.{ns}.svc.cluster.local"
    for name, hostname, full in (("plain", "plain", "plain"), ("member", "trainer-0", fqdn)):
        status = core.read_namespaced_pod(name, ns).status
        assert status.phase == "Succeeded", local_exec.log_path(ns, name, "main").read_text()
        seen = json.loads(status.container_statuses[0].state.terminated.message)
        assert seen == {"hostname": hostname, "gethostname": hostname, "env": hostname, "fqdn": full,
                        "ip": status.pod_ip, "probe": hostname}  # fmt: skip
    assert socket.gethostname() == machine  # the machine's own name is untouched
