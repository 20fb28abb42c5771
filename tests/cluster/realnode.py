"""A real node for the test cluster: containerd's CRI plugin with runc and the CNI bridge
(Debian packages), the kubelet and kube-proxy built from the control plane's own Go module,
and CoreDNS built from its module, serving cluster.local. Pods run the images that
images/build.sh built, with their security context enforced by runc. The recipe, and why
each setting is what it is: ../../../shared/REAL_NODE.md.

Addresses: everything listens on ADDRESS, put on `lo` (local to this machine, never its other
interfaces): the API server (the `kubernetes` Service's endpoint), the kubelet (:10250, for
logs and exec) and CoreDNS (:53, the pods' nameserver). Pods get 10.85.0.0/16 on the bridge
`rncni0`, with a route to 10.0.0.0/8 only and no masquerade: they reach each other, Service IPs
(10.96.0.0/24) and ADDRESS, nothing beyond this machine.

Beside the test kubelets: the real node registers with its own control plane (conftest's
`real_cluster`), so the shared control plane's fake nodes never see its pods, and its
Service range differs. kube-proxy's iptables rules match only its Service IPs and node ports.
The kubelet's KUBE-FIREWALL rule drops packets to 127.0.0.0/8 from other sources only; the
local-exec pods' processes talk to each other from 127.0.0.1, so they are unaffected. One real
node runs on a machine at a time (a lock file): the address, bridge and ports are fixed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from controlplane import ControlPlane
from kubernetes import client

from iterdpo.local.processes import free_port, start, stop, tail

ADDRESS = "10.99.0.1"
POD_CIDR = "10.85.0.0/16"  # podman's own network is 10.88.0.0/16
SERVICE_CIDR = "10.96.0.0/24"
BRIDGE = "rncni0"
NODE = "realnode-0"
PAUSE = "localhost/iterdpo-test/pause:3.10"
LOCK = Path("/run/iterdpo-realnode.lock")
IMAGES = Path(__file__).resolve().parent / "images"


class RealNodeError(RuntimeError):
    pass


def _run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise RealNodeError(f"{' '.join(argv)}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return out


def add_lo_address() -> None:
    """ADDRESS on lo (idempotent); a clear error without the right to add it."""
    if ADDRESS in _run("ip", "-o", "addr", "show", "dev", "lo").stdout:
        return
    out = _run("ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo", check=False)
    if out.returncode != 0:
        raise RealNodeError(f"cannot put {ADDRESS} on lo (needs root): {out.stderr.strip()}")


class RealNode:
    """Start with `start()` after its control plane (address ADDRESS, nodes=(NODE,), controllers
    ("*",)); `stop()` removes every pod container, mount, iptables rule and link it made."""

    def __init__(self, cp: ControlPlane, *, bin_dir: Path, coredns_bin: Path, work_dir: Path,
                 image_cache: Path, images: tuple[str, ...], ready_timeout: float = 90.0):  # fmt: skip
        self.cp = cp
        self.bin_dir = Path(bin_dir)
        self.coredns = Path(coredns_bin) / "coredns"
        self.w = Path(work_dir)
        self.image_cache = Path(image_cache)
        self.images = (PAUSE, *images)
        self.ready_timeout = ready_timeout
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.socket = self.w / "containerd" / "containerd.sock"
        self._lock: int | None = None

    # -- helpers -----------------------------------------------------------------
    def log(self, name: str) -> Path:
        return self.w / f"{name}.log"

    def _start(self, name: str, *argv: str) -> subprocess.Popen:
        proc = start(argv, env={"PATH": os.environ["PATH"]}, log_path=self.log(name))
        self.procs.append((name, proc))
        return proc

    def _fail(self, name: str, why: str) -> RealNodeError:
        return RealNodeError(f"{name}: {why}\n--- {self.log(name)} ---\n{tail(self.log(name), 40)}")

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return _run("ctr", "-a", str(self.socket), "-n", "k8s.io", *args, **kw)

    def _until(self, name: str, proc: subprocess.Popen, what: str, check) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not check():
            if proc.poll() is not None:
                raise self._fail(name, f"exited with code {proc.returncode} before {what}")
            if time.monotonic() > deadline:
                raise self._fail(name, f"not {what} after {self.ready_timeout:.0f}s")
            time.sleep(0.2)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "RealNode":
        self._lock = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # another session's real node: wait for it
        try:
            add_lo_address()
            self._cleanup_host()  # what a killed earlier session may have left
            self._start_containerd()
            self._import_images()
            self._start_kubelet()
            self._start_kube_proxy()
            self._start_coredns()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_containerd(self) -> None:
        d = self.w / "containerd"
        (self.w / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        d.mkdir(parents=True, exist_ok=True)
        # The image content store persists in the image cache (imports are cached by image id);
        # the state (sockets, running tasks) is this session's.
        root = self.image_cache / "containerd"
        (d / "config.toml").write_text(f"""version = 2
root = "{root}"
state = "{d / 'state'}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  # root lacks CAP_SYS_RESOURCE here: a sandbox's oom_score_adj -998 would make runc's init die
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc') or '/usr/sbin/runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{self.w / 'cni' / 'net.d'}"
    max_conf_num = 1
