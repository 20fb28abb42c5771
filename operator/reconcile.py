"""The operator's decisions, as a pure function: (run, status, what the API shows) ->
(new status, actions, events). Handlers only fetch, call `decide`, and apply.

Level-based: nothing depends on which event woke the operator. Each stage attempt has
exactly one child, named by `stage_children.child_name(run, iteration, stage, attempt)`; creating
it is idempotent (an existing child is that attempt), so an operator restarted at any
moment never makes two children for one attempt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from iterdpo.planner import Finished, next_step
from iterdpo.spec import MAX_RETRY_BACKOFF_SECONDS, IterativeDPORun
from iterdpo.stages import REWARD, STAGE_TABLE, Stage, SummaryError, run_servers, servers_of
from iterdpo.status import (
    Condition,
    RunStatus,
    accepted,
    extended,
    running_message,
    set_condition,
    stage_failed,
    stage_finished,
    finished,
    stage_started,
)
from iterdpo.yamlfile import clip
from iterdpo_operator import builders as b
from iterdpo_operator import stage_children as children
from iterdpo_operator.launchers import ChildRef, Outcome
from iterdpo_operator.validation import Reference

RESUME_ANNOTATION = "iterdpo.io/resume"


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


@dataclass(frozen=True)
class Target:
    """The stage attempt the run is at."""

    iteration: int
    stage: Stage
    policy: str
    attempt: int


def current_target(run: IterativeDPORun, status: RunStatus) -> Target | Finished:
    step = next_step(b.pod_run(run), status, spec_file=b.SPEC_FILE)
    if isinstance(step, Finished):
        return step
    same = (status.current_iteration, status.current_stage) == (step.iteration, step.stage)
    attempt = status.current_attempt if same and status.current_attempt else 1
    return Target(step.iteration, step.stage, step.policy, attempt)


def child_ref(run: IterativeDPORun, target: Target) -> ChildRef:
    return children.child_ref(run, target.stage, target.iteration, target.attempt)


def child_manifest(run: IterativeDPORun, target: Target, owner_uid: str) -> dict:
    return children.child_manifest(run, target.stage, target.iteration, target.attempt, owner_uid, policy=target.policy)


@dataclass(frozen=True)
class PodMessage:
    """A succeeded pod's termination message: the summary its program left (parsed by `decide`)."""

    pod: str
    text: str


# Why a pod cannot start, as the scheduler or the kubelet says it -> the kind of problem, which is
# the Event's reason. Each needs a change to the spec or the cluster to clear; the kubelet alternates
# ErrImagePull and ImagePullBackOff on each retry of a pull, so the two are one kind (one Event, not one per retry).
POD_PROBLEMS = {
    "Unschedulable": "Unschedulable",  # condition PodScheduled=False: no node fits (GPUs, selector, taints, claim)
    "ErrImagePull": "ErrImagePull", "ImagePullBackOff": "ErrImagePull",
    "ErrImageNeverPull": "ErrImageNeverPull", "InvalidImageName": "InvalidImageName",
    "CrashLoopBackOff": "CrashLoopBackOff",  # restartPolicy Always: the reward server
    "CreateContainerConfigError": "CreateContainerConfigError",  # e.g. a key missing from a Secret
    "CreateContainerError": "CreateContainerError",
}  # fmt: skip
POD_DETAIL = 300  # characters of the scheduler's or kubelet's message kept


@dataclass(frozen=True)
class PodProblem:
    """One pod that cannot start: its name, the reason (a key of POD_PROBLEMS) and the message."""

    pod: str
    reason: str
    message: str = ""

    @property
    def kind(self) -> str:
        return POD_PROBLEMS[self.reason]

    def line(self) -> str:
        """One short line: `pod NAME: REASON: message`."""
        detail = clip(" ".join(self.message.split()), POD_DETAIL)
        return f"pod {self.pod}: {self.reason}" + (f": {detail}" if detail else "")


_PROBLEM_LINE = re.compile(r"\bpod [a-z0-9][a-z0-9.-]*: (" + "|".join(POD_PROBLEMS) + r")\b.*")


