"""The local-exec test kubelet: each container's command really runs as a local process,
so Kubernetes objects (Jobs, Deployments, PyTorchJobs) drive real work on this machine.

What a pod gets, and how it differs from a real node (docs: tests/cluster/README.md):
- **Image**: ignored. The "image" is this machine: the process gets `base_env` (PATH and
  friends, chosen by the fixture) and must have an explicit `command`.
- **Env**: Kubernetes semantics: `envFrom`, then `env` in order with `$(VAR)` expansion;
  `valueFrom` fieldRef (incl. the Job controller's JOB_COMPLETION_INDEX annotation),
  configMapKeyRef, secretKeyRef; `$(VAR)` in command/args; HOSTNAME, KUBERNETES_SERVICE_*.
- **Image**: this checkout and its venv; kept visible even under a volume mounted above
  them (an emptyDir at /tmp over a checkout in /tmp).
- **Volumes**: each is a host folder, bound at its mountPath inside a private mount
  namespace (mountexec.py): emptyDir (per pod), persistentVolumeClaim (the bound PV's
  hostPath/local path, so pods share it), hostPath, configMap, secret, downwardAPI,
  projected (incl. the service-account token). The termination message file is bound the
  same way. Mount points are created on the host if missing and removed at stop if empty.
- **Network**: each pod's processes run in their own UTS namespace with the pod's host
  name (spec.hostname or the pod name), and a per-pod /etc/hosts maps it to the pod IP, as
  a kubelet's does (torchrun publishes `socket.getfqdn()` as MASTER_ADDR; torch's C++
  rendezvous resolves a PyTorchJob master's own name). Every pod gets its own address
  from a /24 that is made local with an AnyIP route on `lo` (`ip route add local <cidr>
  dev lo table local`), and is put on `lo` while the pod runs (gloo looks up the
  interface of the address the host name resolves to): a process can bind its pod IP,
  any other reaches it, and the real EndpointSlice controller publishes it (it rejects
  127.0.0.0/8). Service names resolve for Python processes through
  podresolver/sitecustomize.py (a stand-in for cluster DNS + kube-proxy).
- **Probes**: httpGet, tcpSocket and exec readiness/liveness probes run; readiness periods
  are capped at 1 s (tests see a ready pod sooner), liveness keeps its real period, so a
  container gets the same periodSeconds x failureThreshold to come up as on a node (capped,
  a reward server starting in 8 s under load was killed at 6 s and crash-looped).
  Restart policies and restartCount behave as on a node (back-off 1-8 s).
- **Logs**: `<root>/pods/<namespace>_<pod>/<container>.log` (no `kubectl logs`).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kubernetes import client
from kubernetes.client.rest import ApiException

from iterdpo.atomic import write_text as write_text_atomic
from iterdpo.local.processes import start as start_process
from iterdpo.local.processes import stop as stop_process
from kubelet import TestKubelet, container_id, now, pod_conditions

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MAX_TERMINATION_MESSAGE = 4096
PROBE_PERIOD_CAP = 1.0
# Every pod sees the Service table here (a bind of its folder: the table is replaced by
# rename, and a pod may mount an emptyDir over /tmp, where the kubelet's files live).
DNS_MOUNT = "/run/iterdpo-localexec"


class PodSetupError(Exception):
    """The pod cannot start here (a volume, env source or command this kubelet cannot provide)."""


class PodAddresses:
    """Pod IPs from a random 10.244.X.0/24 made local by an AnyIP route on `lo` (so a stale pod
    IP is refused at once rather than routed away); each running pod's IP is also on `lo`."""

    def __init__(self) -> None:
        self.cidr = ipaddress.ip_network(f"10.244.{random.randint(1, 250)}.0/24")
        self._free = [str(ip) for ip in list(self.cidr.hosts())[1:]]
        self._held: set[str] = set()
        self._lock = threading.Lock()

    def setup(self) -> None:
        route = ["ip", "route", "add", "local", str(self.cidr), "dev", "lo", "table", "local"]
        proc = subprocess.run(route, capture_output=True, text=True)
        if proc.returncode != 0 and "File exists" not in proc.stderr:
            raise PodSetupError(f"local-exec needs a local route for pod IPs ({' '.join(route)}): {proc.stderr.strip()}")

    def teardown(self) -> None:
        for ip in set(self._held):  # pods not released in time
            self.release(ip)
        subprocess.run(["ip", "route", "del", "local", str(self.cidr), "dev", "lo", "table", "local"], capture_output=True)

    def acquire(self) -> str:
        """A free pod IP, also put on `lo` while the pod runs: as on a node, the address its host
        name resolves to is an interface's (gloo, torch.distributed on CPU, looks that interface up)."""
        with self._lock:
            ip = self._free.pop(0)
            self._held.add(ip)
        proc = subprocess.run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], capture_output=True, text=True)
        if proc.returncode != 0 and "File exists" not in proc.stderr:
            self.release(ip)
            raise PodSetupError(f"ip addr add {ip}/32 dev lo: {proc.stderr.strip()}")
        return ip

    def release(self, ip: str) -> None:
        with self._lock:
            if ip not in self._held:
                return
            self._held.discard(ip)
        subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)
        with self._lock:
            self._free.append(ip)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined names are replaced, `$$` escapes, others stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)  # fmt: skip


