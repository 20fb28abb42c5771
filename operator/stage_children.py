"""The operator's stage table: which Kubernetes object runs each stage.

One entry per stage of `iterdpo.stages`, checked complete at import: the child's
component (its name word, `<run>-iNN-<component>-aM`, its pods' label and their
resources key), the kind of child it is (how its outcome and summary pods are read and
how it is suspended: `iterdpo_operator.launchers`), and the builder of its manifest.
The reconciler, the API module and `iterdpo render` read this table; none of them knows
a stage by name. Every command comes from the planner (`builders.planned`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Mapping

from iterdpo.spec import IterativeDPORun
from iterdpo.stages import STAGE_TABLE, STAGES, Server, Stage, clients, servers_of, table_of
from iterdpo_operator import builders as b
from iterdpo_operator.launchers import JOB, ChildKind, ChildRef, TrainingChild, launcher_for


@dataclass(frozen=True)
class StageChild:
    component: str
    kind: Callable[[IterativeDPORun], ChildKind]
    build: Callable[..., dict]  # (run, stage, round, attempt, owner_uid, policy=): the child's manifest


def generate_job(run: IterativeDPORun, stage: Stage, iteration: int, attempt: int, owner_uid: str | None = None,
                 policy: str | None = None) -> dict:  # fmt: skip
    """An Indexed Job: one index per shard (the program reads JOB_COMPLETION_INDEX instead of
    the planner's --shard); a failed shard retries alone (spec.kubernetes.shardRetries)."""
    component = CHILDREN[stage].component
    jobs = b.planned(run, iteration, stage, policy).jobs
    argv = list(jobs[0].argv)  # the planner's shard-0 command, less its --shard: one Job runs every shard
    del argv[argv.index("--shard") : argv.index("--shard") + 2]
    shards = len(jobs)
    main = b.container(run, component, tuple(argv), component)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": b._meta(run, child_name(run, iteration, stage, attempt), component, owner_uid,
                            iteration=iteration, attempt=attempt),
        "spec": {
            "completionMode": "Indexed", "completions": shards, "parallelism": shards,
            "backoffLimitPerIndex": run.spec.kubernetes.shard_retries,
            "template": b.pod_template(run, component, b.pod_spec(run, [main], shm=True), iteration=iteration,
                                       attempt=attempt),
        },
    }  # fmt: skip


def job(run: IterativeDPORun, stage: Stage, iteration: int, attempt: int, owner_uid: str | None = None,
        policy: str | None = None) -> dict:  # fmt: skip
    """The stage's one process as a Job, with the servers' token when it calls them (their URLs are in its argv)."""
    component = CHILDREN[stage].component
    d = STAGE_TABLE[stage]
    (command,) = b.planned(run, iteration, stage, policy).jobs
    env = b.token_env(run) if servers_of(run, d) else []
    main = b.container(run, component, command.argv, component, deepspeed=d.deepspeed, extra_env=env)
    return b.attempt_job(run, child_name(run, iteration, stage, attempt), component, b.pod_spec(run, [main]), owner_uid,
                         iteration=iteration, attempt=attempt)  # fmt: skip


def training(run: IterativeDPORun, stage: Stage, iteration: int, attempt: int, owner_uid: str | None = None,
             policy: str | None = None) -> dict:  # fmt: skip
    """The stage's torchrun command, as spec.kubernetes.launcher runs it (Job or PyTorchJob)."""
    (command,) = b.planned(run, iteration, stage, policy).jobs
    trains = STAGE_TABLE[stage].trains(run)
    child = TrainingChild(child_name(run, iteration, stage, attempt), CHILDREN[stage].component, command.argv,
                          iteration, attempt, trains.nodes, trains.nproc_per_node)  # fmt: skip
    return launcher_for(run).build(run, child, owner_uid)


CHILDREN: Mapping[Stage, StageChild] = table_of(
    {
        Stage.SFT: StageChild("sft", lambda run: launcher_for(run).kind, training),
        Stage.REWARD_MODEL: StageChild("rm", lambda run: launcher_for(run).kind, training),
        Stage.GENERATE: StageChild("generate", lambda run: JOB, generate_job),
        Stage.SCORE: StageChild("annotate", lambda run: JOB, job),
        Stage.TRAIN: StageChild("train", lambda run: launcher_for(run).kind, training),
        Stage.EVALUATE: StageChild("evaluate", lambda run: JOB, job),
    },
    "iterdpo_operator.stage_children.CHILDREN",
)
for _d in STAGES:  # a child's component is a pod of its stage: its resources and GPUs come from there
    if CHILDREN[_d.stage].component not in {p.key for p in _d.pods}:
        raise TypeError(f"{_d.stage}: child component {CHILDREN[_d.stage].component!r} is none of its pods")



def client_components(server: Server) -> tuple[str, ...]:
    """The components of the stages that call `server`: the pods its NetworkPolicy lets in."""
    return tuple(CHILDREN[stage].component for stage in clients(server))


def child_name(run: IterativeDPORun, iteration: int, stage: Stage, attempt: int) -> str:
    return b.child_name(run, iteration, CHILDREN[stage].component, attempt)


def child_kind(run: IterativeDPORun, stage: Stage) -> ChildKind:
    return CHILDREN[stage].kind(run)


def child_ref(run: IterativeDPORun, stage: Stage, iteration: int, attempt: int) -> ChildRef:
    kind = child_kind(run, stage)
    return ChildRef(kind.api_version, kind.kind, kind.plural, child_name(run, iteration, stage, attempt))


def child_manifest(run: IterativeDPORun, stage: Stage, iteration: int, attempt: int, owner_uid: str | None = None,
                   policy: str | None = None) -> dict:  # fmt: skip
    """The child of one stage attempt, with its deadline (spec.kubernetes.stageTimeoutSeconds);
    `policy`: the round's start policy the planner chose (evaluation.rollback)."""
    manifest = CHILDREN[stage].build(run, stage, iteration, attempt, owner_uid, policy=policy)
    return child_kind(run, stage).with_deadline(manifest, stage_timeout(run, stage))


def stage_timeout(run: IterativeDPORun, stage: Stage) -> int:
    return getattr(run.spec.kubernetes.stage_timeout_seconds, STAGE_TABLE[stage].folder)


def server_objects(run: IterativeDPORun, server: Server, replicas: int, owner_uid: str | None = None) -> list[dict]:
    """One model server, for the stages that call it, in creation order: Service, NetworkPolicy (if
    asked: before any server pod exists) and Deployment."""
    objects = [b.server_service(run, server, owner_uid)]
    if run.spec.kubernetes.reward_network_policy:
        objects.append(b.server_network_policy(run, server, client_components(server), owner_uid))
    return [*objects, b.server_deployment(run, server, replicas, owner_uid)]


def render_round(run: IterativeDPORun, iteration: int = 1) -> list[dict]:
    """Every manifest of one round, in the order the operator creates them, except the
    generated token Secret (its value is random: the operator makes it)."""
    manifests, served = [b.spec_config_map(run)], set()
    for d in STAGES:
        if not (d.when.includes(iteration) and d.enabled(run)):
            continue
        for server in servers_of(run, d):  # each server before its first caller
            if server.key not in served:
                manifests += server_objects(run, server, 1)
                served.add(server.key)
        manifests.append(child_manifest(run, d.stage, iteration, 1))
    return manifests
