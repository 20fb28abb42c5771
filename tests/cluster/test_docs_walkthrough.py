"""The docs, run as written: the blocks marked `<!-- run: FLOW -->` (tests/docblocks.py) of
docs/install.md and docs/quickstart-kubernetes.md, pasted into bash in document order, against
the real control plane, with the chart's operator running as a pod of the local-exec kubelet
(the real `iterdpo operator` process, in-cluster config from its projected service-account
token) and every stage pod a real process (vLLM, the reward server, DeepSpeed).

Stand-ins, where this machine has no cluster of its own: the test kubelet runs the checkout's
venv in place of the images (so the docs' image names are not pulled), and a hostPath
PersistentVolume, bound to the walkthrough's claim, stands in for the storage class.

Also here: the chart's refusal of a watched namespace that does not exist, and its creation
of one behind watch.createNamespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clusterutil import exists, wait_for
from kubernetes import client
from test_chart_install import CHART, helm  # noqa: F401 (the fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from docblocks import REPO, walkthrough  # noqa: E402

pytestmark = pytest.mark.cluster
QUICKSTART_NS, CLAIM = "ml", "iterdpo-data"


def storage_for(cluster, namespace: str, claim: str, folder: Path) -> str:
    """A hostPath PV reserved for `namespace/claim` (claimRef): what a default storage class
    would provision for the walkthrough's claim. Retain: the artifacts outlive the namespace."""
    name = f"pv-walkthrough-{namespace}-{claim}"
    client.CoreV1Api(cluster.api_client).create_persistent_volume({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(folder)},
                 "claimRef": {"namespace": namespace, "name": claim}}})  # fmt: skip
    return name


def shell_env(cluster, helm_path: Path, home: Path) -> dict[str, str]:
    """A newcomer's shell: kubectl, helm and iterdpo on PATH, the kubeconfig of the cluster."""
    path = os.pathsep.join([str(cluster.kubectl_path.parent), str(helm_path.parent), str(Path(sys.executable).parent),
                            os.environ.get("PATH", os.defpath)])  # fmt: skip
    return {**os.environ, "PATH": path, "KUBECONFIG": str(cluster.kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")}  # fmt: skip


def run_flow(flow: str, env: dict, log: Path, timeout: float) -> str:
    script, blocks = walkthrough(flow)
    assert blocks, f"no <!-- run: {flow} --> blocks in the docs"
    with log.open("w") as out:
        proc = subprocess.run(["bash", "-euxo", "pipefail", "-c", script], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)  # fmt: skip
    text = log.read_text()
    assert proc.returncode == 0, f"the {flow} walkthrough failed (exit {proc.returncode}):\n{text[-6000:]}"
    return text


def pod_logs(local_exec, namespace: str) -> str:
    out = []
    for path in sorted((local_exec.root / "pods").glob(f"{namespace}_*/*.log")):
        out.append(f"--- {path.parent.name}/{path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-20:]))
    return "\n".join(out)


@pytest.mark.slow
def test_the_docs_walkthroughs_run_as_written(control_plane, local_exec, helm, tmp_path):  # noqa: F811
    volume = tmp_path / "pv"
    volume.mkdir()
    pv = storage_for(control_plane, QUICKSTART_NS, CLAIM, volume)
    env = shell_env(control_plane, helm.path, tmp_path / "helm-home")
    core = client.CoreV1Api(control_plane.api_client)
    try:
        run_flow("install", env, tmp_path / "install.log", timeout=900)
        assert not client.AppsV1Api(control_plane.api_client).list_namespaced_deployment("iterdpo-system").items

        try:
            out = run_flow("quickstart", env, tmp_path / "quickstart.log", timeout=3600)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{pod_logs(local_exec, QUICKSTART_NS)}\n{pod_logs(local_exec, 'iterdpo-system')}") from None
        # step 4's table: two rounds, then step 5's third, all trained on the claim
        assert "run tiny: Succeeded (round 2 of 2)" in out
        for it in (1, 2, 3):
            assert (volume / "runs" / "tiny" / f"iter-{it:02d}" / "train" / "policy" / "config.json").is_file()
        assert (volume / "tiny" / "policy" / "config.json").is_file()  # step 3's Job built the assets there
        # The operator that did it was the chart's Deployment, running as a pod of the local-exec node.
        operator_logs = pod_logs(local_exec, "iterdpo-system")
        assert "run ml/tiny: Succeeded" in operator_logs or "run ml/tiny: Extended" in operator_logs, operator_logs[-3000:]
        # step 6 cleaned up: the namespace and the release are gone
        wait_for("namespace ml gone", lambda: not exists(core.read_namespace, QUICKSTART_NS), control_plane, timeout=120)
        assert helm("list", "-n", "iterdpo-system", "-q").stdout.strip() == ""
    finally:
        control_plane.kubectl("delete", "namespace", QUICKSTART_NS, "ml-team", "iterdpo-system", "--ignore-not-found",
                              "--wait=false", check=False)  # fmt: skip
        core.delete_persistent_volume(pv)
        shutil.rmtree(volume, ignore_errors=True)


def test_a_missing_watched_namespace_fails_the_install_before_anything_is_created(control_plane, helm, ns):  # noqa: F811
    missing = f"{ns}-runs"
    core = client.CoreV1Api(control_plane.api_client)
    refused = helm("install", "r", str(CHART), "-n", ns, "--set", f"watch.namespaces={{{missing}}}", check=False)
    assert refused.returncode != 0
    assert f'namespace "{missing}" does not exist' in refused.stderr and "watch.createNamespaces=true" in refused.stderr
    assert helm("list", "-n", ns, "-q").stdout.strip() == ""  # no release kept: the same command may be run again
    assert not client.AppsV1Api(control_plane.api_client).list_namespaced_deployment(ns).items
    assert not core.list_namespaced_service_account(ns, label_selector="app.kubernetes.io/instance=r").items

    try:
        helm("install", "r", str(CHART), "-n", ns, "--set", f"watch.namespaces={{{missing}}}", "--set", "watch.createNamespaces=true")
        created = core.read_namespace(missing)
        assert created.metadata.annotations["helm.sh/resource-policy"] == "keep"
        assert client.RbacAuthorizationV1Api(control_plane.api_client).list_namespaced_role(missing).items  # the operator's Role
        helm("upgrade", "r", str(CHART), "-n", ns, "--reuse-values")  # the namespace it made stays its own
        assert core.read_namespace(missing).status.phase == "Active"
        helm("uninstall", "r", "-n", ns, "--wait")
        assert core.read_namespace(missing).status.phase == "Active"  # kept: runs and data live there
        # Reinstalled, the chart takes the namespace it created back instead of refusing it.
        helm("install", "r", str(CHART), "-n", ns, "--set", f"watch.namespaces={{{missing}}}", "--set", "watch.createNamespaces=true")
        # A namespace that exists already (not the chart's) is used as it is.
        helm("upgrade", "r", str(CHART), "-n", ns, "--reuse-values", "--set", f"watch.namespaces={{{missing},default}}")
    finally:
        helm("uninstall", "r", "-n", ns, "--wait", check=False)
        core.delete_namespace(missing)
