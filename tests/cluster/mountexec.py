"""Container entry for the local-exec kubelet: run inside a private mount namespace
(`unshare --mount --propagation private`), bind each volume at its mountPath, then exec
the container's command. The binds are invisible outside the namespace and vanish with
it, so two pods can mount different folders at the same path.

Usage: python mountexec.py PLAN.json, where the plan is
{"mounts": [[host_path, container_path, read_only], ...], "workingDir": str|null,
 "argv": [...], "env": {...}}. Mount points must already exist (the kubelet makes them).
"""

import json
import os
import shutil
import subprocess
import sys


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    # Open every source before mounting anything: a bind at /tmp would hide sources under it.
    fds = [os.open(source, os.O_PATH) for source, _, _ in plan["mounts"]]
    for fd, (_, target, read_only) in zip(fds, plan["mounts"]):
        subprocess.run(["mount", "--bind", f"/proc/self/fd/{fd}", target], check=True, pass_fds=(fd,))
        if read_only:
            subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)
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
