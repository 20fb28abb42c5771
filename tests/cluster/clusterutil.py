"""Small helpers shared by the cluster tests."""

from __future__ import annotations

import time

from kubernetes.client.rest import ApiException


def wait_for(what: str, predicate, cluster, timeout: float = 60.0, interval: float = 0.3):
    """Poll until `predicate()` is truthy; on timeout say what and check the processes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        cluster.control_plane.check_alive()
        if getattr(cluster, "node", None) is not None:  # a real node (realnode.py)
            cluster.node.check_alive()
        if time.monotonic() > deadline:
            errors = cluster.kubelet.errors + (cluster.local.errors if cluster.local else [])
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; kubelet errors: {errors}")
        time.sleep(interval)


def exists(read, *args) -> bool:
    """Whether `read(*args)` finds the object (404 -> False)."""
    try:
        read(*args)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def bound_claim(cluster, ns: str, host_dir, name: str = "shared") -> None:
    """A ReadWriteMany PVC `name`, bound (by the real PV controller) to a hostPath PV in
    `host_dir`: what a pod's persistentVolumeClaim needs to be scheduled."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client)
    core.create_persistent_volume({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"pv-{ns}-{name}"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(host_dir)},
                 "claimRef": {"namespace": ns, "name": name}}})  # fmt: skip
    core.create_namespaced_persistent_volume_claim(ns, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name}, "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                                              "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip
    wait_for(f"PVC {name} Bound", lambda: core.read_namespaced_persistent_volume_claim(name, ns).status.phase == "Bound", cluster)
