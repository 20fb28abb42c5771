"""Fixtures for tests against the from-source control plane (see README.md).

Logs are kept when a test fails (or with ITERDPO_KEEP_CLUSTER_LOGS=1).
The binaries take about 8 min to build cold, so the tests skip unless they are already
built (or ITERDPO_CLUSTER_BIN points at them, or ITERDPO_BUILD_CLUSTER=1 asks for a build).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # also under --import-mode=importlib

from clusterutil import bound_claim, exists, wait_for  # noqa: E402
from controlplane import ControlPlane  # noqa: E402
from kubelet import InstantKubelet  # noqa: E402
from kubeflow_operator import TrainingOperator  # noqa: E402
from localexec import LocalExecKubelet, PodSetupError  # noqa: E402

from iterdpo.local.processes import resolve_executable, start, stop, tail  # noqa: E402

BINS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "kubelet", "kube-proxy", "etcd")
_KEPT = pytest.StashKey[Path]()

if TYPE_CHECKING:
    from kubernetes.client import ApiClient
    from realnode import RealNode


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _KEPT in config.stash:
        terminalreporter.write_line(f"cluster logs kept: {config.stash[_KEPT]}")


def _cached_bin_dir() -> Path | None:
    """Mirror build.sh's cache check (versions.env + stamp of the go.mod/go.sum files)
    so that a test run never starts an 8-minute build by surprise."""
    env = dict(
        line.split("=", 1) for line in (HERE / "versions.env").read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    root = Path(os.environ.get("ITERDPO_CLUSTER_CACHE", Path.home() / ".cache" / "iterdpo-cluster"))
    dest = root / f"{env['K8S_VERSION'].strip()}-{env['ETCD_VERSION'].strip()}"
    files = ("go.mod", "go.sum", "etcd/go.mod", "etcd/go.sum", "etcd/main.go")
    stamp = hashlib.sha256(b"".join((HERE / f).read_bytes() for f in files)).hexdigest()[:16]
    try:
        if (dest / "stamp").read_text().strip() != stamp:
            return None
    except FileNotFoundError:
        return None
    return dest / "bin" if all(os.access(dest / "bin" / b, os.X_OK) for b in BINS) else None


def _bin_dir() -> Path | None:
    if os.environ.get("ITERDPO_CLUSTER_BIN"):
        return Path(os.environ["ITERDPO_CLUSTER_BIN"])
    if os.environ.get("ITERDPO_BUILD_CLUSTER") == "1" or _cached_bin_dir() is not None:
        out = subprocess.run([str(HERE / "build.sh")], check=True, stdout=subprocess.PIPE, text=True)
        return Path(out.stdout.strip().splitlines()[-1])
    return None


def _training_operator_bin() -> Path:
    """The Kubeflow training operator v1 binary (kubeflow/build.sh: cached, ~80 s cold)."""
    out = subprocess.run([str(HERE / "kubeflow" / "build.sh")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1]) / "training-operator"


def _wait_established(cluster: "Cluster", timeout: float = 60.0) -> None:
    """Poll until every CRD is Established (`kubectl wait` can fail on a CRD with no status yet)."""
    from kubernetes import client

    ext = client.ApiextensionsV1Api(cluster.api_client)

    def established() -> bool:
        crds = ext.list_custom_resource_definition().items
        return all(any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])) for crd in crds)

    wait_for("CRDs Established", established, cluster, timeout=timeout)


def _start_kubeflow(cluster, work: Path, *crds: Path) -> TrainingOperator:
    """Kubeflow's CRDs (and `crds`) on the cluster, Established, then its training operator."""
    kubeflow = sorted((_shared_dir() / "kubeflow").glob("*.yaml"))
    if not kubeflow:  # never start without them: the PyTorchJob tests would fail far from the cause
        pytest.fail(f"no Kubeflow CRDs in {_shared_dir() / 'kubeflow'}: set ITERDPO_SHARED to the shared/ folder")
    for crd in (*crds, *kubeflow):
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    _wait_established(cluster)
    return TrainingOperator(_training_operator_bin(), cluster.kubeconfig, work).start()


def _shared_dir() -> Path:
    if os.environ.get("ITERDPO_SHARED"):
        return Path(os.environ["ITERDPO_SHARED"])
    return HERE.parents[2] / "shared"  # /work/main/tests/cluster -> /work/shared


