"""Container entry for the local-exec kubelet: run inside a private mount and UTS namespace
(`unshare --mount --uts --propagation private`), set the pod's host name, bind each volume
at its mountPath, then exec the container's command. The binds and the name are invisible
outside the namespaces and vanish with them, so two pods can mount different folders at
the same path, and each has its own host name.

Usage: python mountexec.py PLAN.json, where the plan is
{"mounts": [[host_path, container_path, read_only], ...], "hostname": str, "workingDir": str|null,
 "argv": [...], "env": {...}}. Mount points the kubelet did not make are made here, inside
the mounts made before them.
"""

import ctypes
import json
import os
import shutil
import socket
import sys

MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, flags: int) -> None:
    if _libc.mount(source and source.encode(), target.encode(), None, flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} -> {target}: {os.strerror(errno)}")


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    socket.sethostname(plan["hostname"])  # this UTS namespace's only
    # Open every source before mounting anything, and mount from the descriptor (the mount
    # syscall follows /proc/self/fd/N to the original folder): a bind at /tmp or above the
    # checkout would otherwise hide sources that lie under it.
    fds = [os.open(source, os.O_PATH) for source, _, _ in plan["mounts"]]
    for fd, (_, target, read_only) in zip(fds, plan["mounts"]):
        if not os.path.lexists(target):  # e.g. the checkout, re-bound inside an emptyDir mounted above it
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(target)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
        _mount(f"/proc/self/fd/{fd}", target, MS_BIND)
        if read_only:
            _mount(None, target, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for fd in fds:
        os.close(fd)
    if plan.get("workingDir"):
        os.chdir(plan["workingDir"])
    argv, env = plan["argv"], plan["env"]
    executable = shutil.which(argv[0], path=env.get("PATH", os.defpath)) if "/" not in argv[0] else argv[0]
    if executable is None:
        print(f"local-exec: {argv[0]!r} not found on PATH={env.get('PATH', '')}", file=sys.stderr)
        sys.exit(127)
    os.execve(executable, argv, env)


if __name__ == "__main__":
    main()
