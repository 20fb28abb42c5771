"""`iterdpo run`: drive a run to the end on this machine, one stage at a time.

The loop: ask the planner for the next stage, run its commands as processes,
read each process's summary, record the figures in the status, write
status.json, repeat. Killed at any point and started again, it resumes from the
first stage the status does not record as finished (stage programs themselves
skip finished work, so a half-done stage loses at most its unfinished part).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from iterdpo.atomic import read_json, write_json
from iterdpo.layout import RunLayout
from iterdpo.local import processes
from iterdpo.planner import REWARD_TOKEN_ENV, Finished, StageStep, next_step
from iterdpo.runfile import dump_run
from iterdpo.spec import IterativeDPORun, StorageSpec
from iterdpo.stages import SERVERS, STAGE_TABLE, Command, StageSummary, SummaryError
from iterdpo.status import (
    round_name,
    RunStatus,
    accepted,
    extended,
    interrupted,
    now_rfc3339,
    stage_failed,
    stage_finished,
    stage_started,
    finished,
)
from iterdpo.summary import TERMINATION_LOG_ENV, read_summary


class RunFailed(RuntimeError):
    pass


class SpecChanged(RuntimeError):
    pass


class AlreadyRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class RunPaths:
    """The runner's own files: <workdir>/<name>/{run.json,status.json,logs/}."""

    home: Path

    @property
    def spec_file(self) -> Path:
        return self.home / "run.json"

    @property
    def status_file(self) -> Path:
        return self.home / "status.json"

    @property
    def lock_file(self) -> Path:
        return self.home / ".lock"

    def log(self, iteration: int, command: Command) -> Path:
        return self.home / "logs" / f"iter-{iteration:02d}-{command.name}.log"

    def summary(self, iteration: int, command: Command) -> Path:
        return self.home / "logs" / f"iter-{iteration:02d}-{command.name}.summary.json"


def status_path(workdir: Path, name: str) -> Path:
    return RunPaths(Path(workdir) / name).status_file


def load_status(path: Path) -> RunStatus | None:
    return RunStatus.model_validate(read_json(path)) if path.exists() else None


def with_storage_root(run: IterativeDPORun, workdir: Path) -> IterativeDPORun:
    """Artifacts go to spec.storage.root, or to the workdir when the spec leaves it unset."""
    if run.spec.storage.root:
        return run
    storage = StorageSpec(root=str(Path(workdir).resolve()))
    return run.model_copy(update={"spec": run.spec.model_copy(update={"storage": storage})})