def said_problem(condition: Condition | None, reason: str) -> re.Match | None:
    """The pod problem a condition of `reason` already reports (its `PodProblem.line()`), if any."""
    if condition is None or condition.reason != reason:
        return None
    return _PROBLEM_LINE.search(condition.message)


def _waiting_reason(statuses: list[dict]) -> tuple[str, str] | None:
    """(reason, message) of the first container waiting for a reason of POD_PROBLEMS (not ContainerCreating)."""
    for cs in statuses:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in POD_PROBLEMS:
            return waiting["reason"], waiting.get("message") or ""
    return None


def pod_problem(pods: list[dict]) -> PodProblem | None:
    """The first pod (by name) that cannot start, from pods as the API serves them (JSON): the
    scheduler's Unschedulable condition, else a container's waiting reason of POD_PROBLEMS.
    Finished and deleted pods do not count."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        status = pod.get("status") or {}
        if pod["metadata"].get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
            continue
        name = pod["metadata"]["name"]
        for c in status.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return PodProblem(name, "Unschedulable", c.get("message") or "")
        found = _waiting_reason((status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []))
        if found:
            return PodProblem(name, *found)
    return None


@dataclass(frozen=True)
class Observed:
    """What the API shows for the target: its child, and the model servers it calls."""

    child_exists: bool = False
    outcome: Outcome | None = None
    summaries: list[PodMessage] = field(default_factory=list)  # one per succeeded pod (per Job index)
    failure_detail: str = ""  # the failed pod's termination message (log tail), for the condition
    child_suspended: bool = False
    servers_available: frozenset[str] = frozenset()  # keys of the target's servers whose Deployment is Available
    missing: tuple[Reference, ...] = ()  # objects the spec names that are not there (looked up while no child exists)
    pod_problem: PodProblem | None = None  # a pod of the running child that cannot start
    server_problem: PodProblem | None = None  # a server pod that cannot start (while the target waits for it)


# -- actions and events ------------------------------------------------------------------
@dataclass(frozen=True)
class Create:
    manifest: dict  # created if absent; an existing object of that name is left as it is


@dataclass(frozen=True)
class Ensure:
    manifest: dict  # created if absent; its pod template (a ConfigMap: its data) replaced if it differs (template-hash annotation)


@dataclass(frozen=True)
class Scale:
    name: str  # a model server's Deployment
    replicas: int


@dataclass(frozen=True)
class Patch:
    ref: ChildRef
    patch: dict


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: RunStatus
    actions: list = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    again: bool = False  # the state moved on: decide once more right away
    requeue_after: float | None = None  # wake up after this many seconds (back-off, waits)


# -- the decision ------------------------------------------------------------------------
def invalid(status: RunStatus, message: str, generation: int | None, now: datetime) -> RunStatus:
    """A spec that cannot run: Valid=False naming the fields; nothing is created."""
    conditions = set_condition(status.conditions, "Valid", "False", "InvalidSpec", message, rfc3339(now))
    conditions = set_condition(conditions, "Progressing", "False", "InvalidSpec", "fix the spec to continue", rfc3339(now))
    if status.phase == "Succeeded":
        return status.model_copy(update={"conditions": conditions, "observed_generation": generation})
    conditions = set_condition(conditions, "Failed", "True", "InvalidSpec", "the spec is invalid: see the Valid condition", rfc3339(now))
    phase = "Failed"
    return status.model_copy(update={"conditions": conditions, "phase": phase, "observed_generation": generation})


def invalid_decision(status: RunStatus, message: str, generation: int | None, now: datetime) -> Decision:
    """`invalid`, with a Warning Event the first time (one line: `kubectl get events` shows one per row)."""
    new = invalid(status, message, generation, now)
    first = new.condition("Valid") != status.condition("Valid")
    return Decision(new, events=[Event("Warning", "InvalidSpec", "; ".join(message.splitlines()))] if first else [])


def _warm(run: IterativeDPORun) -> set[str]:
    """The servers kept up between the stages that call them: the reward's with spec.kubernetes.keepRewardWarm."""
    return {REWARD} if run.spec.kubernetes.keep_reward_warm else set()