def pod_hostname(pod: client.V1Pod) -> str:
    """The pod's host name, as a kubelet picks it: spec.hostname or the pod name, cut to 63
    characters without a trailing '-' or '.'."""
    return (pod.spec.hostname or pod.metadata.name)[:63].rstrip("-.")


def _field(pod: client.V1Pod, path: str) -> str:
    """A downward-API fieldRef of the pod."""
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (getattr(pod.metadata, m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace,
        "metadata.uid": pod.metadata.uid, "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.podIP": pod.status.pod_ip if pod.status else None, "status.hostIP": pod.status.host_ip if pod.status else None,
    }  # fmt: skip
    if path not in simple:
        raise PodSetupError(f"fieldRef {path!r} is not supported by the local-exec kubelet")
    return simple[path] or ""


@dataclass
class Container:
    spec: client.V1Container
    env: dict[str, str]
    argv: list[str]
    log_path: Path
    message_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: str | None = None
    ready: bool = False
    terminated: dict | None = None  # the last terminated state
    last_terminated: dict | None = None
    failures: dict[str, int] = field(default_factory=dict)  # consecutive probe failures by kind
    next_probe: dict[str, float] = field(default_factory=dict)
    restart_at: float | None = None
    exited: bool = False  # the current process's exit has been recorded


class PodWorker(threading.Thread):
    """Runs one pod: set up, start its containers, probe, restart, report, tear down."""

    def __init__(self, kubelet: "LocalExecKubelet", pod: client.V1Pod):
        super().__init__(name=f"pod-{pod.metadata.namespace}/{pod.metadata.name}", daemon=True)
        self.kubelet, self.pod = kubelet, pod
        self.dir = kubelet.root / "pods" / f"{pod.metadata.namespace}_{pod.metadata.name}"
        self.hostname = pod_hostname(pod)
        self.ip: str | None = None
        self.mounts: dict[str, Path] = {}
        self.containers: list[Container] = []
        self.stopping = threading.Event()
        self.started = now()
        self._last: dict | None = None
        self._lock = threading.Lock()

    # -- reporting --------------------------------------------------------------------
    def _container_status(self, c: Container) -> dict:
        cid = container_id(self.pod, c.spec.name, "local")
        if c.proc is not None and c.proc.poll() is None:
            state = {"running": {"startedAt": c.started_at}}
        elif c.terminated is not None:
            state = {"terminated": {**c.terminated, "containerID": cid}}
            if c.restart_at is not None:
                state = {"waiting": {"reason": "CrashLoopBackOff", "message": f"back-off restarting {c.spec.name}"}}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        status = {"name": c.spec.name, "image": c.spec.image, "imageID": c.spec.image, "containerID": cid,
                  "ready": c.ready, "started": "running" in state, "restartCount": c.restarts, "state": state}  # fmt: skip
        if c.last_terminated is not None:
            status["lastState"] = {"terminated": c.last_terminated}
        return status

    def publish(self, phase: str | None = None, *, reason: str | None = None, message: str | None = None) -> None:
        with self._lock:
            statuses = [self._container_status(c) for c in self.containers]
            ready = bool(self.containers) and all(c.ready for c in self.containers) and phase is None
            if phase is None:
                phase = "Running" if statuses else "Pending"
            status = {"phase": phase, "hostIP": self.kubelet.node_ip, "hostIPs": [{"ip": self.kubelet.node_ip}],
                      "startTime": self.started, "conditions": pod_conditions(ready, self.started),
                      "containerStatuses": statuses, "reason": reason, "message": message}  # fmt: skip
            if self.ip:
                status.update(podIP=self.ip, podIPs=[{"ip": self.ip}])
            if status == self._last:
                return
            self._last = status
        self.kubelet.patch_status(self.pod, status)

    # -- set-up ----------------------------------------------------------------------
    def _read(self, kind: str, name: str, optional: bool | None) -> dict[str, str] | None:
        """The data of a ConfigMap or Secret (Secret values decoded), or None if optional and absent."""
        core, ns = self.kubelet.core, self.pod.metadata.namespace
        try:
            if kind == "configMap":
                return dict(core.read_namespaced_config_map(name, ns).data or {})
            data = core.read_namespaced_secret(name, ns).data or {}
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        except ApiException as e:
            if e.status == 404 and optional:
                return None
            raise PodSetupError(f"{kind} {ns}/{name}: {e.status} {e.reason}") from e

    def _write_items(self, folder: Path, data: dict[str, str], items) -> None:
        chosen = [(i.key, i.path) for i in items] if items else [(k, k) for k in data]
        for key, rel in chosen:
            if key not in data:
                raise PodSetupError(f"key {key!r} not found")
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[key])

    def _projected(self, folder: Path, source) -> None:
        if source.config_map is not None:
            data = self._read("configMap", source.config_map.name, source.config_map.optional)
            if data is not None:
                self._write_items(folder, data, source.config_map.items)
        elif source.secret is not None:
            data = self._read("secret", source.secret.name, source.secret.optional)
            if data is not None:
                self._write_items(folder, data, source.secret.items)
        elif source.downward_api is not None:
            self._downward(folder, source.downward_api.items)
        elif source.service_account_token is not None:
            sat = source.service_account_token
            request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
                audiences=[sat.audience] if sat.audience else [], expiration_seconds=sat.expiration_seconds or 3600,
                bound_object_ref=client.V1BoundObjectReference(kind="Pod", api_version="v1",
                                                               name=self.pod.metadata.name, uid=self.pod.metadata.uid)))  # fmt: skip
            token = self.kubelet.core.create_namespaced_service_account_token(
                self.pod.spec.service_account_name or "default", self.pod.metadata.namespace, request)
            (folder / sat.path).write_text(token.status.token)
        else:
            raise PodSetupError("projected source not supported by the local-exec kubelet")

    def _downward(self, folder: Path, items) -> None:
        for item in items or []:
            if item.field_ref is None:
                raise PodSetupError(f"downwardAPI item {item.path!r}: only fieldRef is supported")
            target = folder / item.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_field(self.pod, item.field_ref.field_path))

    def _volume(self, v: client.V1Volume) -> Path:
        folder = self.dir / "volumes" / v.name
        if v.persistent_volume_claim is not None:
            return self.kubelet.claim_path(self.pod.metadata.namespace, v.persistent_volume_claim.claim_name)
        if v.host_path is not None:
            path = Path(v.host_path.path)
            if v.host_path.type in (None, "", "DirectoryOrCreate"):
                path.mkdir(parents=True, exist_ok=True)
            return path
        folder.mkdir(parents=True, exist_ok=True)
        if v.empty_dir is not None:
            return folder
        if v.config_map is not None or v.secret is not None:
            kind = "configMap" if v.config_map is not None else "secret"
            src = v.config_map if v.config_map is not None else v.secret
            data = self._read(kind, src.name if kind == "configMap" else src.secret_name, src.optional)
            if data is not None:
                self._write_items(folder, data, src.items)
            return folder
        if v.downward_api is not None:
            self._downward(folder, v.downward_api.items)
            return folder
        if v.projected is not None:
            for source in v.projected.sources or []:
                self._projected(folder, source)
            return folder
        raise PodSetupError(f"volume {v.name!r}: this type is not supported by the local-exec kubelet")

    def _env(self, spec: client.V1Container) -> dict[str, str]:
        env = dict(self.kubelet.base_env)
        env.update(HOSTNAME=self.hostname, **self.kubelet.service_env(self.pod.metadata.namespace))
        for source in spec.env_from or []:
            ref = source.config_map_ref or source.secret_ref
            kind = "configMap" if source.config_map_ref is not None else "secret"
            data = self._read(kind, ref.name, ref.optional) or {}
            env.update({f"{source.prefix or ''}{k}": v for k, v in data.items()})
        for var in spec.env or []:
            if var.value_from is None:
                env[var.name] = _expand(var.value or "", env)
                continue
            vf = var.value_from
            if vf.field_ref is not None:
                env[var.name] = _field(self.pod, vf.field_ref.field_path)
            elif vf.config_map_key_ref is not None or vf.secret_key_ref is not None:
                kind = "configMap" if vf.config_map_key_ref is not None else "secret"
                ref = vf.config_map_key_ref or vf.secret_key_ref
                data = self._read(kind, ref.name, ref.optional)
                if data is not None and ref.key in data:
                    env[var.name] = data[ref.key]
                elif not ref.optional:
                    raise PodSetupError(f"env {var.name}: key {ref.key!r} not in {kind} {ref.name!r}")
            elif vf.resource_field_ref is not None:
                kind, _, name = vf.resource_field_ref.resource.partition(".")  # e.g. limits.cpu
                value = (getattr(spec.resources, kind, None) or {}).get(name) if spec.resources else None
                if value is None:
                    raise PodSetupError(f"env {var.name}: resourceFieldRef {vf.resource_field_ref.resource!r} is not set in "
                                        "the container's resources (this kubelet has no node allocatable to fall back on)")  # fmt: skip
                env[var.name] = str(value)
            else:
                raise PodSetupError(f"env {var.name}: valueFrom source not supported")
        return env

    def _container(self, spec: client.V1Container) -> Container:
        if not spec.command:
            raise PodSetupError(f"container {spec.name!r} has no command; the local-exec kubelet runs no images")
        env = self._env(spec)
        argv = [_expand(a, env) for a in [*spec.command, *(spec.args or [])]]
        return Container(spec, env, argv, self.dir / f"{spec.name}.log", self.dir / f"{spec.name}.termination-log")

    def _hosts_file(self) -> Path:
        """The pod's /etc/hosts, as a kubelet writes it: its own hostname -> its pod IP, plus hostAliases."""
        spec, ns, hostname = self.pod.spec, self.pod.metadata.namespace, self.hostname
        names = [hostname] + ([f"{hostname}.{spec.subdomain}.{ns}.svc.cluster.local"] if spec.subdomain else [])
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{self.ip}\t{' '.join(names)}"]
        lines += [f"{a.ip}\t{' '.join(a.hostnames or [])}" for a in spec.host_aliases or []]
        path = self.dir / "hosts"
        path.write_text("\n".join(lines) + "\n")
        return path

    def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ip = self.kubelet.addresses.acquire()
        self.pod.status.pod_ip = self.ip  # for status.podIP fieldRefs
        self.hosts = self._hosts_file()
        self.mounts = {v.name: self._volume(v) for v in self.pod.spec.volumes or []}
        self.containers = [self._container(c) for c in self.pod.spec.containers]

    # -- processes -------------------------------------------------------------------
    def _launch(self, c: Container) -> None:
        binds = []
        for m in c.spec.volume_mounts or []:
            if m.name not in self.mounts:
                raise PodSetupError(f"volumeMount {m.name!r} names no volume of the pod")
            source = self.mounts[m.name] / (m.sub_path or "")
            source.mkdir(parents=True, exist_ok=True) if not source.exists() else None
            self.kubelet.mount_point(m.mount_path, is_file=source.is_file())
            binds.append([str(source), m.mount_path, bool(m.read_only)])
        # The "image" (this checkout and its venv) must stay visible under a volume mounted
        # above it, as an image's files would: e.g. an emptyDir at /tmp over a clone in /tmp.
        targets = [PurePosixPath(m.mount_path) for m in c.spec.volume_mounts or []]
        for path in self.kubelet.image_paths:
            if any(PurePosixPath(path).is_relative_to(t) for t in targets):
                binds.append([str(path), str(path), True])
        binds.append([str(self.hosts), "/etc/hosts", True])
        self.kubelet.mount_point(DNS_MOUNT, is_file=False)
        binds.append([str(self.kubelet.services.path.parent), DNS_MOUNT, True])
        c.message_path.write_text("")
        message_target = c.spec.termination_message_path or "/dev/termination-log"
        self.kubelet.mount_point(message_target, is_file=True)
        binds.append([str(c.message_path), message_target, False])
        plan = self.dir / f"{c.spec.name}.plan.json"
        plan.write_text(json.dumps({"mounts": binds, "hostname": self.hostname, "workingDir": c.spec.working_dir,
                                    "argv": c.argv, "env": c.env}))  # fmt: skip
        argv = ("unshare", "--mount", "--uts", "--propagation", "private", "--",
                sys.executable, str(HERE / "mountexec.py"), str(plan))  # fmt: skip
        c.proc = start_process(argv, env={"PATH": os.environ.get("PATH", os.defpath)}, log_path=c.log_path, inherit_env=False)
        c.started_at, c.ready, c.restart_at, c.exited = now(), False, None, False
        c.failures.clear()
        c.next_probe.clear()

    def _finished(self, c: Container) -> None:
        c.exited = True
        code = c.proc.returncode
        code = 128 - code if code < 0 else code  # killed by a signal, as a runtime reports it
        message = c.message_path.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        if not message and code != 0 and c.spec.termination_message_policy == "FallbackToLogsOnError":
            message = "\n".join(c.log_path.read_text(errors="replace").splitlines()[-80:])[-2048:]
        if c.terminated is not None:
            c.last_terminated = c.terminated
        c.terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                        "startedAt": c.started_at, "finishedAt": now()}  # fmt: skip
        c.ready = False
        policy = self.pod.spec.restart_policy or "Always"
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            c.restarts += 1
            c.restart_at = time.monotonic() + min(8.0, 2.0 ** (c.restarts - 1))

    def _probe_ok(self, c: Container, probe: client.V1Probe) -> bool:
        timeout = probe.timeout_seconds or 1
        if probe.http_get is not None:
            port = self._port(c, probe.http_get.port)
            url = f"http://{probe.http_get.host or self.ip}:{port}{probe.http_get.path or '/'}"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    return 200 <= resp.status < 400
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False
        if probe.tcp_socket is not None:
            try:
                socket.create_connection((probe.tcp_socket.host or self.ip, self._port(c, probe.tcp_socket.port)), timeout).close()
                return True
            except OSError:
                return False
        if probe._exec is not None:
            try:
                return subprocess.run(probe._exec.command, env=c.env, capture_output=True, timeout=timeout).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                return False
        return True

    @staticmethod
    def _port(c: Container, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.ports or []:
            if p.name == port:
                return p.container_port
        raise PodSetupError(f"probe names port {port!r}, which container {c.spec.name!r} does not declare")

    def _probe(self, c: Container) -> None:
        t = time.monotonic()
        for kind, probe in (("readiness", c.spec.readiness_probe), ("liveness", c.spec.liveness_probe)):
            if probe is None:
                if kind == "readiness":
                    c.ready = True
                continue
            due = c.next_probe.setdefault(kind, t + (probe.initial_delay_seconds or 0))
            if t < due:
                continue
            period = probe.period_seconds or 10
            c.next_probe[kind] = t + (min(PROBE_PERIOD_CAP, period) if kind == "readiness" else period)
            ok = self._probe_ok(c, probe)
            c.failures[kind] = 0 if ok else c.failures.get(kind, 0) + 1
            if kind == "readiness":
                if ok and c.failures[kind] == 0:
                    c.ready = True
                elif c.failures[kind] >= (probe.failure_threshold or 3):
                    c.ready = False
            elif not ok and c.failures[kind] >= (probe.failure_threshold or 3):
                log.warning("liveness probe of %s failed %d times: restarting", c.spec.name, c.failures[kind])
                stop_process(c.proc, grace_seconds=self._grace())

    def _grace(self) -> float:
        return float(min(self.pod.spec.termination_grace_period_seconds or 30, 10))

    def run(self) -> None:
        try:
            self.setup()
            for c in self.containers:
                self._launch(c)
        except (PodSetupError, ApiException, OSError) as e:
            self.publish("Failed", reason="LocalExecSetupFailed", message=str(e))
            self._release()
            return
        self.publish()
        while not self.stopping.is_set():
            for c in self.containers:
                if c.proc.poll() is None:
                    self._probe(c)
                elif not c.exited:
                    self._finished(c)
                elif c.restart_at is not None and time.monotonic() >= c.restart_at:
                    self._launch(c)
            if all(c.exited and c.restart_at is None for c in self.containers):
                failed = any(c.terminated["exitCode"] != 0 for c in self.containers)
                self.publish("Failed" if failed else "Succeeded")
                break
            self.publish()
            self.stopping.wait(0.2)
        self._release()

    def kill(self) -> None:
        self.stopping.set()
        for c in self.containers:
            if c.proc is not None:
                stop_process(c.proc, grace_seconds=self._grace())
        self.join(timeout=5)

    def _release(self) -> None:
        if self.ip is not None:
            self.kubelet.addresses.release(self.ip)
            self.ip = None


class ServiceTable(threading.Thread):
    """Keeps `<root>/services.json` (name.namespace -> ready endpoint IPs and port map)
    in step with the API's Services and EndpointSlices, for podresolver/sitecustomize.py."""

    def __init__(self, api_client: client.ApiClient, path: Path, interval: float = 0.5):
        super().__init__(name="service-table", daemon=True)
        self.core, self.discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
        self.path, self.interval = path, interval
        self.stopping = threading.Event()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("{}")

    def snapshot(self) -> dict:
        table: dict[str, dict] = {}
        slices: dict[str, list] = {}
        for s in self.discovery.list_endpoint_slice_for_all_namespaces().items:
            owner = (s.metadata.labels or {}).get("kubernetes.io/service-name")
            if owner:
                slices.setdefault(f"{owner}.{s.metadata.namespace}", []).append(s)
        for svc in self.core.list_service_for_all_namespaces().items:
            key = f"{svc.metadata.name}.{svc.metadata.namespace}"
            ips, by_name = [], {}
            for s in slices.get(key, []):
                ips += [a for e in s.endpoints or [] if e.conditions is None or e.conditions.ready for a in e.addresses]
                by_name.update({p.name or "": p.port for p in s.ports or []})
            ports = {str(p.port): by_name.get(p.name or "", p.port) for p in svc.spec.ports or []}
            table[key] = {"ips": sorted(set(ips)), "ports": ports}
        return table

    def run(self) -> None:
        last = None
        while not self.stopping.is_set():
            try:
                text = json.dumps(self.snapshot(), sort_keys=True)
                if text != last:
                    write_text_atomic(self.path, text)
                    last = text
            except Exception as e:  # noqa: BLE001 - keep the table alive across API blips
                log.warning("service table: %r", e)
            self.stopping.wait(self.interval)


class LocalExecKubelet(TestKubelet):
    """Runs pods bound to its node as local processes (see the module docstring)."""

    runtime = "local"

    def __init__(self, api_client: client.ApiClient, node_name: str, root: Path, *, base_env: dict[str, str],
                 image_paths: tuple[Path, ...] = (HERE.parents[1], Path(sys.prefix)), **kwargs):  # fmt: skip
        """`image_paths`: what stands in for the container image (this checkout, its venv)."""
        super().__init__(api_client, node_name, **kwargs)
        self.root = Path(root)
        self.image_paths = tuple(Path(p).resolve() for p in image_paths)
        self.base_env = dict(base_env)
        self.addresses = PodAddresses()
        self.services = ServiceTable(api_client, self.root / "dns" / "services.json")
        self.base_env.update(
            PYTHONPATH=os.pathsep.join(filter(None, [str(HERE / "podresolver"), base_env.get("PYTHONPATH")])),
            LOCALEXEC_SERVICES=f"{DNS_MOUNT}/services.json",
        )
        self.workers: dict[str, PodWorker] = {}
        self._mount_points: list[Path] = []
        self._mp_lock = threading.Lock()

    def service_env(self, namespace: str) -> dict[str, str]:
        host, _, port = self.api_client.configuration.host.removeprefix("https://").partition(":")
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port or "443", "LOCALEXEC_NAMESPACE": namespace}

    def claim_path(self, namespace: str, claim: str) -> Path:
        """A PVC's folder: its bound PV's hostPath or local path, else one per claim under root."""
        try:
            pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace)
            if pvc.spec.volume_name:
                pv = self.core.read_persistent_volume(pvc.spec.volume_name)
                source = pv.spec.host_path or pv.spec.local
                if source is not None:
                    Path(source.path).mkdir(parents=True, exist_ok=True)
                    return Path(source.path)
        except ApiException as e:
            if e.status != 404:
                raise
        path = self.root / "claims" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mount_point(self, path: str, *, is_file: bool) -> None:
        """Make a bind target exist on the host; remember what was created, to remove at stop."""
        target = Path(path)
        with self._mp_lock:
            if target.exists():
                return
            missing = target
            while not missing.parent.exists():
                missing = missing.parent
            if is_file:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            else:
                target.mkdir(parents=True, exist_ok=True)
            self._mount_points.append(missing)

    def log_path(self, namespace: str, pod: str, container: str) -> Path:
        return self.root / "pods" / f"{namespace}_{pod}" / f"{container}.log"

    def _admit(self, pod: client.V1Pod) -> None:
        worker = PodWorker(self, pod)
        self.workers[pod.metadata.uid] = worker
        worker.start()

    def _evict(self, pod: client.V1Pod) -> None:
        worker = self.workers.pop(pod.metadata.uid, None)
        if worker is not None:
            worker.kill()

    def start(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.addresses.setup()
        self.services.start()
        return super().start()

    def stop(self) -> None:
        super().stop()
        for worker in list(self.workers.values()):
            worker.kill()
        self.services.stopping.set()
        self.addresses.teardown()
        for path in reversed(self._mount_points):
            _remove_if_empty(path)


def _remove_if_empty(path: Path) -> None:
    """Remove a mount point tree this kubelet made, unless something wrote into it."""
    try:
        if path.is_dir():
            for child in path.iterdir():
                _remove_if_empty(child)
            path.rmdir()
        elif path.stat().st_size == 0:
            path.unlink()
    except OSError:
        pass  # not empty: leave it