class LocalRunner:
    def __init__(self, run: IterativeDPORun, workdir: Path, *, out=sys.stdout):
        self._reward_token = secrets.token_urlsafe(32)
        self.run = with_storage_root(run, workdir)
        self.paths = RunPaths(Path(workdir).resolve() / run.name)
        self.out = out
        self._running: list = []
        self._saved = RunStatus()

    # -- the loop ---------------------------------------------------------------------------

    def execute(self) -> RunStatus:
        with _exclusive(self.paths.lock_file, self.run.name):
            return self._execute()

    def _execute(self) -> RunStatus:
        status = self._initial_status()
        dump_run(self.run, self.paths.spec_file)
        self._save(status)
        self._say(
            f"iterdpo run {self.run.name}: {self.run.spec.iterations} rounds, "
            f"K={self.run.spec.generation.samples_per_prompt}, status in {self.paths.status_file}"
        )
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            while True:
                ports = {server.key: processes.free_port() for server in SERVERS}  # loopback URLs by default
                step = next_step(self.run, status, spec_file=str(self.paths.spec_file), host="127.0.0.1", ports=ports)
                if isinstance(step, Finished):
                    status = finished(status, step, now_rfc3339())
                    self._save(status)
                    if step.gate is not None:
                        self._say(status.condition("Progressing").message)
                    return status
                status = self._run_stage(status, step)
        except KeyboardInterrupt:
            self._stop_all()
            status = interrupted(self._saved, now_rfc3339())  # the latest, whichever stage was running
            self._save(status)
            self._say("interrupted: start the same command again to resume")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous_handler)

    def _initial_status(self) -> RunStatus:
        status = load_status(self.paths.status_file)
        spec_hash = self.run.spec_hash()
        old_rounds = self.run.extended_from(status.spec_hash) if status and status.spec_hash else None
        if status is None:
            status = RunStatus()
        elif old_rounds is not None:
            status = extended(status, old_rounds, self.run.spec.iterations, now_rfc3339())
            self._say(status.condition("Succeeded").message)
        elif status.spec_hash and status.spec_hash != spec_hash:
            raise SpecChanged(
                f"the spec of run {self.run.name!r} changed since it started "
                f"(spec hash {status.spec_hash} -> {spec_hash}); resuming would mix two recipes. "
                "Only spec.iterations may be raised (with a prompts.perIteration entry per added round). "
                f"Give the run a new metadata.name, or delete {self.paths.home} to start over."
            )
        elif status.phase == "Succeeded":
            self._say(f"run {self.run.name} already succeeded")
        return accepted(status, spec_hash, now_rfc3339())

    def _run_stage(self, status: RunStatus, step: StageStep) -> RunStatus:
        where = round_name(step.iteration) if step.iteration == 0 else f"round {step.iteration}/{self.run.spec.iterations}"
        label = f"[{where}] {step.stage}"
        status = stage_started(status, step.iteration, step.stage, step.policy, now_rfc3339())
        self._save(status)
        self._say(f"{label} ...")
        started = time.monotonic()
        stage = STAGE_TABLE[step.stage]
        try:
            summaries = self._run_commands(step)
            figures, lineage = stage.record(summaries, time.monotonic() - started, self.run)
            missing = [str(m) for m in stage.markers(RunLayout.of(self.run), step.iteration, self.run) if not m.is_file()]
            if missing:  # its processes said they finished, but their work is not (all) on disk
                raise RunFailed(f"{step.stage} reported success but left no {', '.join(missing)}")
        except (RunFailed, SummaryError) as exc:
            status = stage_failed(status, step.iteration, step.stage, "StageFailed", str(exc), now_rfc3339())
            self._save(status)
            raise RunFailed(f"{label} failed: {exc}") from None
        status = stage_finished(status, step.iteration, step.stage, figures, now_rfc3339(), lineage=lineage)
        self._save(status)
        self._say(f"{label}: {stage.line(figures)}")
        return status

    def _run_commands(self, step: StageStep) -> list[StageSummary]:
        started: list = []
        try:
            for service in step.services:  # the reward server, the judge's: they load side by side
                started.append(self._start(step, service.command))
            for service, proc in zip(step.services, started):  # all ready before a job starts
                try:
                    processes.wait_ready(f"{service.url}/readyz", proc, timeout=service.startup_timeout_seconds)
                except (RuntimeError, TimeoutError) as exc:
                    raise RunFailed(self._explain(step, service.command, str(exc))) from None
            summaries = []
            for command in step.jobs:  # one after another: each may fill this machine's cores
                proc = self._start(step, command)
                code = proc.wait()
                self._running.remove(proc)
                if code != 0:
                    raise RunFailed(self._explain(step, command, f"exited with code {code}"))
                try:
                    summary = read_summary(self.paths.summary(step.iteration, command), STAGE_TABLE[step.stage].summary)
                except SummaryError as exc:
                    raise RunFailed(self._explain(step, command, f"exited 0 but {exc}")) from None
                if summary is None:
                    raise RunFailed(self._explain(step, command, "exited 0 but left no summary"))
                summaries.append(summary)
            return summaries
        finally:
            for proc in started:
                processes.stop(proc)
                self._running.remove(proc)

    def _start(self, step: StageStep, command: Command):
        summary = self.paths.summary(step.iteration, command)
        summary.unlink(missing_ok=True)  # a stale summary must not pass for this attempt's
        stage = STAGE_TABLE[step.stage]
        env = {TERMINATION_LOG_ENV: str(summary)}
        if step.services:
            env[REWARD_TOKEN_ENV] = self._reward_token  # servers on loopback still want a caller's token
        if stage.deepspeed and not _has_cuda():
            env["DS_ACCELERATOR"] = "cpu"
        proc = processes.start(command.argv, env=env, log_path=self.paths.log(step.iteration, command))
        self._running.append(proc)
        return proc

    def _stop_all(self) -> None:
        for proc in list(self._running):
            processes.stop(proc, grace_seconds=15)
        self._running.clear()

    def _explain(self, step: StageStep, command: Command, what: str) -> str:
        log = self.paths.log(step.iteration, command)
        return f"{command.name} {what}; log: {log}\n--- last lines ---\n{processes.tail(log)}"

    def _save(self, status: RunStatus) -> None:
        write_json(self.paths.status_file, status.to_json())
        self._saved = status

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


@contextmanager
def _exclusive(lock_file: Path, name: str):
    """One runner per run: a second `iterdpo run` of the same run would start every stage twice."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise AlreadyRunning(f"run {name!r} is already being run by {holder} (lock {lock_file})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield  # the lock goes with the file descriptor, also when the runner is killed


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


_CUDA: bool | None = None


def _has_cuda() -> bool:
    global _CUDA
    if _CUDA is None:
        import torch

        _CUDA = torch.cuda.is_available()
    return _CUDA
