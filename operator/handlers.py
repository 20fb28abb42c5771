"""kopf handlers: thin. Whatever wakes the operator (the run changing, a child changing, a
run's own next look), it calls `reconcile(namespace, name)`: read the run, decide (pure),
apply, write the status if it changed. Importing this module registers the handlers with
kopf; only `iterdpo operator` imports it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from concurrent.futures import Executor
from datetime import datetime, timezone

import kopf

from iterdpo.planner import Finished
from iterdpo.spec import API_VERSION
from iterdpo.status import RunStatus
from iterdpo_operator.builders import RUN_LABEL
from iterdpo_operator import metrics
from iterdpo_operator.defaults import defaults_from_env, with_defaults
from iterdpo_operator.kube import PLURAL, Conflict, Kube, load_config
from iterdpo_operator.reconcile import RESUME_ANNOTATION, Decision, Observed, current_target, decide, invalid_decision
from iterdpo_operator.validation import InvalidRun, validate_resource

log = logging.getLogger("iterdpo.operator")
GROUP, VERSION = API_VERSION.split("/")
TIMER_INTERVAL = float(os.environ.get("ITERDPO_RECONCILE_INTERVAL", "5"))  # seconds: the level-based safety net
SOONEST_LOOK = 0.5  # seconds: the earliest next look a decision may ask for
DEFAULTS = defaults_from_env()  # read once, at start: a bad value stops the operator, naming it
MAX_PASSES = 12  # per reconcile: status conflicts and stage transitions taken at once

_kube: Kube | None = None
_executor: Executor | None = None  # kopf's, for the blocking reconciles of the per-run loop
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube(load_config())
    return _kube


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def _decide_once(k: Kube, body: dict, status: RunStatus, now: datetime) -> Decision:
    meta = body["metadata"]
    try:
        run = with_defaults(validate_resource(body), DEFAULTS)
    except InvalidRun as exc:
        return invalid_decision(status, str(exc), meta.get("generation"), now)
    target = current_target(run, status)
    observed = Observed() if isinstance(target, Finished) else k.observe(run, target)
    decision = decide(run, status, owner_uid=meta["uid"], generation=meta.get("generation"),
                      annotations=meta.get("annotations") or {}, target=target, observed=observed, now=now,
                      new_token=secrets.token_urlsafe(32))  # fmt: skip
    k.apply(run, decision.actions)
    return decision


def _same_basis(read: dict, fresh: dict) -> bool:
    """Whether what a decision was based on (spec, status, generation, the resume
    annotation) is unchanged in `fresh`, though its resourceVersion moved on."""
    def basis(body: dict) -> tuple:
        meta = body["metadata"]
        return (body.get("spec"), body.get("status"), meta.get("generation"),
                (meta.get("annotations") or {}).get(RESUME_ANNOTATION))  # fmt: skip
    return basis(read) == basis(fresh)


def _write_status(k: Kube, body: dict, status: RunStatus) -> bool:
    """Write the status under optimistic concurrency. A conflict caused by an unrelated
    change (an annotation, a label) is retried on the fresh resourceVersion; a conflict on
    anything the decision read returns False, and the caller decides again."""
    meta = body["metadata"]
    for _ in range(MAX_PASSES):
        try:
            k.write_status(body, status.to_json())
            return True
        except Conflict:
            fresh = k.read_run(meta["namespace"], meta["name"])
            if fresh is None or not _same_basis(body, fresh):
                return False
            body = fresh
    return False


def _log_decision(namespace: str, name: str, before: RunStatus, decision: Decision) -> None:
    """One INFO line per change a decision makes: where the run now is, and each Event (a stage
    started, finished with its figures, is retried in T s, failed because ...)."""
    after = decision.status
    where = (after.phase, after.current_iteration, after.current_stage, after.current_attempt)
    if where != (before.phase, before.current_iteration, before.current_stage, before.current_attempt):
        stage = f", round {after.current_iteration} {after.current_stage}" if after.current_stage else ""
        attempt = f" attempt {after.current_attempt}" if after.current_attempt else ""
        log.info("run %s/%s: %s%s%s", namespace, name, after.phase, stage, attempt)
    for e in decision.events:
        (log.warning if e.type == "Warning" else log.info)("run %s/%s: %s: %s", namespace, name, e.reason, e.message)


def reconcile(namespace: str, name: str) -> float | None:
    """Bring the run one or more steps forward; returns seconds until it wants a look again
    (None: no particular time; the run was deleted if it is gone)."""
    k = kube()
    with _lock(namespace, name):
        for _ in range(MAX_PASSES):
            body = k.read_run(namespace, name)
            if body is None:
                metrics.forget(namespace, name)
                return None  # deleted: its children go with it (ownerReferences)
            status = RunStatus.of_resource(body)
            decision = _decide_once(k, body, status, datetime.now(timezone.utc))
            if decision.status != status and not _write_status(k, body, decision.status):
                log.info("run %s/%s changed while reconciling; deciding again", namespace, name)
                metrics.RECONCILES.labels("conflict").inc()
                continue
            metrics.RECONCILES.labels("ok").inc()
            _log_decision(namespace, name, status, decision)
            for e in decision.events:
                k.event(body, e.type, e.reason, e.message)
            metrics.record(namespace, name, status, decision.status, [e.reason for e in decision.events])
            if not decision.again:
                return decision.requeue_after
    return 0.0


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    # kopf's own bookkeeping in iterdpo.io annotations; status is iterdpo's alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="iterdpo.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="iterdpo.io", key="last-handled-configuration")
    settings.posting.enabled = False  # iterdpo posts its own Events (Kube.event)
    settings.watching.server_timeout = 120
    global _executor
    _executor = settings.execution.executor


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def on_run(namespace: str, name: str, **_) -> None:
    reconcile(namespace, name)


def next_look(requeue_after: float | None) -> float:
    """Seconds until a run's own next reconcile: what the decision asked for, bounded by the
    interval (the safety net) and SOONEST_LOOK (no busy loop)."""
    if requeue_after is None:
        return TIMER_INTERVAL
    return min(TIMER_INTERVAL, max(SOONEST_LOOK, requeue_after))


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=30)
async def look_again(namespace: str, name: str, **_) -> None:
    """Each run's own loop, for what no event announces (a retry's back-off ending, the reward
    server's start-up deadline): a reconcile every TIMER_INTERVAL seconds, or sooner when the
    last decision asked (Decision.requeue_after). Stopped by kopf when the run is deleted."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            delay = await loop.run_in_executor(_executor, reconcile, namespace, name)
        except Exception:  # an API hiccup: the next look retries, as a timer would
            log.exception("reconcile of %s/%s failed; trying again in %.0f s", namespace, name, TIMER_INTERVAL)
            delay = None
        await asyncio.sleep(next_look(delay))


@kopf.on.event("batch", "v1", "jobs", labels={RUN_LABEL: kopf.PRESENT})
@kopf.on.event("apps", "v1", "deployments", labels={RUN_LABEL: kopf.PRESENT})
@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels={RUN_LABEL: kopf.PRESENT})
def on_child(namespace: str, labels: dict, **_) -> None:
    reconcile(namespace, labels[RUN_LABEL])


__all__ = ["PLURAL", "reconcile"]
