"""How the Train stage runs on a cluster: one class per launcher, behind one interface.

A launcher builds the child of a training attempt, reads that child's outcome, and knows
how to suspend it and where its summary pod is. Adding Kubeflow Trainer v2's TrainJob
(trainer.kubeflow.org/v1alpha1) means one more class here: a TrainJob with a
`runtimeRef` to a torch ClusterTrainingRuntime, `trainer.numNodes` = training.nodes,
`trainer.numProcPerNode` = nprocPerNode, the same command, and its `Complete`/`Failed`
conditions; the reconciler needs no change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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


class JobLauncher:
    """Training as one batch Job on one node (clusters without Kubeflow)."""

    name = "job"

    def ref(self, run: IterativeDPORun, iteration: int, attempt: int) -> ChildRef:
        return ChildRef("batch/v1", "Job", "jobs", b.child_name(run, iteration, "Train", attempt))

    def build(self, run: IterativeDPORun, iteration: int, attempt: int, owner_uid: str | None = None) -> dict:
        name = self.ref(run, iteration, attempt).name
        main = b.container(run, "train", b.train_argv(run, iteration), "train")
        return {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": b._meta(run, name, "train", owner_uid, iteration=iteration, attempt=attempt),
            "spec": {"backoffLimit": 0,
                     "template": {"metadata": {"labels": b.labels(run, "train", iteration=iteration, attempt=attempt)},
                                  "spec": b.pod_spec(run, [main], shm=True)}},
        }  # fmt: skip

    def outcome(self, obj: dict) -> Outcome:
        return job_outcome(obj)

    def summary_pods_selector(self, name: str) -> str:
        return f"job-name={name}"

    def suspend_patch(self, suspend: bool) -> dict:
        return {"spec": {"suspend": suspend}}

    def suspended(self, obj: dict) -> bool:
        return bool((obj.get("spec") or {}).get("suspend"))


class PyTorchJobLauncher:
    """Kubeflow Training Operator v1: Master + (nodes - 1) Workers, torchrun in each; the
    operator sets PET_MASTER_ADDR/PORT, PET_NNODES and PET_NODE_RANK, which torchrun reads."""

    name = "pytorchjob"

    def ref(self, run: IterativeDPORun, iteration: int, attempt: int) -> ChildRef:
        return ChildRef("kubeflow.org/v1", "PyTorchJob", "pytorchjobs", b.child_name(run, iteration, "Train", attempt))

    def build(self, run: IterativeDPORun, iteration: int, attempt: int, owner_uid: str | None = None) -> dict:
        t = run.spec.training
        name = self.ref(run, iteration, attempt).name
        # Kubeflow requires the container to be named "pytorch".
        main = b.container(run, "pytorch", b.train_argv(run, iteration), "train")
        template = {"metadata": {"labels": b.labels(run, "train", iteration=iteration, attempt=attempt)},
                    "spec": b.pod_spec(run, [main], shm=True)}  # fmt: skip
        replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
        if t.nodes > 1:  # its own copy: one shared dict would print as YAML anchors
            replicas["Worker"] = {"replicas": t.nodes - 1, "restartPolicy": "Never", "template": copy.deepcopy(template)}
        return {
            "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": b._meta(run, name, "train", owner_uid, iteration=iteration, attempt=attempt),
            "spec": {"nprocPerNode": str(t.nproc_per_node),
                     "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None", "suspend": False},
                     "pytorchReplicaSpecs": replicas},
        }  # fmt: skip

    def outcome(self, obj: dict) -> Outcome:
        return conditions_outcome(obj, "Succeeded")

    def summary_pods_selector(self, name: str) -> str:
        return f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"

    def suspend_patch(self, suspend: bool) -> dict:
        return {"spec": {"runPolicy": {"suspend": suspend}}}

    def suspended(self, obj: dict) -> bool:
        return bool(((obj.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


LAUNCHERS = {launcher.name: launcher for launcher in (JobLauncher(), PyTorchJobLauncher())}


def launcher_for(run: IterativeDPORun):
    return LAUNCHERS[run.spec.kubernetes.launcher]


def controller_for(run: IterativeDPORun, stage: str):
    """What reads and steers a stage's child (outcome, summary pods, suspension): the
    launcher for Train; for Generate and Score, whose children are batch Jobs, the Job one."""
    return launcher_for(run) if stage == "Train" else LAUNCHERS["job"]
