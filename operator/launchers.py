"""The kinds of child a stage attempt can be, and the launchers of training stages.

A child kind (a batch Job, a Kubeflow PyTorchJob) says how its outcome is read, which
pod holds its summary, and how it is suspended. A launcher (spec.kubernetes.launcher)
builds the child that runs a training stage's torchrun command: one Job on one node, or
a PyTorchJob of Master + Workers. Adding Kubeflow Trainer v2's TrainJob
(trainer.kubeflow.org/v1alpha1) means one kind and one launcher here: a TrainJob with a
`runtimeRef` to a torch ClusterTrainingRuntime, `trainer.numNodes` = training.nodes,
`trainer.numProcPerNode` = nprocPerNode, the same command, and its `Complete`/`Failed`
conditions; the reconciler and the stage table need no change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

from iterdpo.spec import IterativeDPORun
from iterdpo_operator import builders as b


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    plural: str
    name: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


@dataclass(frozen=True)
class Outcome:
    """A child's state: running (done False), or done with success or a failure reason."""

    done: bool
    succeeded: bool = False
    reason: str = ""
    message: str = ""
    start_time: str | None = None
    completion_time: str | None = None


def _conditions(obj: dict) -> dict[str, dict]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def conditions_outcome(obj: dict, success: str) -> Outcome:
    """A child's outcome from its terminal conditions: `success` (Complete for a Job,
    Succeeded for Kubeflow's jobs) or Failed, with the start and completion times."""
    status = obj.get("status") or {}
    true = _conditions(obj)
    times = {"start_time": status.get("startTime"), "completion_time": status.get("completionTime")}
    if success in true:
        return Outcome(True, True, success, true[success].get("message", ""), **times)
    if "Failed" in true:
        c = true["Failed"]
        return Outcome(True, False, c.get("reason") or "Failed", c.get("message", ""), **times)
    return Outcome(False, **times)


def job_outcome(obj: dict) -> Outcome:
    """A batch/v1 Job's outcome."""
    return conditions_outcome(obj, "Complete")


class ChildKind(Protocol):
    """How one kind of child is read and steered."""

    api_version: str
    kind: str
    plural: str

    def outcome(self, obj: dict) -> Outcome: ...
    def summary_pods_selector(self, name: str) -> str: ...
    def suspend_patch(self, suspend: bool) -> dict: ...
    def suspended(self, obj: dict) -> bool: ...
    def with_deadline(self, manifest: dict, seconds: int) -> dict: ...
    def timed_out(self, outcome: Outcome) -> bool: ...


class JobKind:
    api_version, kind, plural = "batch/v1", "Job", "jobs"

    def outcome(self, obj: dict) -> Outcome:
        return job_outcome(obj)

    def summary_pods_selector(self, name: str) -> str:
        return f"job-name={name}"

    def suspend_patch(self, suspend: bool) -> dict:
        return {"spec": {"suspend": suspend}}

    def suspended(self, obj: dict) -> bool:
        return bool((obj.get("spec") or {}).get("suspend"))

    def with_deadline(self, manifest: dict, seconds: int) -> dict:
        """The Job controller fails the Job (reason DeadlineExceeded) past `seconds` from its start."""
        manifest["spec"]["activeDeadlineSeconds"] = seconds
        return manifest

    def timed_out(self, outcome: Outcome) -> bool:
        return outcome.reason == "DeadlineExceeded"


class PyTorchJobKind:
    api_version, kind, plural = "kubeflow.org/v1", "PyTorchJob", "pytorchjobs"

    def outcome(self, obj: dict) -> Outcome:
        return conditions_outcome(obj, "Succeeded")

    def summary_pods_selector(self, name: str) -> str:
        return f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"

    def suspend_patch(self, suspend: bool) -> dict:
        return {"spec": {"runPolicy": {"suspend": suspend}}}

    def suspended(self, obj: dict) -> bool:
        return bool(((obj.get("spec") or {}).get("runPolicy") or {}).get("suspend"))

    def with_deadline(self, manifest: dict, seconds: int) -> dict:
        manifest["spec"]["runPolicy"]["activeDeadlineSeconds"] = seconds
        return manifest

    def timed_out(self, outcome: Outcome) -> bool:
        # training-operator v1.8: reason <Kind>Failed, "... was active longer than specified deadline"
        return "active longer than specified deadline" in outcome.message


JOB, PYTORCHJOB = JobKind(), PyTorchJobKind()


@dataclass(frozen=True)
class TrainingChild:
    """What a launcher needs to know of the training stage whose child it builds."""

    name: str  # the child's name
    component: str  # its pods' app.kubernetes.io/component, and their resources key
    argv: tuple[str, ...]  # the planner's torchrun command
    iteration: int
    attempt: int
    nodes: int  # of the spec section it trains by (StageDef.trains)
    nproc_per_node: int


class JobLauncher:
    """Training as one batch Job on one node (clusters without Kubeflow)."""

    name = "job"
    kind = JOB

    def build(self, run: IterativeDPORun, child: TrainingChild, owner_uid: str | None = None) -> dict:
        main = b.container(run, child.component, child.argv, child.component, deepspeed=True)
        return b.attempt_job(run, child.name, child.component, b.pod_spec(run, [main], shm=True), owner_uid,
                             iteration=child.iteration, attempt=child.attempt)  # fmt: skip


class PyTorchJobLauncher:
    """Kubeflow Training Operator v1: Master + (nodes - 1) Workers, torchrun in each; the
    operator sets PET_MASTER_ADDR/PORT, PET_NNODES and PET_NODE_RANK, which torchrun reads."""

    name = "pytorchjob"
    kind = PYTORCHJOB

    def build(self, run: IterativeDPORun, child: TrainingChild, owner_uid: str | None = None) -> dict:
        # Kubeflow requires the container to be named "pytorch".
        main = b.container(run, "pytorch", child.argv, child.component, deepspeed=True)
        template = b.pod_template(run, child.component, b.pod_spec(run, [main], shm=True), iteration=child.iteration,
                                  attempt=child.attempt)  # fmt: skip
        replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
        if child.nodes > 1:  # its own copy: one shared dict would print as YAML anchors
            replicas["Worker"] = {"replicas": child.nodes - 1, "restartPolicy": "Never", "template": copy.deepcopy(template)}
        return {
            "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": b._meta(run, child.name, child.component, owner_uid, iteration=child.iteration, attempt=child.attempt),
            "spec": {"nprocPerNode": str(child.nproc_per_node),
                     "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None", "suspend": False},
                     "pytorchReplicaSpecs": replicas},
        }  # fmt: skip


LAUNCHERS = {launcher.name: launcher for launcher in (JobLauncher(), PyTorchJobLauncher())}


def launcher_for(run: IterativeDPORun):
    return LAUNCHERS[run.spec.kubernetes.launcher]
