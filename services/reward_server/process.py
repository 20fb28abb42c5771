"""Run the reward server as a child process: start, wait for /readyz, stop with SIGTERM.

For the tests and benchmarks; it stays in the caller's session, so a benchmark's
CPU share is fair. Readiness is polled (never a fixed sleep) with the local
runner's helper; an early exit of the child is reported with its output, and
stopping checks the exit code instead of assuming it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from iterdpo.local import processes
from iterdpo.local.processes import free_port

__all__ = ["RewardServerProcess", "ServerProcessError", "free_port"]


class ServerProcessError(RuntimeError):
    pass


class RewardServerProcess:
    """`with RewardServerProcess(["--model", path]) as server: server.url ...`"""

    def __init__(self, args: list[str], *, host: str = "127.0.0.1", port: int | None = None, env: dict | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.args = [*args, "--host", host, "--port", str(self.port)]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="reward-server-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self) -> RewardServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iterdpo_reward_server", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
        )
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        try:
            processes.wait_ready(f"{self.url}/readyz", self.proc, timeout=timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise ServerProcessError(f"the reward server: {exc}:\n{self.output()}") from None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL only if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RewardServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.close()  # the error already carries the server's output
            raise
        return self

    def close(self) -> int:
        """Stop (if running) and remove the captured output; returns the exit code."""
        code = self.stop()
        self._log.close()
        self.log_path.unlink(missing_ok=True)
        return code

    def __exit__(self, *exc) -> None:
        self.close()