def _server_actions(run: IterativeDPORun, owner_uid: str, up: set[str], new_token: str) -> list:
    """Every model server of the run, created if absent, scaled to 1 if its key is in `up`, else to 0."""
    actions = []
    if run.spec.kubernetes.reward_token_secret is None:
        actions.append(Create(b.reward_token_secret(run, new_token, owner_uid)))  # if absent: the first token stays
    for server in run_servers(run):
        replicas = 1 if server.key in up else 0
        # Ensure the Deployment: a changed image or resources (spec.kubernetes may change mid-run) rolls the server.
        actions += [Ensure(m) if m["kind"] == "Deployment" else Create(m)
                    for m in children.server_objects(run, server, replicas, owner_uid)]  # fmt: skip
        actions.append(Scale(b.server_name(run, server), replicas))
    return actions


def _scaled_down(run: IterativeDPORun, keep: set[str] = frozenset()) -> list:
    """Scale to zero every model server of the run except those in `keep` (and the warm ones)."""
    keep = set(keep) | _warm(run)
    return [Scale(b.server_name(run, s), 0) for s in run_servers(run) if s.key not in keep]


def _seconds(outcome: Outcome) -> float:
    start, end = parse_time(outcome.start_time), parse_time(outcome.completion_time)
    return (end - start).total_seconds() if start and end else 0.0


def _figures(run: IterativeDPORun, target: Target, observed: Observed):
    """The stage's figures and lineage from its pods' summaries (SummaryError names the pod at fault)."""
    d = STAGE_TABLE[target.stage]
    summaries = [d.summary.parse(m.text, source=f"pod {m.pod}") for m in observed.summaries]
    return d.record(summaries, _seconds(observed.outcome), run)