LOCAL_NODE = "iterdpo-node-local"
CRD = HERE.parents[1] / "crds" / "iterativedporuns.iterdpo.io.yaml"


def pod_base_env() -> dict[str, str]:
    """What the local-exec kubelet's "image" provides: this venv first on PATH, offline HF."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    home = os.environ.get("HOME", "/root")
    # TORCH_EXTENSIONS_DIR: DeepSpeed's JIT-built CPU ops, as an image would ship them prebuilt
    # (pods get HOME=/tmp, an emptyDir, so they would rebuild them every round otherwise).
    return {"PATH": path, "HOME": home, "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", f"{home}/.cache/torch_extensions")}  # fmt: skip


@dataclass
class Cluster:
    control_plane: ControlPlane
    kubelet: InstantKubelet
    api_client: ApiClient
    kubectl_path: Path
    work_dir: Path
    local: LocalExecKubelet | None = None  # a second node, cordoned unless a test asks for it
    local_unavailable: str = ""  # why `local` is None
    training_operator: TrainingOperator | None = None  # Kubeflow's, reconciling PyTorchJobs

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the built kubectl as admin; on failure raise with its stderr."""
        proc = subprocess.run(
            [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest):
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("control plane binaries not built: run tests/cluster/build.sh (about 8 min cold)")
    from kubernetes import config as kconfig

    work = Path(tempfile.mkdtemp(prefix="iterdpo-cluster-"))
    t0 = time.monotonic()
    with ControlPlane(bin_dir, work) as cp:
        api_client = kconfig.new_client_from_config(config_file=str(cp.kubeconfig))
        kubelet = InstantKubelet(api_client).start()
        cluster = Cluster(cp, kubelet, api_client, bin_dir / "kubectl", work)
        try:
            try:
                cluster.local = LocalExecKubelet(api_client, LOCAL_NODE, work / "local-exec", base_env=pod_base_env(),
                                                 unschedulable=True).start()  # fmt: skip
            except PodSetupError as e:
                cluster.local_unavailable = str(e)
            cluster.training_operator = _start_kubeflow(cluster, work)
            print(f"\ncontrol plane up in {cp.startup_seconds:.1f}s, with node and CRDs {time.monotonic() - t0:.1f}s; logs in {work}")
            yield cluster
        finally:
            if cluster.training_operator is not None:
                cluster.training_operator.stop()
            kubelet.stop()
            if cluster.local is not None:
                cluster.local.stop()
            api_client.close()
    if request.session.testsfailed or os.environ.get("ITERDPO_KEEP_CLUSTER_LOGS") == "1":
        request.config.stash[_KEPT] = work
    else:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class RealCluster:
    """A control plane of its own with one real node (realnode.py): kubelet, containerd, runc."""

    control_plane: ControlPlane
    node: "RealNode"
    api_client: ApiClient
    kubectl_path: Path
    work_dir: Path
    training_operator: TrainingOperator | None = None  # Kubeflow's, reconciling this control plane's PyTorchJobs
    local = None  # no local-exec node here
    kubectl = Cluster.kubectl
    kubeconfig = Cluster.kubeconfig

    @property
    def kubelet(self) -> "RealNode":  # wait_for reports its errors
        return self.node


@pytest.fixture(scope="session")
def real_cluster(request: pytest.FixtureRequest):
    """Skips unless the binaries and images are built and this process may configure the host
    (root: an address on lo, a bridge, iptables, mounts)."""
    from kubernetes import config as kconfig
    from realnode import ADDRESS, NODE, SERVICE_CIDR, RealNode, add_lo_address

    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("control plane binaries not built: run tests/cluster/build.sh")
    if os.geteuid() != 0:
        pytest.skip("a real node needs root (it configures lo, a bridge, iptables and mounts)")
    import test_images  # the image store and its build (cached)

    images = test_images.built_images()
    coredns = Path(subprocess.run([str(HERE / "coredns" / "build.sh")], check=True, stdout=subprocess.PIPE,
                                  text=True).stdout.strip().splitlines()[-1])  # fmt: skip
    add_lo_address()
    work = Path(tempfile.mkdtemp(prefix="iterdpo-realnode-"))
    with ControlPlane(bin_dir, work / "cp", address=ADDRESS, service_cidr=SERVICE_CIDR, controllers=("*",),
                      nodes=(NODE,)) as cp:  # fmt: skip
        node = RealNode(cp, bin_dir=bin_dir, coredns_bin=coredns, work_dir=work / "node",
                        image_cache=test_images.CACHE,
                        images=(images["operator"], images["runtime-cpu"], test_images.DEBIAN))  # fmt: skip
        api_client = kconfig.new_client_from_config(config_file=str(cp.kubeconfig))
        cluster = RealCluster(cp, node, api_client, bin_dir / "kubectl", work)
        t0 = time.monotonic()
        try:
            node.start()
            print(f"\nreal node Ready {time.monotonic() - t0:.1f}s after start (image imports included); logs in {work}")
            cluster.training_operator = _start_kubeflow(cluster, work, CRD)  # and our CRD: the operator runs here
            yield cluster
        finally:
            if cluster.training_operator is not None:
                cluster.training_operator.stop()
            node.stop()
            api_client.close()
    if request.session.testsfailed or os.environ.get("ITERDPO_KEEP_CLUSTER_LOGS") == "1":
        request.config.stash[_KEPT] = work
    else:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture()
def real_ns(real_cluster):
    """A namespace on the real node's cluster whose Pod Security level is "restricted",
    enforced by the API server."""
    from kubernetes import client

    core = client.CoreV1Api(real_cluster.api_client)
    name = f"r-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    wait_for("default ServiceAccount", lambda: exists(core.read_namespaced_service_account, "default", name),
             real_cluster)  # fmt: skip
    yield name
    core.delete_namespace(name)


