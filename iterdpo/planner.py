"""Decide what runs next: a pure function of the spec and the status.

The planner walks the stage table (`iterdpo.stages.STAGES`) round by round and returns
the first stage the status does not record as finished, with the exact command lines
of its processes: the same argv the local runner starts as a process and the operator
puts in a container. Where a command runs (and with which extra environment, such as
DS_ACCELERATOR=cpu for a `deepspeed` stage on CPUs) is the backend's business.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from iterdpo.evaluation import GateTrip, final_policy, tripped_gate
from iterdpo.layout import policy_for
from iterdpo.spec import IterativeDPORun
from iterdpo.stages import STAGES, Command, JobContext, Stage, StageDef, stage_def
from iterdpo.status import RunStatus

REWARD_PORT = 8000
JUDGE_PORT = 8001  # spec.evaluation.judge's server, where it runs beside the reward server
# The reward server's bearer token travels in this variable (never a flag: argv shows in
# process lists and pod specs). The server requires it on /v1/score when set; the annotator sends it.
REWARD_TOKEN_ENV = "ITERDPO_REWARD_TOKEN"


@dataclass(frozen=True)
class Service:
    """A server the stage's jobs call, run while they run: the reward server, the judge's."""

    command: Command
    url: str  # where the jobs reach it
    startup_timeout_seconds: float  # its spec's startupTimeoutSeconds: how long /readyz may take


@dataclass(frozen=True)
class StageStep:
    iteration: int
    stage: Stage
    policy: str  # the policy that generates this round
    jobs: tuple[Command, ...]  # run to completion; independent of each other
    services: tuple[Service, ...] = ()  # run while the jobs run (the reward server, the judge's)


@dataclass(frozen=True)
class Finished:
    final_policy: str
    gate: GateTrip | None = None  # the run stops early: an evaluation gate tripped


def stage_order(run: IterativeDPORun, table: Sequence[StageDef] = STAGES) -> Iterator[tuple[int, StageDef]]:
    """(round, stage) in the order a run goes through them; round 0 comes before round 1."""
    for iteration in range(0, run.spec.iterations + 1):
        for d in table:
            if d.when.includes(iteration) and d.enabled(run):
                yield iteration, d


def next_step(
    run: IterativeDPORun,
    status: RunStatus,
    *,
    spec_file: str,
    reward_host: str = "0.0.0.0",
    reward_port: int = REWARD_PORT,
    reward_url: str | None = None,
    judge_port: int = JUDGE_PORT,
    judge_url: str | None = None,
    table: Sequence[StageDef] = STAGES,
) -> StageStep | Finished:
    """The first stage, in run order, that the status does not record as finished; or the end:
    every stage finished, or an evaluation gate tripped (`spec.evaluation.gates`)."""
    gate = tripped_gate(run, status)
    if gate is not None:
        return Finished(final_policy=final_policy(run, status), gate=gate)
    for iteration, d in stage_order(run, table):
        record = status.iteration(iteration)
        if record is None or not record.stage_done(d.stage):
            return _step(run, iteration, d, spec_file=spec_file, host=reward_host, reward=(reward_port, reward_url),
                         judge=(judge_port, judge_url))  # fmt: skip
    return Finished(final_policy=final_policy(run, status))


def stage_step(
    run: IterativeDPORun, iteration: int, stage: str, *, spec_file: str, reward_host: str, reward_port: int,
    reward_url: str, judge_port: int = JUDGE_PORT, judge_url: str | None = None,
) -> StageStep:  # fmt: skip
    """The step of `stage` in round `iteration`, whatever the status says (an unknown stage is an error)."""
    return _step(run, iteration, stage_def(stage), spec_file=spec_file, host=reward_host,
                 reward=(reward_port, reward_url), judge=(judge_port, judge_url))  # fmt: skip


def _step(run: IterativeDPORun, iteration: int, d: StageDef, *, spec_file: str, host: str,
          reward: tuple[int, str | None], judge: tuple[int, str | None]) -> StageStep:  # fmt: skip
    """`reward` and `judge`: each server's (port, URL the jobs use; None: loopback at the port)."""
    reward, judge = [(port, url or f"http://127.0.0.1:{port}") for port, url in (reward, judge)]
    services = []
    if d.uses_reward_server:
        argv = reward_server_argv(spec_file=spec_file, host=host, port=reward[0])
        services.append(Service(Command("reward-server", argv), reward[1], run.spec.reward.startup_timeout_seconds))
    judged = d.uses_judge and run.spec.evaluation is not None and run.spec.evaluation.judge is not None
    if judged:
        argv = (*reward_server_argv(spec_file=spec_file, host=host, port=judge[0]), "--judge")
        services.append(Service(Command("judge-server", argv), judge[1],
                                run.spec.evaluation.judge.startup_timeout_seconds))
    ctx = JobContext(spec_file=spec_file, reward_url=reward[1], judge_url=judge[1] if judged else None)
    return StageStep(iteration, d.stage, policy_for(run, iteration), d.jobs(run, iteration, ctx), tuple(services))


def reward_server_argv(*, spec_file: str, host: str, port: int) -> tuple[str, ...]:
    """The run's reward server: it reads spec.reward from the run file (one declaration of each option);
    with --judge appended, spec.evaluation.judge."""
    return ("iterdpo", "serve-reward", "--spec", spec_file, "--host", host, "--port", str(port))