def decide(run: IterativeDPORun, status: RunStatus, *, owner_uid: str, generation: int | None,
           annotations: dict[str, str], target: Target | Finished, observed: Observed, now: datetime,
           new_token: str) -> Decision:  # fmt: skip
    """`new_token`: a fresh random token, used only if the run's token Secret does not exist yet."""
    t = rfc3339(now)
    st = status.model_copy(update={"observed_generation": generation})
    events: list[Event] = []

    spec_hash = run.spec_hash()
    old_rounds = run.extended_from(st.spec_hash) if st.spec_hash not in (None, spec_hash) else None
    if old_rounds is not None:  # spec.iterations raised: the added rounds run from the last policy
        st = extended(st, old_rounds, run.spec.iterations, t)
        events.append(Event("Normal", "Extended", st.condition("Succeeded").message))
    elif st.spec_hash is not None and st.spec_hash != spec_hash:
        message = ("the recipe changed after the run started (only spec.suspend, spec.kubernetes except its volume "
                   "and launcher, and spec.iterations, raised with a prompt set per added round, may change); "
                   "revert the change, or delete the run and create a new one")  # fmt: skip
        if st.condition("Valid") is not None and st.condition("Valid").reason != "SpecChanged":
            events.append(Event("Warning", "SpecChanged", message))
        conditions = set_condition(st.conditions, "Valid", "False", "SpecChanged", message, t)
        conditions = set_condition(conditions, "Progressing", "False", "SpecChanged", "stopped: the recipe changed", t)
        return Decision(st.model_copy(update={"conditions": conditions}), events=events)
    st = accepted(st, spec_hash, t)
    failed = st.condition("Failed")
    if failed is not None and failed.status == "True" and failed.reason == "InvalidSpec":  # the spec was fixed
        conditions = set_condition(st.conditions, "Failed", "False", "SpecFixed", "", t)
        st = st.model_copy(update={"conditions": conditions, "phase": "Running" if st.current_stage else "Pending"})

    resume = annotations.get(RESUME_ANNOTATION)
    if st.phase == "Failed" and resume and resume != st.resume_token and st.current_attempt:
        attempt = st.current_attempt + 1
        conditions = set_condition(st.conditions, "Failed", "False", "Resumed", f"resumed ({RESUME_ANNOTATION}={resume})", t)
        st = st.model_copy(update={"phase": "Running", "resume_token": resume, "current_attempt": attempt,
                                   "attempt_limit": attempt + run.spec.kubernetes.stage_retries,
                                   "retry_after": None, "conditions": conditions})  # fmt: skip
        events.append(Event("Normal", "Resumed", f"round {st.current_iteration}: {st.current_stage} resumes as attempt {attempt}"))
        return Decision(st, events=events, again=True)
    if resume and resume != st.resume_token:  # asked while nothing had failed: noted, not kept for later
        st = st.model_copy(update={"resume_token": resume})
    if st.phase == "Failed":
        return Decision(st, actions=_scaled_down(run))

    if isinstance(target, Finished):
        actions = _scaled_down(run)
        if st.phase != "Succeeded":
            st = finished(st, target, t).model_copy(update={"current_attempt": None, "current_child": None})
            if target.gate is not None:  # an evaluation gate stopped the loop: say which, with its figures
                events.append(Event("Warning" if target.gate.fail else "Normal", "GateTripped",
                                    st.condition("Progressing").message))  # fmt: skip
            else:
                events.append(Event("Normal", "Succeeded",
                                    f"{run.spec.iterations} rounds finished; final policy {target.final_policy}"))  # fmt: skip
        return Decision(st, actions, events)

    ref = child_ref(run, target)
    actions: list = [Ensure(b.spec_config_map(run, owner_uid))]  # current: new pods read the grown spec

    if run.spec.suspend:
        mid_stage = observed.child_exists and not (observed.outcome and observed.outcome.done)
        if mid_stage and not observed.child_suspended:
            actions.append(Patch(ref, children.child_kind(run, target.stage).suspend_patch(True)))
        actions += [Scale(b.server_name(run, s), 0) for s in run_servers(run)]
        if st.phase != "Suspended":
            where = (f"suspended during round {target.iteration}'s {target.stage}: {ref.name} is suspended and continues"
                     if mid_stage else f"suspended between stages: round {target.iteration}'s {target.stage} starts")  # fmt: skip
            conditions = set_condition(st.conditions, "Suspended", "True", "SpecSuspend", "spec.suspend is true", t)
            conditions = set_condition(conditions, "Progressing", "False", "Suspended", f"{where} when spec.suspend is false", t)
            st = st.model_copy(update={"phase": "Suspended", "conditions": conditions})
            events.append(Event("Normal", "Suspended", f"round {target.iteration}: {target.stage} suspended"))
        return Decision(st, actions, events)
    if (st.condition("Suspended") and st.condition("Suspended").status == "True") or st.phase == "Suspended":
        conditions = set_condition(st.conditions, "Suspended", "False", "SpecResumed", "spec.suspend is false", t)
        st = st.model_copy(update={"conditions": conditions, "phase": "Running" if st.current_stage else "Pending"})
        events.append(Event("Normal", "Unsuspended", f"round {target.iteration}: {target.stage} continues"))
    if observed.child_suspended:
        actions.append(Patch(ref, children.child_kind(run, target.stage).suspend_patch(False)))

    calls = servers_of(run, STAGE_TABLE[target.stage])
    actions += _server_actions(run, owner_uid, {s.key for s in calls} | _warm(run), new_token)
    same_attempt = st.current_attempt == target.attempt and st.attempt_limit
    limit = st.attempt_limit if same_attempt else target.attempt + run.spec.kubernetes.stage_retries
    bookkeeping = {"current_attempt": target.attempt, "attempt_limit": limit, "current_child": ref.name}

    if not observed.child_exists:
        retry_after = parse_time(st.retry_after)
        if retry_after and now < retry_after:
            return Decision(st, actions, events, requeue_after=(retry_after - now).total_seconds())
        if observed.missing:  # nothing is created, not even the reward server: its pods need them too
            return Decision(_references_missing(run, st, status.condition("Valid"), target, observed.missing, events, t),
                            events=events)  # fmt: skip
        waiting_for = [s for s in calls if s.key not in observed.servers_available]
        if waiting_for:  # the first server not up yet; the problem kube.py saw is that server's
            server, since = waiting_for[0], parse_time(st.waiting_since) or now
            name, deadline = b.server_name(run, server), server.startup_timeout_seconds(run.spec)
            problem = observed.server_problem
            if (now - since).total_seconds() <= deadline:
                waiting = f"round {target.iteration}: waiting for Deployment {name} to be available"
                st = _pod_problem_said(st, f"WaitingFor{server.key.capitalize()}Server", waiting, problem, events, t)
                st = st.model_copy(update={"waiting_since": rfc3339(since)})
                return Decision(st, actions, events, requeue_after=2.0)
            failure = (f"Deployment {name} was not Available within {deadline:g} s "
                       f"({server.spec_field}.startupTimeoutSeconds): "
                       + (problem.line() if problem else "see its pods' events and logs"))  # fmt: skip
            st = st.model_copy(update={**bookkeeping, "waiting_since": None})
            return _failed_attempt(run, st, target, limit, failure, actions, events, now)
        actions.append(Create(child_manifest(run, target, owner_uid)))
        st = stage_started(st, target.iteration, target.stage, target.policy, t).model_copy(
            update={**bookkeeping, "retry_after": None, "waiting_since": None})
        events.append(Event("Normal", "StageStarted", f"round {target.iteration}: {target.stage} attempt {target.attempt}: {ref.kind} {ref.name}"))
        return Decision(st, actions, events)

    outcome = observed.outcome or Outcome(False)
    if not outcome.done:
        progressing = st.condition("Progressing")  # after a suspension or a fixed spec: running again
        if st.current_child != ref.name or st.phase != "Running" or not progressing or progressing.reason != f"{target.stage}Running":
            st = stage_started(st, target.iteration, target.stage, target.policy, t).model_copy(update=bookkeeping)
        return Decision(_running(st, target, observed.pod_problem, events, t), actions, events)

    failure = f"{ref.kind} {ref.name}: {outcome.reason}" + (f": {outcome.message}" if outcome.message else "")
    if outcome.succeeded:
        try:
            figures, lineage = _figures(run, target, observed)
        except SummaryError as exc:
            failure = f"{ref.kind} {ref.name} succeeded but {exc}"
        else:
            st = stage_finished(st, target.iteration, target.stage, figures, t, lineage=lineage).model_copy(
                update={"current_attempt": None, "attempt_limit": None, "current_child": None, "retry_after": None})
            events.append(Event("Normal", "StageSucceeded", f"round {target.iteration}: {target.stage} finished ({ref.name})"))
            if calls:  # its servers go down (but the warm ones) while the next stage starts
                actions = [a for a in actions if not isinstance(a, Scale)] + _scaled_down(run)
            return Decision(st, actions, events, again=True)
    if children.child_kind(run, target.stage).timed_out(outcome):  # past its activeDeadlineSeconds
        key = STAGE_TABLE[target.stage].folder
        failure += (f"; it ran longer than spec.kubernetes.stageTimeoutSeconds.{key} = "
                    f"{children.stage_timeout(run, target.stage)} s (pending pods count)")  # fmt: skip
    if observed.failure_detail:
        failure += f"; {observed.failure_detail}"
    elif said := said_problem(st.condition("Progressing"), f"{target.stage}Running"):  # its pods never started
        failure += f"; last seen: {said.group(0)}"

    return _failed_attempt(run, st, target, limit, failure, actions, events, now)