""")
        (self.w / "cni" / "net.d" / "10-realnode.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "realnode", "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(self.w / "cni" / "ipam"),
                          "ranges": [[{"subnet": POD_CIDR, "gateway": "10.85.0.1"}]],
                          "routes": [{"dst": "10.0.0.0/8"}]}},
                {"type": "loopback"},
                {"type": "portmap", "capabilities": {"portMappings": True}}]}))  # fmt: skip
        proc = self._start("containerd", "containerd", "--config", str(d / "config.toml"))
        self._until("containerd", proc, "serving", lambda: self.ctr("version", check=False).returncode == 0)

    def _import_images(self) -> None:
        """Each podman image into containerd, once per image id (a stamp beside the store)."""
        stamps = self.image_cache / "containerd-imported"
        stamps.mkdir(exist_ok=True)
        listed = self.ctr("images", "ls", "-q").stdout.split()
        for image in self.images:
            image_id = _run(str(IMAGES / "podman"), "image", "inspect", "--format", "{{.Id}}", image).stdout.strip()
            stamp = stamps / image.replace("/", "_").replace(":", "_")
            if image in listed and stamp.is_file() and stamp.read_text() == image_id:
                continue
            archive = self.image_cache / ".import.tar"
            _run(str(IMAGES / "podman"), "save", "--format", "docker-archive", "-o", str(archive), image)
            try:
                self.ctr("images", "import", str(archive))
            finally:
                archive.unlink(missing_ok=True)
            stamp.write_text(image_id)

    def _start_kubelet(self) -> None:
        node_kubeconfig = self.cp.write_kubeconfig(self.w / "node.kubeconfig", f"system:node:{NODE}",
                                                   self.cp.node_tokens[NODE])  # fmt: skip
        (self.w / "resolv.conf").write_text(f"nameserver {ADDRESS}\n")
        config = self.w / "kubelet-config.yaml"
        config.write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://{self.socket}
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
address: {ADDRESS}
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
clusterDomain: cluster.local
clusterDNS: [{ADDRESS}]
resolvConf: {self.w / 'resolv.conf'}
podLogsDir: {self.w / 'pod-logs'}
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}}
registerNode: true
syncFrequency: 10s
""")
        proc = self._start(
            "kubelet", str(self.bin_dir / "kubelet"), "--config", str(config), "--kubeconfig", str(node_kubeconfig),
            "--root-dir", str(self.w / "kubelet"), "--cert-dir", str(self.w / "kubelet" / "pki"),
            "--hostname-override", NODE, "--node-ip", ADDRESS, "--v", "1",
        )  # fmt: skip
        core = client.CoreV1Api(self.cp_api())
        self._until("kubelet", proc, "Ready", lambda: _node_ready(core))

    def _start_kube_proxy(self) -> None:
        proc = self._start(
            "kube-proxy", str(self.bin_dir / "kube-proxy"), "--kubeconfig", str(self.cp.kubeconfig),
            "--hostname-override", NODE, "--cluster-cidr", POD_CIDR, "--proxy-mode", "iptables",
            "--bind-address", ADDRESS, "--healthz-bind-address", f"127.0.0.1:{free_port()}",
            "--metrics-bind-address", f"127.0.0.1:{free_port()}", "--conntrack-max-per-core", "0",
        )  # fmt: skip
        self._until("kube-proxy", proc, "programming Services",
                    lambda: "KUBE-SERVICES" in _run("iptables-save", "-t", "nat").stdout)  # fmt: skip

    def _start_coredns(self) -> None:
        corefile = self.w / "Corefile"
        health, ready = free_port(), free_port()
        corefile.write_text(f""".:53 {{
    bind {ADDRESS}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    cache 5
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.cp.kubeconfig} local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
}}
""")
        proc = self._start("coredns", str(self.coredns), "-conf", str(corefile))
        self._until("coredns", proc, "ready", lambda: _http_ok(f"http://127.0.0.1:{ready}/ready"))

    def cp_api(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.cp.server
        configuration.verify_ssl = False
        configuration.api_key = {"authorization": f"Bearer {self.cp.token}"}
        return client.ApiClient(configuration)

    @property
    def errors(self) -> list[str]:
        """The kubelet's last error lines (klog's E prefix), for a test that times out."""
        lines = tail(self.log("kubelet"), 400).splitlines() if self.log("kubelet").exists() else []
        return [line for line in lines if line.startswith("E")][-10:]

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise self._fail(name, f"exited with code {proc.returncode}")

    def stop(self) -> None:
        """Pods' containers first (killed through containerd: the kubelet's own teardown needs
        the API), then the node's processes in reverse order, then what they left on the host."""
        with contextlib.suppress(Exception):
            if self.socket.exists():
                for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
                    self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        while self.procs:
            _, proc = self.procs.pop()
            stop(proc, grace_seconds=10)
        self._cleanup_host()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def _cleanup_host(self) -> None:
        # container shims of our containerd (its state dir names them) and their processes
        for pid in _run("pgrep", "-f", f"containerd-shim-runc-v2.*{self.w}", check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.w))]  # fmt: skip
        for mount in sorted(mounts, key=len, reverse=True):
            _run("umount", "-l", mount, check=False)
        if (self.bin_dir / "kube-proxy").exists():
            _run(str(self.bin_dir / "kube-proxy"), "--cleanup", check=False)
        _run("ip", "link", "del", BRIDGE, check=False)
        for table in ("filter", "nat", "mangle"):  # the kubelet's chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, ...)
            rules = _run("iptables-save", "-t", table, check=False).stdout.splitlines()
            for rule in rules:
                if rule.startswith("-A ") and " -j KUBE-" in rule and not rule.split()[1].startswith("KUBE-"):
                    _run("iptables", "-t", table, "-D", *shlex.split(rule)[1:], check=False)
            for chain in [r.split()[0][1:] for r in rules if r.startswith(":KUBE-")]:
                _run("iptables", "-t", table, "-F", chain, check=False)
            for chain in [r.split()[0][1:] for r in rules if r.startswith(":KUBE-")]:
                _run("iptables", "-t", table, "-X", chain, check=False)

def _node_ready(core: client.CoreV1Api) -> bool:
    try:
        node = core.read_node(NODE)
    except client.ApiException:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or ())


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
