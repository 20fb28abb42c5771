"""What the schema cannot check but a cluster needs: paths that can exist in the pods, and
the objects the spec names (its claim and Secrets), which must exist in the run's namespace.

The API server has already applied the CRD's schema and CEL rules; this runs the same
pydantic model the local runner uses (so a rule missing from the CRD is still caught)
plus the Kubernetes-only rules. Each problem names the field, as `iterdpo validate` does.
Whether a named object exists is the API's to say: `references` lists them, `kube.py` looks.
"""

from __future__ import annotations

import posixpath
import typing
from dataclasses import dataclass
from pathlib import PurePosixPath

from iterdpo.runfile import SpecError, parse_run
from iterdpo.stages import STAGES
from iterdpo.spec import IterativeDPORun, KubernetesSpec, SecretKeyRef, is_local
from iterdpo.yamlfile import short


class InvalidRun(ValueError):
    """The run cannot run on Kubernetes; the message names every offending field."""


def path_problems(run: IterativeDPORun) -> list[str]:
    spec = run.spec
    mount = PurePosixPath(spec.kubernetes.volume.mount_path)
    problems = []
    if not spec.kubernetes.volume.claim_name:
        problems.append("spec.kubernetes.volume.claimName: required on Kubernetes (a ReadWriteMany PersistentVolumeClaim)")
    if not mount.is_absolute():
        problems.append(f"spec.kubernetes.volume.mountPath: must be an absolute path (got {str(mount)!r})")
    for field, _, value in spec.path_fields():
        if not is_local(value):
            continue  # unset, or a hub id
        if not value.startswith("/"):
            problems.append(f"{field}: {short(value)} is relative, and a cluster run has no run file to resolve it against; "
                            f"use an absolute path under {mount} (the run's volume) or a hub id")  # fmt: skip
        elif not PurePosixPath(posixpath.normpath(value)).is_relative_to(mount):  # /iterdpo/../etc is /etc
            problems.append(f"{field}: {short(value)} cannot exist in the pods: only the run's volume is mounted, at {mount}; "
                            f"put it under {mount} or use a hub id")  # fmt: skip
    return problems


def resource_problems(run: IterativeDPORun) -> list[str]:
    """GPU counts that cannot work with the recipe."""
    spec, res = run.spec, run.spec.kubernetes.resources
    problems = []
    for d in STAGES:  # a training stage's pods: one GPU per torchrun process
        if d.trains is None or not d.enabled(run):
            continue
        n = d.trains(run).nproc_per_node
        for pod in d.pods:
            gpus = getattr(res, pod.key).gpus
            if gpus and gpus != n:
                problems.append(f"spec.kubernetes.resources.{pod.key}.gpus: torchrun starts {pod.gpus_doc} = {n} "
                                f"processes per pod, one per GPU: set it to {n}, or 0 to train on CPUs (got {gpus})")  # fmt: skip
    tp = spec.generation.tensor_parallel_size
    if res.generate.gpus and res.generate.gpus < tp:
        problems.append(f"spec.kubernetes.resources.generate.gpus: one vLLM engine spans generation.tensorParallelSize = {tp} "
                        f"GPUs: set at least {tp} (got {res.generate.gpus})")  # fmt: skip
    return problems


def kubernetes_problems(run: IterativeDPORun) -> list[str]:
    """What a valid spec still needs to run on a cluster ('field: problem' lines)."""
    return path_problems(run) + resource_problems(run)


def validate_resource(body: dict) -> IterativeDPORun:
    """The typed run of a custom resource, or InvalidRun naming each bad field."""
    manifest = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
    manifest["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k in ("name", "namespace")}
    try:
        run = parse_run(manifest, source=f"IterativeDPORun {manifest['metadata'].get('name')}")
    except SpecError as exc:
        raise InvalidRun("\n".join(exc.problems)) from None
    problems = kubernetes_problems(run)
    if problems:
        raise InvalidRun("\n".join(problems))
    return run


# -- objects the spec names ------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """An object the spec names but the operator does not create: the pods cannot start without it."""

    field: str  # the spec field naming it, e.g. spec.kubernetes.volume.claimName
    kind: str  # PersistentVolumeClaim | Secret
    name: str

    def not_found(self, namespace: str) -> str:
        """The one-line problem, naming the field and the object."""
        return (f'{self.field}: {self.kind} "{self.name}" not found in namespace "{namespace}"; '
                "create it (docs/kubernetes.md) or fix the field")  # fmt: skip


# Every Secret field of spec.kubernetes, read from the model: a new one is checked too.
SECRET_FIELDS = tuple((f.alias or name, name) for name, f in KubernetesSpec.model_fields.items()
                      if SecretKeyRef in (f.annotation, *typing.get_args(f.annotation)))  # fmt: skip


def references(run: IterativeDPORun) -> list[Reference]:
    """The claim and each Secret the spec names (not the token Secret the operator makes itself)."""
    k = run.spec.kubernetes
    refs = []
    if k.volume.claim_name:
        refs.append(Reference("spec.kubernetes.volume.claimName", "PersistentVolumeClaim", k.volume.claim_name))
    for alias, name in SECRET_FIELDS:
        ref = getattr(k, name)
        if ref is not None:
            refs.append(Reference(f"spec.kubernetes.{alias}.name", "Secret", ref.name))
    return refs