def _references_missing(run: IterativeDPORun, st: RunStatus, valid_before: Condition | None, target: Target,
                        missing: tuple[Reference, ...], events: list[Event], t: str) -> RunStatus:  # fmt: skip
    """Valid=False naming each missing object, Progressing=False, one Warning Event per new message.
    Not Failed: kube.py looks again on every pass, and the run goes on by itself once they exist."""
    message = "; ".join(ref.not_found(run.metadata.namespace or "default") for ref in missing)
    # `accepted` set Valid=True earlier in this pass: start from the condition as it was read, so
    # its lastTransitionTime stays put while the objects are missing (no status write per pass).
    conditions = [valid_before if c.type == "Valid" and valid_before is not None else c for c in st.conditions]
    conditions = set_condition(conditions, "Valid", "False", "ReferenceNotFound", message, t)
    conditions = set_condition(conditions, "Progressing", "False", "ReferenceNotFound",
                               f"round {target.iteration}: {target.stage} starts once every object the Valid "
                               "condition names exists", t)  # fmt: skip
    if valid_before is None or (valid_before.reason, valid_before.message) != ("ReferenceNotFound", message):
        events.append(Event("Warning", "ReferenceNotFound", message))
    return st.model_copy(update={"conditions": conditions, "waiting_since": None})


