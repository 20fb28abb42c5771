"""Decide what runs next: a pure function of the spec and the status.

The planner returns the next stage and the exact command lines of its
processes: the same argv the local runner starts as a process and the operator
puts in a container. Where a command runs (and with which extra environment,
such as DS_ACCELERATOR=cpu) is the backend's business, not the planner's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iterdpo.layout import RunLayout, policy_for
from iterdpo.spec import IterativeDPORun
from iterdpo.status import STAGES, RunStatus, Stage

REWARD_PORT = 8000
# The reward server's bearer token travels in this variable (never a flag: argv shows in
# process lists and pod specs). The server requires it on /v1/score when set; the annotator sends it.
REWARD_TOKEN_ENV = "ITERDPO_REWARD_TOKEN"


@dataclass(frozen=True)
class Command:
    """One process of a stage."""

    name: str  # unique within the stage, e.g. "generate-shard-0"
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageStep:
    iteration: int
    stage: Stage
    policy: str  # the policy that generates this round
    jobs: tuple[Command, ...]  # run to completion; independent of each other
    service: Command | None = None  # runs while the jobs run (the reward server)
    service_url: str | None = None  # where the jobs reach the service


@dataclass(frozen=True)
class Finished:
    final_policy: str


def next_step(
    run: IterativeDPORun,
    status: RunStatus,
    *,
    spec_file: str,
    reward_host: str = "0.0.0.0",
    reward_port: int = REWARD_PORT,
    reward_url: str | None = None,
) -> StageStep | Finished:
    """The first stage, in round order, that the status does not record as finished."""
    for iteration in range(1, run.spec.iterations + 1):
        record = status.iteration(iteration)
        for stage in STAGES:
            if record is None or not record.stage_done(stage):
                return stage_step(
                    run,
                    iteration,
                    stage,
                    spec_file=spec_file,
                    reward_host=reward_host,
                    reward_port=reward_port,
                    reward_url=reward_url or f"http://127.0.0.1:{reward_port}",
                )
    return Finished(final_policy=str(RunLayout.of(run).checkpoint(run.spec.iterations)))


def stage_step(
    run: IterativeDPORun,
    iteration: int,
    stage: Stage,
    *,
    spec_file: str,
    reward_host: str,
    reward_port: int,
    reward_url: str,
) -> StageStep:
    common = ("--spec", spec_file, "--iteration", str(iteration))
    policy = policy_for(run, iteration)
    if stage == "Generate":
        jobs = tuple(
            Command(f"generate-shard-{i}", generate_argv(run, iteration, spec_file=spec_file, shard=i))
            for i in range(run.spec.generation.shards)
        )
        return StageStep(iteration, stage, policy, jobs)
    if stage == "Score":
        return StageStep(
            iteration,
            stage,
            policy,
            jobs=(Command("annotate", ("iterdpo", "annotate", *common, "--reward-url", reward_url)),),
            service=Command("reward-server", reward_server_argv(run, host=reward_host, port=reward_port)),
            service_url=reward_url,
        )
    t = run.spec.training
    train = (
        "torchrun",
        f"--nnodes={t.nodes}",
        f"--nproc-per-node={t.nproc_per_node}",
        "-m",
        "iterdpo_trainer",
        *common,
    )
    return StageStep(iteration, stage, policy, (Command("train", train),))


def generate_argv(run: IterativeDPORun, iteration: int, *, spec_file: str, shard: int | None) -> tuple[str, ...]:
    """One generation shard; without `shard` the program reads JOB_COMPLETION_INDEX (an Indexed Job)."""
    argv = ("iterdpo", "generate", "--spec", spec_file, "--iteration", str(iteration))
    return argv if shard is None else (*argv, "--shard", str(shard))


def reward_server_argv(run: IterativeDPORun, *, host: str, port: int) -> tuple[str, ...]:
    reward = run.spec.reward
    argv = [
        "iterdpo",
        "serve-reward",
        "--model",
        reward.model,
        "--kind",
        reward.kind,
        "--max-length",
        str(reward.max_length),
        "--batch-tokens",
        str(reward.batch_tokens),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if reward.chat_template:
        argv += ["--chat-template-text", reward.chat_template]
    return tuple(argv)
