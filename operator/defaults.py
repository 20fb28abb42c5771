"""Cluster-wide defaults for what a run leaves unset: the stage image and each stage's
cpu/memory. The platform team sets them once (Helm values `stageDefaults`, passed to the
operator as $ITERDPO_STAGE_DEFAULTS, JSON); a run's own values always win."""

from __future__ import annotations

import json
import os

from pydantic import BaseModel, ConfigDict, ValidationError

from iterdpo.spec import DEFAULT_IMAGE, IterativeDPORun, StageResources

DEFAULTS_ENV = "ITERDPO_STAGE_DEFAULTS"
PODS = tuple(StageResources.model_fields)  # the kinds of pod (generate, reward, annotate, train)


class StageResources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    cpu: str | None = None
    memory: str | None = None


class StageDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    image: str = DEFAULT_IMAGE
    resources: dict[str, StageResources] = {}


def defaults_from_env() -> StageDefaults:
    """The operator's defaults; a malformed value stops it at start, naming the variable."""
    raw = os.environ.get(DEFAULTS_ENV, "").strip()
    try:
        defaults = StageDefaults.model_validate(json.loads(raw)) if raw else StageDefaults()
    except (ValueError, ValidationError) as exc:
        raise SystemExit(f"iterdpo operator: ${DEFAULTS_ENV} is not valid: {exc}") from None
    unknown = set(defaults.resources) - set(PODS)
    if unknown:
        raise SystemExit(f"iterdpo operator: ${DEFAULTS_ENV}: unknown stage(s) {sorted(unknown)}; allowed: {list(PODS)}")
    return defaults


def with_defaults(run: IterativeDPORun, defaults: StageDefaults) -> IterativeDPORun:
    """The run with its unset image and stage cpu/memory taken from `defaults`."""
    k = run.spec.kubernetes
    resources = k.resources
    for pod in PODS:
        given, fallback = getattr(resources, pod), defaults.resources.get(pod)
        if fallback is None:
            continue
        filled = given.model_copy(update={"cpu": given.cpu or fallback.cpu, "memory": given.memory or fallback.memory})
        resources = resources.model_copy(update={pod: filled})
    kubernetes = k.model_copy(update={"image": k.image or defaults.image, "resources": resources})
    return run.model_copy(update={"spec": run.spec.model_copy(update={"kubernetes": kubernetes})})