def _pod_problem_said(st: RunStatus, reason: str, doing: str, problem: PodProblem | None, events: list[Event],
                      t: str) -> RunStatus:  # fmt: skip
    """Progressing=True (`reason`): `doing`, then why a pod cannot start, if one cannot. A Warning
    Event (reason: the problem's kind) only when that kind is new, not on every pass."""
    message = f"{doing}; {problem.line()}" if problem else doing
    if problem is not None:
        said = said_problem(st.condition("Progressing"), reason)
        if said is None or POD_PROBLEMS[said.group(1)] != problem.kind:
            events.append(Event("Warning", problem.kind, message))
    return st.model_copy(update={"conditions": set_condition(st.conditions, "Progressing", "True", reason, message, t)})


def _running(st: RunStatus, target: Target, problem: PodProblem | None, events: list[Event], t: str) -> RunStatus:
    """A running stage's Progressing message: `round N: Stage is running`, or why its pods cannot start."""
    reason = f"{target.stage}Running"
    progressing = st.condition("Progressing")
    if problem is None and (progressing is None or progressing.reason != reason or said_problem(progressing, reason) is None):
        return st  # as stage_started left it
    return _pod_problem_said(st, reason, running_message(target.iteration, target.stage), problem, events, t)


def _failed_attempt(run: IterativeDPORun, st: RunStatus, target: Target, limit: int, failure: str,
                    actions: list, events: list[Event], now: datetime) -> Decision:  # fmt: skip
    """Attempt `target.attempt` failed: schedule the next one after a back-off, or fail the run."""
    t = rfc3339(now)
    if target.attempt < limit:
        tries = max(1, target.attempt - (limit - run.spec.kubernetes.stage_retries) + 1)  # since the budget began
        backoff = min(MAX_RETRY_BACKOFF_SECONDS, run.spec.kubernetes.retry_backoff_seconds * 2 ** min(tries - 1, 32))
        nxt = target.attempt + 1
        conditions = set_condition(st.conditions, "Progressing", "True", "Retrying",
                                   f"round {target.iteration}: {target.stage} attempt {target.attempt} failed, attempt {nxt} "
                                   f"in {backoff:.0f}s: {failure}", t)  # fmt: skip
        st = st.model_copy(update={"current_attempt": nxt, "attempt_limit": limit, "conditions": conditions,
                                   "retry_after": rfc3339(now + timedelta(seconds=backoff))})  # fmt: skip
        events.append(Event("Warning", "StageRetrying", f"round {target.iteration}: {target.stage} attempt {target.attempt} failed: {failure}"))
        return Decision(st, actions, events, requeue_after=backoff)
    st = stage_failed(st, target.iteration, target.stage, "StageFailed", f"{failure} (attempt {target.attempt} of {limit})", t)
    st = st.model_copy(update={"current_attempt": target.attempt, "attempt_limit": limit, "current_child": child_ref(run, target).name})
    events.append(Event("Warning", "StageFailed", f"round {target.iteration}: {target.stage} failed after {target.attempt} attempts: {failure}"))
    kept = [a for a in actions if not isinstance(a, (Create, Ensure, Scale))]
    return Decision(st, kept + _scaled_down(run), events)
