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
