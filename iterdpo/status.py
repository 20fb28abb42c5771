"""The run's status: typed, and changed only by pure functions.

The local runner keeps it in `<workdir>/<name>/status.json`; the operator writes the
same object into the resource's `status`. Conditions follow the Kubernetes API
conventions (a condition's lastTransitionTime moves only when its status flips);
`phase` is a summary derived alongside them. Each round's figures have one field per
stage, named and typed by the stage table (`iterdpo.stages`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel

from iterdpo.lineage import Lineage
from iterdpo.stages import STAGE_TABLE, STAGES, Figures, Stage

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str


class _Round(_Model):
    iteration: int
    policy: str
    lineage: Lineage | None = Field(
        default=None,
        description="Content digests (sha256) of every path the round's finished stages read and wrote (iterdpo.lineage).",
    )

    def figures(self, stage: Stage) -> Figures | None:
        return getattr(self, STAGE_TABLE[stage].status_field)

    def stage_done(self, stage: Stage) -> bool:
        return self.figures(stage) is not None


# One field per stage, as the table names it (generation, scoring, training, ...).
IterationStatus = create_model(
    "IterationStatus",
    __base__=_Round,
    __module__=__name__,
    **{d.status_field: (d.figures | None, Field(default=None, description=d.description)) for d in STAGES},
)


class RunStatus(_Model):
    phase: Phase = "Pending"
    current_iteration: int | None = None
    current_stage: Stage | None = None
    conditions: list[Condition] = Field(default_factory=list)
    iterations: list[IterationStatus] = Field(default_factory=list)
    final_policy: str | None = None
    spec_hash: str | None = None
    # Kubernetes only: the operator's bookkeeping of the current stage.
    observed_generation: int | None = None
    current_attempt: int | None = None  # 1 = first try of the current stage
    attempt_limit: int | None = None  # the last attempt allowed before the run fails
    current_child: str | None = None  # the Job/PyTorchJob running the current stage attempt
    retry_after: str | None = None  # RFC 3339: the next attempt starts no earlier
    waiting_since: str | None = None  # RFC 3339: since when Score waits for the reward server
    resume_token: str | None = None  # the iterdpo.io/resume annotation value last acted on

    def iteration(self, number: int) -> IterationStatus | None:
        return next((it for it in self.iterations if it.iteration == number), None)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def to_json(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def of_resource(cls, body: dict) -> RunStatus:
        """The status of a custom resource as typed; fields iterdpo does not own are ignored."""
        raw = dict(body.get("status") or {})
        known = {f.alias or n for n, f in cls.model_fields.items()}
        return cls.model_validate({k: v for k, v in raw.items() if k in known})


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(
    conditions: list[Condition], type_: str, status: str, reason: str, message: str, now: str
) -> list[Condition]:
    """Replace the condition of `type_`; keep its transition time if its status did not change."""
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=since)
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]  # in place: an unchanged list compares equal


def _with_conditions(status: RunStatus, now: str, *changes: tuple[str, str, str, str]) -> list[Condition]:
    conditions = status.conditions
    for type_, value, reason, message in changes:
        conditions = set_condition(conditions, type_, value, reason, message, now)
    return conditions


def _no_failure(status: RunStatus) -> tuple[str, str, str, str]:
    """Failed=False, keeping the reason of the transition that made it so (SpecFixed, Resumed):
    a condition's reason says why it last changed, so a later stage does not overwrite it."""
    old = status.condition("Failed")
    if old is not None and old.status == "False":
        return ("Failed", "False", old.reason, old.message)
    return ("Failed", "False", "NoFailure", "")


def accepted(status: RunStatus, spec_hash: str, now: str) -> RunStatus:
    """The spec passed validation."""
    conditions = _with_conditions(status, now, ("Valid", "True", "SpecValid", "the spec passed validation"))
    return status.model_copy(update={"conditions": conditions, "spec_hash": spec_hash})


def extended(status: RunStatus, old_rounds: int, rounds: int, now: str) -> RunStatus:
    """spec.iterations was raised from `old_rounds` to `rounds` (the recipe otherwise the same):
    a Succeeded run runs the added rounds, from its last policy."""
    added = f"round {rounds}" if rounds == old_rounds + 1 else f"rounds {old_rounds + 1}-{rounds}"
    message = f"spec.iterations raised from {old_rounds} to {rounds}: {added} to run"
    conditions = _with_conditions(status, now, ("Succeeded", "False", "Extended", message))
    if status.phase != "Succeeded":
        return status.model_copy(update={"conditions": conditions})
    conditions = _with_conditions(status.model_copy(update={"conditions": conditions}), now,
                                  ("Progressing", "True", "Extended", message))  # fmt: skip
    return status.model_copy(update={"phase": "Running", "final_policy": None, "conditions": conditions})


def round_name(iteration: int) -> str:
    """How messages name a round: round 0 is what runs once before round 1 (a reward model)."""
    return "before round 1" if iteration == 0 else f"round {iteration}"


