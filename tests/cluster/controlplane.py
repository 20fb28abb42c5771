"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) on loopback, for tests that need real API semantics (RBAC, Jobs,
garbage collection, CRDs) without a container engine or a kubelet.

Processes are started with `iterdpo.local.processes.start`: each in its own process
group and with PR_SET_PDEATHSIG, so none outlives the test session even if pytest is
killed. They are stopped in reverse start order.
"""

from __future__ import annotations

import os
import secrets
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from iterdpo.local.processes import free_port, start, stop, tail

# Controllers the tests rely on. node-lifecycle is left out on purpose: with no real
# kubelet it would taint the fake node unreachable whenever a heartbeat is late.
CONTROLLERS = (
    "job-controller",
    "cronjob-controller",
    "replicaset-controller",
    "deployment-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "persistentvolume-binder-controller",
    "pod-garbage-collector-controller",
    "ttl-after-finished-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "persistentvolumeclaim-protection-controller",  # a claim in use is not deleted; one no pod uses is
    "persistentvolume-protection-controller",
)


class ControlPlaneError(RuntimeError):
    pass


class ControlPlane:
    """Start on `__enter__`, stop on `__exit__`; logs are `<work_dir>/<name>.log`."""

    def __init__(self, bin_dir: Path, work_dir: Path, *, ready_timeout: float = 90.0, address: str = "127.0.0.1",
                 service_cidr: str = "10.0.0.0/24", controllers: tuple[str, ...] = CONTROLLERS,
                 nodes: tuple[str, ...] = ()):  # fmt: skip
        """`address`: where the API server listens and what it advertises (the `kubernetes`
        Service's endpoint: a real node's pods reach it there, realnode.py); `controllers`:
        ("*",) for the default set; `nodes`: kubelet identities, each given a token in group
        system:nodes (the Node authorizer then limits each to its own node's objects)."""
        self.bin_dir = Path(bin_dir)
        self.work_dir = Path(work_dir)
        self.ready_timeout = ready_timeout
        self.address = address
        self.service_cidr = service_cidr
        self.controllers = controllers
        self.token = secrets.token_hex(16)
        self.node_tokens = {node: secrets.token_hex(16) for node in nodes}
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.etcd_port = free_port()
        self.api_port = free_port()
        self.server = f"https://{address}:{self.api_port}"
        self.kubeconfig = self.work_dir / "admin.kubeconfig"
        self.startup_seconds: float | None = None

    # -- helpers --------------------------------------------------------------
    def log(self, name: str) -> Path:
        return self.work_dir / f"{name}.log"

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        proc = start((str(self.bin_dir / name), *args), env={}, log_path=self.log(name))
        self.procs.append((name, proc))
        return proc

    def _fail(self, name: str, why: str) -> ControlPlaneError:
        return ControlPlaneError(f"{name}: {why}\n--- {self.log(name)} ---\n{tail(self.log(name), 40)}")

    def _wait(self, name: str, proc: subprocess.Popen, url: str, *, token: bool) -> None:
        """Poll `url` (https without verification, as the certs are self-signed) until 200."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if proc.poll() is not None:
                raise self._fail(name, f"exited with code {proc.returncode} before {url} was ready")
            try:
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
                pass
            if time.monotonic() > deadline:
                raise self._fail(name, f"{url} not ready after {self.ready_timeout:.0f}s")
            time.sleep(0.2)

    def _write_kubeconfig(self) -> None:
        self.write_kubeconfig(self.kubeconfig, "admin", self.token)

    def write_kubeconfig(self, path: Path, user: str, token: str) -> Path:
        path.write_text(
            f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {self.server}
    insecure-skip-tls-verify: true
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: local
  context: {{cluster: local, user: {user}}}
current-context: local
"""
        )
        os.chmod(path, 0o600)
        return path

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "ControlPlane":
        t0 = time.monotonic()
        w = self.work_dir
        w.mkdir(parents=True, exist_ok=True)
        try:
            self._start_all(w)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start_all(self, w: Path) -> None:
        peer = free_port()
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        etcd = self._start(
            "etcd", "--name", "default", "--data-dir", str(w / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
            "--log-level", "warn",
        )  # fmt: skip
        self._wait("etcd", etcd, f"{etcd_url}/health", token=False)

        sa_key = w / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        nodes = "".join(f"{t},system:node:{n},node-{n},system:nodes\n" for n, t in self.node_tokens.items())
        (w / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n{nodes}")
        os.chmod(w / "tokens.csv", 0o600)
        api = self._start(
            "kube-apiserver", "--etcd-servers", etcd_url,
            "--bind-address", self.address, "--advertise-address", self.address,
            "--secure-port", str(self.api_port), "--cert-dir", str(w / "certs"),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(sa_key),
            "--service-account-signing-key-file", str(sa_key),
            "--authorization-mode", "Node,RBAC" if self.node_tokens else "RBAC",
            "--token-auth-file", str(w / "tokens.csv"),
            "--service-cluster-ip-range", self.service_cidr,
            # logs and exec go to a real node's InternalIP (its Hostname does not resolve here)
            *(("--kubelet-preferred-address-types", "InternalIP") if self.node_tokens else ()),
        )  # fmt: skip
        self._wait("kube-apiserver", api, f"{self.server}/readyz", token=True)
        self._write_kubeconfig()

        self._start(
            "kube-controller-manager", "--kubeconfig", str(self.kubeconfig),
            "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
            "--controllers", ",".join(self.controllers),
            "--service-account-private-key-file", str(sa_key),
            "--root-ca-file", str(w / "certs" / "apiserver.crt"),
            "--use-service-account-credentials=false",
            "--concurrent-job-syncs", "5",
        )  # fmt: skip
        self._start(
            "kube-scheduler", "--kubeconfig", str(self.kubeconfig), "--leader-elect=false",
            "--bind-address", "127.0.0.1", "--secure-port", str(free_port()),
        )  # fmt: skip
        # Both serve /healthz on their secure port without auth for /healthz.
        for name, proc in self.procs[2:]:
            port = proc.args[proc.args.index("--secure-port") + 1]
            self._wait(name, proc, f"https://127.0.0.1:{port}/healthz", token=False)

    def check_alive(self) -> None:
        """Raise with the log tail if any process has died (for a test that times out)."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise self._fail(name, f"exited with code {proc.returncode}")

    def stop(self) -> None:
        while self.procs:
            _, proc = self.procs.pop()
            stop(proc, grace_seconds=10)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
