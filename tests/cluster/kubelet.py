"""Test kubelets: a Node object plus the node side of the pod lifecycle, written through
the pods/status subresource as a real kubelet does, so the Job, ReplicaSet, Deployment and
endpoint controllers see the usual transitions. There is no container engine on the
project's machines; this stands in for one.

`TestKubelet` keeps the Node registered and Ready and hands each pod bound to it to
`_admit` (once) and each pod being deleted to `_evict`. Two modes build on it:

- `InstantKubelet` (this file): each pod runs and exits at once, with the exit code and
  termination message that `rule(pod)` returns; pods with restartPolicy Always
  (Deployments) stay Running and Ready. A pod with an image whose name contains
  MISSING_IMAGE never starts: the kubelet's stand-in reports the pull failure a real kubelet
  reports for an image that does not exist (ErrImagePull, then ImagePullBackOff).
- `LocalExecKubelet` (`localexec.py`): each container's command really runs as a local
  process.
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

Rule = Callable[[client.V1Pod], "tuple[int, str] | None"]  # None: keep the pod running for now
NODE = "iterdpo-node-0"
CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8"}
KUBELET_VERSION = "v1.34.4"
MISSING_IMAGE = "does-not-exist"  # in an image name: the instant kubelet cannot "pull" it
PULL_BACKOFF_SECONDS = 1.0  # ErrImagePull -> ImagePullBackOff (a real kubelet: 10 s, doubling to 5 min)


def succeed(pod: client.V1Pod) -> tuple[int, str]:
    return 0, ""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_conditions(ready: bool, at: str) -> list[dict]:
    status = "True" if ready else "False"
    return [{"type": t, "status": s, "lastTransitionTime": at} for t, s in
            (("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", status), ("Ready", status))]  # fmt: skip


def container_id(pod: client.V1Pod, container: str, runtime: str) -> str:
    return f"{runtime}://{pod.metadata.uid}/{container}"


class TestKubelet:
    """Run with `start()` / `stop()`. Subclasses implement `_admit` and may override `_evict`."""

    runtime = "test"

    def __init__(self, api_client: client.ApiClient, node_name: str = NODE, *, heartbeat: float = 10.0,
                 node_ip: str = "127.0.0.1", unschedulable: bool = False):  # fmt: skip
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.node_name = node_name
        self.node_ip = node_ip
        self.heartbeat = heartbeat
        self.unschedulable = unschedulable
        self.errors: list[str] = []  # API calls that failed, for a test to assert on
        self._admitted: set[str] = set()  # pod uids already handed to _admit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"kubelet-{node_name}", daemon=True)

    # -- node -------------------------------------------------------------------
    def _ready_condition(self) -> dict:
        t = now()
        return {"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": f"{self.runtime} test kubelet", "lastHeartbeatTime": t, "lastTransitionTime": t}  # fmt: skip

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
        self.core.patch_node(self.node_name, {"spec": {"taints": None, "unschedulable": self.unschedulable}})
        self.core.patch_node_status(self.node_name, {"status": {
            "capacity": CAPACITY, "allocatable": CAPACITY, "conditions": [self._ready_condition()],
            "addresses": [{"type": "InternalIP", "address": self.node_ip}, {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "architecture": "amd64", "operatingSystem": "linux",
                         "containerRuntimeVersion": f"{self.runtime}://0", "kernelVersion": "", "osImage": "",
                         "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""}}})  # fmt: skip

    def cordon(self, unschedulable: bool = True) -> None:
        """Mark the node (un)schedulable, so a test can choose which kubelet gets new pods."""
        self.unschedulable = unschedulable
        self.core.patch_node(self.node_name, {"spec": {"unschedulable": unschedulable}})

    def _beat(self) -> None:
        self.core.patch_node_status(self.node_name, {"status": {"conditions": [self._ready_condition()]}})

    # -- pods -------------------------------------------------------------------
    def patch_status(self, pod: client.V1Pod, status: dict) -> None:
        """Write pod status; a pod deleted meanwhile (404) is not an error."""
        try:
            self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
        except ApiException as e:
            if e.status != 404:
                self.errors.append(f"status {pod.metadata.namespace}/{pod.metadata.name}: {e.status} {e.body}")
                log.warning("%s kubelet: %s", self.runtime, self.errors[-1])

    def _handle(self, pod: client.V1Pod) -> None:
        meta = pod.metadata
        if meta.deletion_timestamp is not None:
            self._evict(pod)
            try:
                self.core.delete_namespaced_pod(meta.name, meta.namespace, grace_period_seconds=0)
            except ApiException as e:
                if e.status != 404:
                    self.errors.append(f"delete {meta.namespace}/{meta.name}: {e.status} {e.reason}")
            return
        if meta.uid in self._admitted or (pod.status and pod.status.phase in ("Succeeded", "Failed")):
            return
        self._admitted.add(meta.uid)
        self._admit(pod)

    def _admit(self, pod: client.V1Pod) -> None:
        raise NotImplementedError

    def _evict(self, pod: client.V1Pod) -> None:
        """Stop whatever runs for a pod being deleted (before its object is removed)."""

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
                log.warning("%s kubelet loop: %r", self.runtime, e)
                self._stop.wait(0.5)

    def start(self):
        self.register()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)  # a watch may block up to `heartbeat`; the thread is a daemon


class InstantKubelet(TestKubelet):
    """Each pod runs and exits at once; set `.rule` to choose how. A rule that returns None
    holds the pod Running until `release()` asks the (then current) rule again."""

    runtime = "instant"

    def __init__(self, api_client: client.ApiClient, node_name: str = NODE, **kwargs):
        super().__init__(api_client, node_name, **kwargs)
        self.rule: Rule = succeed
        self._ips = itertools.cycle(range(2, 255))
        self._held: dict[str, client.V1Pod] = {}
        self._held_lock = threading.Lock()

    def release(self) -> None:
        """Ask the rule again for every held pod (still existing or not)."""
        with self._held_lock:
            held, self._held = list(self._held.values()), {}
        for pod in held:
            self._finish(pod)

    def _evict(self, pod: client.V1Pod) -> None:
        with self._held_lock:
            self._held.pop(pod.metadata.uid, None)

    def _admit(self, pod: client.V1Pod) -> None:
        missing = [c for c in pod.spec.containers if MISSING_IMAGE in (c.image or "")]
        if missing:
            self._fail_pull(pod, missing)
            return
        # Instant pods never listen, so their IPs only need to be valid endpoint
        # addresses (the EndpointSlice API rejects loopback ones): TEST-NET-3.
        ip, t = f"203.0.113.{next(self._ips)}", now()
        cid = lambda c: container_id(pod, c.name, self.runtime)  # noqa: E731
        running = [{"name": c.name, "image": c.image, "imageID": c.image, "containerID": cid(c),
                    "ready": True, "started": True, "restartCount": 0,
                    "state": {"running": {"startedAt": t}}} for c in pod.spec.containers]  # fmt: skip
        self.patch_status(pod, {
            "phase": "Running", "hostIP": self.node_ip, "hostIPs": [{"ip": self.node_ip}],
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": t, "conditions": pod_conditions(True, t),
            "containerStatuses": running})  # fmt: skip
        if pod.spec.restart_policy != "Always":
            self._finish(pod)

    def _fail_pull(self, pod: client.V1Pod, missing: list[client.V1Container]) -> None:
        """A stand-in, not a runtime: what a real kubelet (containerd) writes for an image the
        registry does not have. The pod stays Pending with its sandbox up (IPs, startTime); the
        container waits with ErrImagePull, then ImagePullBackOff. A real kubelet goes back to
        ErrImagePull on each retry of the pull; this one stays in ImagePullBackOff."""
        ip, t = f"203.0.113.{next(self._ips)}", now()
        names = [c.name for c in pod.spec.containers]

        def status(reason: str) -> dict:
            def waiting(c: client.V1Container) -> dict:
                if c not in missing:
                    return {"reason": "ContainerCreating"}
                if reason == "ErrImagePull":
                    message = (f'rpc error: code = NotFound desc = failed to pull and unpack image "{c.image}": '
                               f'failed to resolve reference "{c.image}": {c.image}: not found')  # fmt: skip
                else:
                    message = f'Back-off pulling image "{c.image}"'
                return {"reason": reason, "message": message}

            conditions = pod_conditions(False, t)
            for cond in conditions:
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond.update(reason="ContainersNotReady", message=f"containers with unready status: [{' '.join(names)}]")
            return {"phase": "Pending", "hostIP": self.node_ip, "hostIPs": [{"ip": self.node_ip}], "podIP": ip,
                    "podIPs": [{"ip": ip}], "startTime": t, "conditions": conditions,
                    "containerStatuses": [{"name": c.name, "image": c.image, "imageID": "", "ready": False, "started": False,
                                           "restartCount": 0, "state": {"waiting": waiting(c)}}
                                          for c in pod.spec.containers]}  # fmt: skip

        self.patch_status(pod, status("ErrImagePull"))
        backoff = threading.Timer(PULL_BACKOFF_SECONDS, self.patch_status, (pod, status("ImagePullBackOff")))
        backoff.daemon = True
        backoff.start()

    def _finish(self, pod: client.V1Pod) -> None:
        outcome = self.rule(pod)
        if outcome is None:
            with self._held_lock:
                self._held[pod.metadata.uid] = pod
            return
        code, message = int(outcome[0]), outcome[1]
        t = now()
        cid = lambda c: container_id(pod, c.name, self.runtime)  # noqa: E731
        terminated = [{"name": c.name, "image": c.image, "imageID": c.image, "containerID": cid(c),
                       "ready": False, "started": False, "restartCount": 0,
                       "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                                "message": message, "startedAt": t, "finishedAt": now(),
                                                "containerID": cid(c)}}}
                      for c in pod.spec.containers]  # fmt: skip
        self.patch_status(pod, {"phase": "Succeeded" if code == 0 else "Failed",
                                "conditions": pod_conditions(False, t), "containerStatuses": terminated})  # fmt: skip
