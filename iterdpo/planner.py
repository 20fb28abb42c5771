"""Decide what runs next: a pure function of the spec and the status.

The planner walks the stage table (`iterdpo.stages.STAGES`) round by round and returns
the first stage the status does not record as finished, with the exact command lines
of its processes: the same argv the local runner starts as a process and the operator
puts in a container. Where a command runs (and with which extra environment, such as
DS_ACCELERATOR=cpu for a `deepspeed` stage on CPUs) is the backend's business.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from iterdpo.evaluation import GateTrip, final_policy, start_policy, tripped_gate
from iterdpo.layout import policy_for
from iterdpo.spec import IterativeDPORun
from iterdpo.stages import STAGES, Command, JobContext, Stage, StageDef, servers_of, stage_def
from iterdpo.status import RunStatus

# The model servers' bearer token (the reward's and the judge's: one per run) travels in this variable
# (never a flag: argv shows in process lists and pod specs). A server requires it on /v1/score when
# set; the annotator and the evaluator send it.
REWARD_TOKEN_ENV = "ITERDPO_REWARD_TOKEN"


@dataclass(frozen=True)
class Service:
    """A server the stage's jobs call, run while they run: the reward server, the judge's."""

    server: str  # its key in iterdpo.stages.SERVERS
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
    host: str = "0.0.0.0",
    ports: Mapping[str, int] | None = None,
    urls: Mapping[str, str] | None = None,
    table: Sequence[StageDef] = STAGES,
) -> StageStep | Finished:
    """The first stage, in run order, that the status does not record as finished; or the end:
    every stage finished, or an evaluation gate tripped (`spec.evaluation.gates`).

    `host`, `ports` and `urls` (by server key, iterdpo.stages.SERVERS) say where the model
    servers listen and where the jobs reach them; unset: each server's port, on loopback."""
    gate = tripped_gate(run, status)
    if gate is not None:
        return Finished(final_policy=final_policy(run, status), gate=gate)
    for iteration, d in stage_order(run, table):
        record = status.iteration(iteration)
        if record is None or not record.stage_done(d.stage):
            return _step(run, iteration, d, spec_file=spec_file, host=host, ports=ports or {}, urls=urls or {},
                         policy=start_policy(run, status, iteration))  # fmt: skip
    return Finished(final_policy=final_policy(run, status))


def stage_step(run: IterativeDPORun, iteration: int, stage: str, *, spec_file: str, host: str = "0.0.0.0",
               ports: Mapping[str, int] | None = None, urls: Mapping[str, str] | None = None,
               policy: str | None = None) -> StageStep:  # fmt: skip
    """The step of `stage` in round `iteration`, whatever the status says (an unknown stage is an error);
    `policy`: the round's start policy as next_step chose it (StageStep.policy; unset: policy_for)."""
    return _step(run, iteration, stage_def(stage), spec_file=spec_file, host=host, ports=ports or {}, urls=urls or {},
                 policy=policy or policy_for(run, iteration))  # fmt: skip


def _step(run: IterativeDPORun, iteration: int, d: StageDef, *, spec_file: str, host: str,
          ports: Mapping[str, int], urls: Mapping[str, str], policy: str) -> StageStep:  # fmt: skip
    services, reached = [], {}
    for server in servers_of(run, d):
        port = ports.get(server.key, server.port)
        reached[server.key] = urls.get(server.key) or f"http://127.0.0.1:{port}"
        argv = (*reward_server_argv(spec_file=spec_file, host=host, port=port), *server.flags)
        services.append(Service(server.key, Command(f"{server.key}-server", argv), reached[server.key],
                                server.startup_timeout_seconds(run.spec)))  # fmt: skip
    ctx = JobContext(spec_file=spec_file, urls=reached, policy=None if policy == policy_for(run, iteration) else policy)
    return StageStep(iteration, d.stage, policy, d.jobs(run, iteration, ctx), tuple(services))


def reward_server_argv(*, spec_file: str, host: str, port: int) -> tuple[str, ...]:
    """The run's reward server: it reads spec.reward from the run file (one declaration of each option);
    with --judge appended, spec.evaluation.judge."""
    return ("iterdpo", "serve-reward", "--spec", spec_file, "--host", host, "--port", str(port))
