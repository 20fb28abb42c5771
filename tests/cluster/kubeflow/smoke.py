"""End-to-end check of the training operator on the test control plane (see README.md).

    .venv/bin/python tests/cluster/kubeflow/smoke.py [--no-webhook] [--keep]

Starts the control plane, the instant kubelet and the training operator, installs the
PyTorchJob CRD, creates a Master+Worker PyTorchJob and checks pods (env), Services and the
Succeeded condition; with the webhook it also checks that an invalid job is rejected.
Exits non-zero on the first failed check. Needs both build.sh outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from controlplane import ControlPlane  # noqa: E402
from kubeflow_operator import TrainingOperator  # noqa: E402
from kubelet import InstantKubelet  # noqa: E402


def build(script: Path) -> Path:
    return Path(subprocess.run([str(script)], check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])


def job(name: str, container: str = "pytorch") -> dict:
    spec = lambda: {"replicas": 1, "restartPolicy": "OnFailure", "template": {"spec": {"containers": [  # noqa: E731
        {"name": container, "image": "x", "command": ["python", "-c", "pass"]}]}}}  # fmt: skip
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name, "namespace": "default"},
            "spec": {"pytorchReplicaSpecs": {"Master": spec(), "Worker": spec()}}}  # fmt: skip


def main() -> int:
    import urllib3
    from kubernetes import client
    from kubernetes import config as kconfig

    urllib3.disable_warnings()
    webhook = "--no-webhook" not in sys.argv
    cp_bin = build(HERE.parent / "build.sh")
    op_bin = build(HERE / "build.sh") / "training-operator"
    shared = Path(os.environ.get("ITERDPO_SHARED", HERE.parents[3] / "shared")) / "kubeflow"
    work = Path(tempfile.mkdtemp(prefix="iterdpo-kubeflow-smoke-"))
    ok = False
    try:
        with ControlPlane(cp_bin, work) as cp:
            api = kconfig.new_client_from_config(config_file=str(cp.kubeconfig))
            kubelet = InstantKubelet(api).start()

            def kubectl(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
                p = subprocess.run([str(cp_bin / "kubectl"), "--kubeconfig", str(cp.kubeconfig), *args],
                                   input=input, capture_output=True, text=True, timeout=60)  # fmt: skip
                if check and p.returncode:
                    raise SystemExit(f"kubectl {' '.join(args)}: {p.stderr}")
                return p

            kubectl("apply", "--server-side", "-f", str(shared / "kubeflow.org_pytorchjobs.yaml"))
            # Not `kubectl wait --for=condition=Established` right after the apply: kubectl
            # v1.34.4 fails at once ("status.conditions accessor error: <nil>") while the new
            # CRD has no status yet.
            ext, deadline = client.ApiextensionsV1Api(api), time.monotonic() + 60
            while not any(c.type == "Established" and c.status == "True"
                          for c in ext.read_custom_resource_definition("pytorchjobs.kubeflow.org").status.conditions or []):  # fmt: skip
                assert time.monotonic() < deadline, "PyTorchJob CRD not Established after 60s"
                time.sleep(0.1)
            with TrainingOperator(op_bin, cp.kubeconfig, work, webhook=webhook) as op:
                print(f"control plane {cp.startup_seconds:.1f}s; training-operator ready in {op.startup_seconds:.1f}s")
                t0 = time.monotonic()
                kubectl("create", "-f", "-", input=json.dumps(job("pt")))
                co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
                conds: dict[str, str] = {}
                while time.monotonic() - t0 < 60 and conds.get("Succeeded") != "True":
                    op.check_alive()
                    time.sleep(0.2)
                    status = co.get_namespaced_custom_object("kubeflow.org", "v1", "default", "pytorchjobs", "pt").get("status", {})
                    conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
                assert conds.get("Succeeded") == "True", f"PyTorchJob conditions: {conds}"
                print(f"PyTorchJob Succeeded {time.monotonic() - t0:.1f}s after create; conditions {conds}")

                pods = {p.metadata.name: p for p in core.list_namespaced_pod("default").items}
                assert set(pods) == {"pt-master-0", "pt-worker-0"}, sorted(pods)
                for name, rank in (("pt-master-0", "0"), ("pt-worker-0", "1")):
                    env = {e.name: e.value for e in pods[name].spec.containers[0].env}
                    want = {"MASTER_ADDR": "pt-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": rank,
                            "PET_MASTER_ADDR": "pt-master-0", "PET_MASTER_PORT": "23456", "PET_NNODES": "2",
                            "PET_NODE_RANK": rank, "PET_NPROC_PER_NODE": "auto"}  # fmt: skip
                    assert all(env.get(k) == v for k, v in want.items()), (name, env)
                    assert pods[name].status.phase == "Succeeded", (name, pods[name].status.phase)
                inits = [c.name for c in pods["pt-worker-0"].spec.init_containers or []]
                print(f"pods ok (env as expected); worker init containers: {inits}")
                svcs = {s.metadata.name: s for s in core.list_namespaced_service("default").items}
                assert "pt-master-0" in svcs and svcs["pt-master-0"].spec.cluster_ip == "None", sorted(svcs)
                print(f"services: {sorted(svcs)} (headless, port {svcs['pt-master-0'].spec.ports[0].port})")

                if webhook:
                    bad = kubectl("create", "-f", "-", input=json.dumps(job("bad", container="trainer")), check=False)
                    assert bad.returncode != 0 and "must have at least one container with name pytorch" in bad.stderr, bad
                    print(f"webhook rejected an invalid job: {bad.stderr.strip()[:160]}...")
            kubelet.stop()
            api.close()
        ok = True
        print("OK")
    finally:
        if ok and "--keep" not in sys.argv:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