def running_message(iteration: int, stage: Stage) -> str:
    """Progressing's message while a stage runs (the operator appends why a pod cannot start)."""
    return f"{round_name(iteration)}: {stage} is running"


def stage_started(status: RunStatus, iteration: int, stage: Stage, policy: str, now: str) -> RunStatus:
    stage = Stage(stage)  # model_copy does not validate: a plain "Generate" becomes the enum here
    iterations = list(status.iterations)
    if status.iteration(iteration) is None:
        iterations.append(IterationStatus(iteration=iteration, policy=policy))
        iterations.sort(key=lambda it: it.iteration)
    conditions = _with_conditions(
        status,
        now,
        ("Progressing", "True", f"{stage}Running", running_message(iteration, stage)),
        _no_failure(status),
        ("Succeeded", "False", "InProgress", ""),
    )
    return status.model_copy(
        update={
            "phase": "Running",
            "current_iteration": iteration,
            "current_stage": stage,
            "iterations": iterations,
            "conditions": conditions,
        }
    )


def stage_finished(
    status: RunStatus,
    iteration: int,
    stage: Stage,
    figures: Figures,
    now: str,
    *,
    lineage: Lineage | None = None,
) -> RunStatus:
    current = status.iteration(iteration)
    if current is None:
        raise ValueError(f"round {iteration} has not started")
    # A stage run again (a retry) records its own paths anew: its new record wins over the old.
    old, new = current.lineage or Lineage(), lineage or Lineage()
    lineage = Lineage(read={**old.read, **new.read}, wrote={**old.wrote, **new.wrote})
    lineage = lineage if lineage.read or lineage.wrote else None
    updated = current.model_copy(update={STAGE_TABLE[stage].status_field: figures, "lineage": lineage})
    iterations = [updated if it.iteration == iteration else it for it in status.iterations]
    conditions = _with_conditions(
        status, now, ("Progressing", "True", f"{stage}Succeeded", f"{round_name(iteration)}: {stage} finished")
    )
    return status.model_copy(update={"iterations": iterations, "conditions": conditions})


def stage_failed(status: RunStatus, iteration: int, stage: Stage, reason: str, message: str, now: str) -> RunStatus:
    stage = Stage(stage)
    conditions = _with_conditions(
        status,
        now,
        ("Failed", "True", reason, f"{round_name(iteration)}: {stage} failed: {message}"),
        ("Progressing", "False", reason, f"{round_name(iteration)}: {stage} failed"),
    )
    return status.model_copy(
        update={"phase": "Failed", "current_iteration": iteration, "current_stage": stage, "conditions": conditions}
    )


def interrupted(status: RunStatus, now: str) -> RunStatus:
    """The runner was stopped; the run resumes from its last finished stage."""
    conditions = _with_conditions(
        status, now, ("Progressing", "False", "Interrupted", "the runner was stopped; start it again to resume")
    )
    return status.model_copy(update={"conditions": conditions})


def succeeded(status: RunStatus, final_policy: str, now: str) -> RunStatus:
    conditions = _with_conditions(
        status,
        now,
        ("Succeeded", "True", "AllRoundsFinished", f"{sum(it.iteration > 0 for it in status.iterations)} rounds finished"),
        ("Progressing", "False", "Finished", "all rounds finished"),
        _no_failure(status),
    )
    return status.model_copy(
        update={"phase": "Succeeded", "current_stage": None, "final_policy": final_policy, "conditions": conditions}
    )


def gate_stopped(status: RunStatus, gate: str, message: str, fail: bool, final_policy: str, now: str) -> RunStatus:
    """An evaluation gate (spec.evaluation.gates.<gate>) stopped the loop after a round: the
    run ends Succeeded with reason GateTripped, keeping `final_policy`, or Failed (gates.onTrip)."""
    text = f"stopped by gates.{gate}: {message}; final policy {final_policy}"
    if fail:
        conditions = _with_conditions(status, now, ("Failed", "True", "GateTripped", text),
                                      ("Progressing", "False", "GateTripped", text),
                                      ("Succeeded", "False", "GateTripped", text))  # fmt: skip
        phase = "Failed"
    else:
        conditions = _with_conditions(status, now, ("Succeeded", "True", "GateTripped", text),
                                      ("Progressing", "False", "GateTripped", text), _no_failure(status))  # fmt: skip
        phase = "Succeeded"
    return status.model_copy(
        update={"phase": phase, "current_stage": None, "final_policy": final_policy, "conditions": conditions}
    )


def finished(status: RunStatus, step, now: str) -> RunStatus:
    """The run's end as the planner's `Finished` says: all rounds, or a gate that tripped."""
    if step.gate is None:
        return succeeded(status, step.final_policy, now)
    g = step.gate
    return gate_stopped(status, g.gate, g.message, g.fail, step.final_policy, now)
