"""Helpers shared by the benchmark scripts: tiny assets, synthetic text, repeated
timings (median and spread), child processes, and the printed table.

Speed is reported as a RATIO against a peer run side by side in the same script on
the same machine; absolute seconds depend on the machine and on whatever else runs.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PYTHON = sys.executable


# --- machine and header ----------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_header(title: str, settings: dict) -> None:
    load = os.getloadavg()
    print(f"== {title}")
    print(
        f"   {datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPU cores ({cpu_model()}), "
        f"load average at start {load[0]:.2f}, python {platform.python_version()}"
    )
    print("   " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)


def step(message: str) -> None:
    print(f"-- {message}", flush=True)


@contextmanager
def workdir(keep: Path | None, *, prefix: str):
    """A temp dir removed at the end, or `keep` (created, left in place) to read the logs."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        print(f"work files and logs kept in {keep}")
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# --- tiny assets and synthetic text ------------------------------------------------------


def tiny_assets(workdir: Path):
    """The project's deterministic tiny policy, reward model and prompt sets (no downloads)."""
    from iterdpo.tiny import build_tiny

    return build_tiny(workdir / "tiny")


def write_run(path: Path, name: str, *, policy: Path, reward: Path, prompts: Path, root: Path, **spec) -> None:
    """A one-round IterativeDPORun on the tiny models; `spec` adds the stage's own sections."""
    import yaml

    run = {
        "apiVersion": "iterdpo.io/v1alpha1",
        "kind": "IterativeDPORun",
        "metadata": {"name": name},
        "spec": {
            "iterations": 1,
            "policy": {"model": str(policy)},
            "prompts": {"dataset": str(prompts)},
            "reward": {"model": str(reward)},
            "storage": {"root": str(root)},
            **spec,
        },
    }
    path.write_text(yaml.safe_dump(run, sort_keys=False))


def read_prompts(assets) -> list[list[dict]]:
    """Every prompt of every tiny round, as chat messages."""
    import json

    prompts = []
    for path in assets.prompts:
        for line in path.read_text().splitlines():
            if line.strip():
                prompts.append(json.loads(line)["messages"])
    return prompts


def random_words(rng: random.Random, count: int, *, kind_share: float = 0.15, unkind_share: float = 0.15) -> str:
    """`count` words, mostly neutral, with some kind and unkind ones (what the tiny reward reads)."""
    from iterdpo.tiny import KIND_WORDS, NEUTRAL_WORDS, UNKIND_WORDS

    words = []
    for _ in range(count):
        x = rng.random()
        pool = KIND_WORDS if x < kind_share else UNKIND_WORDS if x < kind_share + unkind_share else NEUTRAL_WORDS
        words.append(rng.choice(pool))
    return " ".join(words)


# --- repeated measurements ---------------------------------------------------------------


@dataclass
class Samples:
    """Repeated measurements of one quantity."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def text(self, fmt: str = "{:.2f}") -> str:
        """'median (min-max)'; with signed values 'median (min to max)'."""
        if len(self.values) == 1:
            return fmt.format(self.median)
        sep = " to " if self.low < 0 else "-"
        return f"{fmt.format(self.median)} ({fmt.format(self.low)}{sep}{fmt.format(self.high)})"


def paired_ratio(peer: Samples, base: Samples) -> Samples:
    """Per-round ratios peer[i] / base[i]. The systems run interleaved, round by round, so
    each pair saw the same background load; their spread is the honest noise of the ratio."""
    if len(peer.values) != len(base.values):
        raise ValueError("paired ratios need the same number of rounds")
    return Samples([p / b for p, b in zip(peer.values, base.values)])


def rotate(items: list, by: int) -> list:
    """Round r runs the systems in a rotated order, so none is always first (or last)."""
    by %= len(items)
    return items[by:] + items[:by]


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*headers))
    print(line.format(*["-" * w for w in widths]))
    for row in rows:
        print(line.format(*row))
    sys.stdout.flush()


# --- child processes ---------------------------------------------------------------------
# Children get their own process GROUP (process_group=0, so that stop_group can end what vLLM
# spawns) but stay in this SESSION: with the kernel's autogroup scheduling (on on this
# machine), each session gets an equal share of the CPU, so a peer started with setsid would
# be favoured over iterdpo's processes whenever something else loads the machine.


def cpu_seconds(*, pgid: int | None = None, pid: int | None = None) -> float:
    """CPU time (user + system) used so far by a process group or one process (Linux /proc)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # fields[0] is field 3 of proc(5): state; [2] pgrp; [11] utime; [12] stime
        if (pgid is not None and int(fields[2]) == pgid) or (pid is not None and int(stat.parent.name) == pid):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def wait_quiet(*, pgid: int | None = None, pid: int | None = None, window: float = 0.25,
               busy: float = 0.1, limit: float = 10.0) -> float:
    """Wait until a peer's processes stop using the CPU after a call (vLLM's engine keeps
    polling, a core busy, for about a second after each request), so the next system timed
    does not pay for it. Returns the seconds waited."""
    started = time.monotonic()
    last = cpu_seconds(pgid=pgid, pid=pid)
    while time.monotonic() - started < limit:
        time.sleep(window)
        now = cpu_seconds(pgid=pgid, pid=pid)
        if now - last < busy * window:
            break
        last = now
    return time.monotonic() - started



class ChildFailed(RuntimeError):
    pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def run_timed(argv: list[str], *, log: Path, env: dict | None = None, cwd: Path | None = None, timeout: float = 900) -> float:
    """Run argv to completion (output to `log`); wall seconds from start to exit. Raises on failure."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd,
            process_group=0,
        )
        try:
            code = proc.wait(timeout)
        except BaseException:
            stop_group(proc)
            raise
    seconds = time.monotonic() - started
    if code != 0:
        raise ChildFailed(f"{' '.join(map(str, argv))} exited with {code}; last output ({log}):\n{tail(log)}")
    return seconds


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group we started (its leader may have exited already: vLLM can leave
    engine processes behind), wait until the group is gone, then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so a zombie does not keep the group alive
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