@pytest.fixture()
def local_exec(control_plane):
    """New pods go to the local-exec node (their commands really run) for one test."""
    if control_plane.local is None:
        pytest.skip(f"local-exec kubelet unavailable: {control_plane.local_unavailable}")
    control_plane.kubelet.cordon(True)
    control_plane.local.cordon(False)
    try:
        yield control_plane.local
    finally:
        control_plane.local.cordon(True)
        control_plane.kubelet.cordon(False)


@pytest.fixture()
def ns(control_plane):
    """A fresh namespace per test (and its default ServiceAccount, which pods need)."""
    from kubernetes import client

    core = client.CoreV1Api(control_plane.api_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for("default ServiceAccount", lambda: exists(core.read_namespaced_service_account, "default", name), control_plane)
    yield name
    control_plane.kubelet.rule = lambda pod: (0, "")
    control_plane.kubelet.release()
    core.delete_namespace(name)


# -- the iterdpo operator ------------------------------------------------------------------
class Operator:
    """`iterdpo operator -n NS` as a process; `kill()` is SIGKILL, as a node loss would be."""

    def __init__(self, cluster, namespace: str, log_path: Path):
        from iterdpo.local.processes import free_port

        self.cluster, self.namespace, self.log_path = cluster, namespace, log_path
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Operator":
        env = {"KUBECONFIG": str(self.cluster.kubeconfig), "ITERDPO_RECONCILE_INTERVAL": "1"}
        argv = (resolve_executable("iterdpo"), "operator", "-n", self.namespace, "--metrics-port", str(self.metrics_port))
        self.proc = start(argv, env=env, log_path=self.log_path)
        return self

    def metrics(self) -> str:
        """The Prometheus text the operator serves."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, grace_seconds=10)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{tail(self.log_path, 40)}")


@pytest.fixture(scope="module")
def crd(control_plane):
    from kubernetes import client

    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    ext = client.ApiextensionsV1Api(control_plane.api_client)
    wait_for("our CRD Established", lambda: any(
        c.type == "Established" and c.status == "True"
        for c in ext.read_custom_resource_definition("iterativedporuns.iterdpo.io").status.conditions or []), control_plane)  # fmt: skip
    return CRD


@pytest.fixture()
def operator(control_plane, crd, ns, tmp_path):
    bound_claim(control_plane, ns, tmp_path / "pv", name="iterdpo-data")
    op = Operator(control_plane, ns, tmp_path / "operator.log").start()
    yield op
    op.stop()
    if os.environ.get("ITERDPO_SHOW_OPERATOR_LOG"):
        print(tail(op.log_path, 200))


