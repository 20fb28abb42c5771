"""A fake kubelet in "instant" mode: one Node, and each pod bound to it runs and exits
at once, with the exit code and termination message a test chooses.

There is no container engine on the project's machines, so this stands in for the node
side: it writes pod status through the pods/status subresource, as a kubelet does, so
the Job, ReplicaSet and Deployment controllers see the usual transitions.

Pods with restartPolicy Always (Deployments) stay Running and Ready. Others go
Running -> Succeeded/Failed per `rule(pod) -> (exit_code, message)`. Pods being deleted
are removed at once (a kubelet's grace-period confirmation).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
from typing import Callable

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

Rule = Callable[[client.V1Pod], "tuple[int, str]"]
NODE = "iterdpo-node-0"
CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8"}


def succeed(pod: client.V1Pod) -> tuple[int, str]:
    return 0, ""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class InstantKubelet:
    """Run with `start()` / `stop()`; set `.rule` to choose how pods exit."""

    def __init__(self, api_client: client.ApiClient, node_name: str = NODE, heartbeat: float = 10.0):
        self.core = client.CoreV1Api(api_client)
        self.node_name = node_name
        self.heartbeat = heartbeat
        self.rule: Rule = succeed
        self.errors: list[str] = []  # status patches that failed, for a test to assert on
        self._handled: set[str] = set()  # pod uids already started
        self._ips = itertools.cycle(range(2, 255))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"kubelet-{node_name}", daemon=True)

    # -- node -------------------------------------------------------------------
    def _ready_condition(self) -> dict:
        now = _now()
        return {"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "instant test kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now}  # fmt: skip

    def register(self) -> None:
        body = client.V1Node(metadata=client.V1ObjectMeta(name=self.node_name, labels={
            "kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}))  # fmt: skip
        try:
            self.core.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
        # The TaintNodesByCondition admission plugin adds node.kubernetes.io/not-ready on
        # create; node-lifecycle (not run here) would lift it once Ready, so lift it here.
        self.core.patch_node(self.node_name, {"spec": {"taints": None}})
        self.core.patch_node_status(self.node_name, {"status": {
            "capacity": CAPACITY, "allocatable": CAPACITY, "conditions": [self._ready_condition()],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {"kubeletVersion": "v1.34.4", "architecture": "amd64", "operatingSystem": "linux",
                         "containerRuntimeVersion": "instant://0", "kernelVersion": "", "osImage": "",
                         "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""}}})  # fmt: skip

    def _beat(self) -> None:
        self.core.patch_node_status(self.node_name, {"status": {"conditions": [self._ready_condition()]}})

    # -- pods -------------------------------------------------------------------
    def _handle(self, pod: client.V1Pod) -> None:
        meta = pod.metadata
        if meta.deletion_timestamp is not None:
            try:
                self.core.delete_namespaced_pod(meta.name, meta.namespace, grace_period_seconds=0)
            except ApiException as e:
                if e.status != 404:
                    self.errors.append(f"delete {meta.namespace}/{meta.name}: {e.status} {e.reason}")
            return
        if meta.uid in self._handled or (pod.status and pod.status.phase in ("Succeeded", "Failed")):
            return
        self._handled.add(meta.uid)
        try:
            self._run(pod)
        except ApiException as e:
            if e.status != 404:
                self.errors.append(f"status {meta.namespace}/{meta.name}: {e.status} {e.body}")
                log.warning("instant kubelet: %s", self.errors[-1])

    def _run(self, pod: client.V1Pod) -> None:
        name, ns, now = pod.metadata.name, pod.metadata.namespace, _now()
        ip = f"127.0.0.{next(self._ips)}"
        cid = lambda c: f"instant://{pod.metadata.uid}/{c.name}"  # noqa: E731

        def cond(ready: str) -> list[dict]:
            return [{"type": t, "status": s, "lastTransitionTime": now} for t, s in
                    (("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", ready), ("Ready", ready))]  # fmt: skip

        running = [{"name": c.name, "image": c.image, "imageID": c.image, "containerID": cid(c),
                    "ready": True, "started": True, "restartCount": 0,
                    "state": {"running": {"startedAt": now}}} for c in pod.spec.containers]  # fmt: skip
        self.core.patch_namespaced_pod_status(name, ns, {"status": {
            "phase": "Running", "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now, "conditions": cond("True"),
            "containerStatuses": running}})  # fmt: skip
        if pod.spec.restart_policy == "Always":
            return
        code, message = self.rule(pod)
        code = int(code)
        terminated = [{"name": c.name, "image": c.image, "imageID": c.image, "containerID": cid(c),
                       "ready": False, "started": False, "restartCount": 0,
                       "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                                "message": message, "startedAt": now, "finishedAt": _now(),
                                                "containerID": cid(c)}}}
                      for c in pod.spec.containers]  # fmt: skip
        self.core.patch_namespaced_pod_status(name, ns, {"status": {
            "phase": "Succeeded" if code == 0 else "Failed", "conditions": cond("False"),
            "containerStatuses": terminated}})  # fmt: skip

    # -- loop -------------------------------------------------------------------
    def _loop(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        last_beat = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_beat > self.heartbeat:
                    self._beat()
                    last_beat = time.monotonic()
                listed = self.core.list_pod_for_all_namespaces(field_selector=selector)
                for pod in listed.items:
                    self._handle(pod)
                w = watch.Watch()
                for event in w.stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                      resource_version=listed.metadata.resource_version,
                                      timeout_seconds=max(1, int(self.heartbeat)), _request_timeout=self.heartbeat + 10):  # fmt: skip
                    if self._stop.is_set():
                        w.stop()
                        break
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._handle(event["object"])
            except Exception as e:  # noqa: BLE001 - keep the node alive across API blips
                if self._stop.is_set():
                    return
                log.warning("instant kubelet loop: %r", e)
                self._stop.wait(0.5)

    def start(self) -> "InstantKubelet":
        self.register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)  # a watch may block up to `heartbeat`; the thread is a daemon
