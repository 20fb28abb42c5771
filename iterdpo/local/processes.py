"""Start, watch and stop stage processes, so none outlives the runner.

Each child runs in its own process group (so a stop reaches its workers too:
vLLM's engine, torchrun's ranks) and gets SIGTERM if the runner dies, even by
kill -9 (Linux PR_SET_PDEATHSIG). Output goes to a log file per process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def resolve_executable(name: str) -> str:
    """Prefer the executable beside this Python (the venv's bin), so activation is not needed."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def start(argv: tuple[str, ...], *, env: dict[str, str], log_path: Path, inherit_env: bool = True) -> subprocess.Popen:
    """Start `argv` in its own session, output appended to `log_path`; its environment is
    this process's plus `env`, or exactly `env` when `inherit_env` is False."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n")
        log.flush()
        return subprocess.Popen(
            [resolve_executable(argv[0]), *argv[1:]],
            env={**os.environ, **env} if inherit_env else env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def stop(proc: subprocess.Popen, *, grace_seconds: float = 30.0) -> int:
    """SIGTERM the process group, then SIGKILL it after the grace period."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    _signal_group(proc, signal.SIGKILL)  # stragglers left in the group
    return proc.returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_ready(url: str, proc: subprocess.Popen, *, timeout: float, interval: float = 0.5) -> None:
    """Poll `url` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with code {proc.returncode} before {url} was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} was not ready after {timeout:.0f}s")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 15) -> str:
    """The end of a log, led by its error lines (a stage's own one-line error can sit
    above a launcher's traceback, as with torchrun)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    last_attempt = max((i for i, line in enumerate(text) if line.startswith("=== ")), default=0)
    text = text[last_attempt:]
    errors = [line for line in text[:-lines] if "error" in line.lower() and "Traceback" not in line][-5:]
    return "\n".join([*errors, *(["..."] if errors else []), *text[-lines:]])
