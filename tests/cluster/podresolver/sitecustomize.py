"""Cluster DNS and kube-proxy for the local-exec kubelet's Python processes.

There is no cluster DNS and no kube-proxy on a test machine. The local-exec kubelet puts
this folder first on PYTHONPATH, so every Python process in a pod loads this module. It
resolves Service names (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) to the
ready endpoints the real EndpointSlice controller published, and swaps the Service port
for the endpoint's target port, as kube-proxy would for a ClusterIP. The table is a JSON
file the kubelet rewrites as Services and EndpointSlices change ($LOCALEXEC_SERVICES).
Other names resolve as usual. The port swap reaches clients that connect to the returned
address (socket.create_connection, urllib, requests); anyio-based ones (httpx async) keep
the port they asked for, so Services used by those should have port == targetPort.
"""

import json
import os
import socket

_TABLE = os.environ.get("LOCALEXEC_SERVICES")
_NAMESPACE = os.environ.get("LOCALEXEC_NAMESPACE", "default")
_getaddrinfo = socket.getaddrinfo


def _service_key(host: str) -> str | None:
    name = host.rstrip(".").lower()
    for suffix in (".svc.cluster.local", ".svc"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    parts = name.split(".")
    if len(parts) == 1:
        return f"{parts[0]}.{_NAMESPACE}"
    return name if len(parts) == 2 else None


def _lookup(host: str) -> dict | None:
    key = _service_key(host)
    if key is None:
        return None
    try:
        with open(_TABLE) as f:
            return json.load(f).get(key)
    except (OSError, ValueError):
        return None


def getaddrinfo(host, port, *args, **kwargs):
    name = host.decode("idna") if isinstance(host, bytes) else host  # anyio (httpx async) passes IDNA bytes
    entry = _lookup(name) if _TABLE and isinstance(name, str) else None
    if entry is None:
        return _getaddrinfo(host, port, *args, **kwargs)
    if not entry["ips"]:
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: the Service has no ready endpoints")
    target = entry["ports"].get(str(port), port)
    return [info for ip in entry["ips"] for info in _getaddrinfo(ip, target, *args, **kwargs)]


socket.getaddrinfo = getaddrinfo
