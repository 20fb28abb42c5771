"""The operator's Prometheus metrics (`iterdpo operator --metrics-port N`; the chart's
ServiceMonitor scrapes them). Fed only from what a reconcile wrote and posted."""

from __future__ import annotations

import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from iterdpo.stages import HEADLINE, STAGES
from iterdpo.status import RunStatus

RECONCILES = Counter("iterdpo_reconciles_total", "Reconcile passes of a run, by result.", ["result"])
EVENTS = Counter("iterdpo_events_total", "Events posted on runs, by reason (StageStarted, StageRetrying, ...).", ["reason"])
STAGE_SECONDS = Histogram(
    "iterdpo_stage_seconds", "Wall time of a finished stage (start-up included).", ["stage"],
    buckets=(10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
)  # fmt: skip
RUN_PHASE = Gauge("iterdpo_run_phase", "1 for the phase each run is in.", ["namespace", "run", "phase"])
MEAN_REWARD = Gauge("iterdpo_run_mean_reward", "Mean reward of each scored round.", ["namespace", "run", "round"])
# The Evaluate stage's figures (status.iterations[].evaluation), one gauge each: what the
# chart's Grafana dashboard draws per round (round 0 is the initial policy).
EVALUATION = {
    field: Gauge(f"iterdpo_evaluation_{field}", f"Evaluate: {help_}", ["namespace", "run", "round"])
    for field, help_ in (
        ("mean_reward", "mean reward under the run's reward model."),
        ("judge_reward", "mean reward under evaluation.judge."),
        ("win_rate", "win rate against round 0's responses."),
        ("win_rate_low", "lower end of the win rate's 95% Wilson interval."),
        ("win_rate_high", "upper end of the win rate's 95% Wilson interval."),
        ("length_mean", "mean response length in tokens."),
        ("length_ratio", "mean response length over round 0's."),
        ("truncated_share", "share of responses cut at the token limit."),
        ("kl", "estimated KL(policy || initial policy), nats per response."),
    )
}  # fmt: skip
_PER_ROUND = (MEAN_REWARD, *EVALUATION.values())

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def serve(port: int) -> None:
    start_http_server(port)


def record(namespace: str, name: str, before: RunStatus, after: RunStatus, event_reasons: list[str]) -> None:
    """What changed between the status read and the status written."""
    for reason in event_reasons:
        EVENTS.labels(reason).inc()
    with _lock:
        old = _phases.get((namespace, name))
        if old != after.phase:
            if old is not None:
                RUN_PHASE.remove(namespace, name, old)
            RUN_PHASE.labels(namespace, name, after.phase).set(1)
            _phases[(namespace, name)] = after.phase
    for it in after.iterations:
        done = before.iteration(it.iteration)
        for d in STAGES:
            figures = it.figures(d.stage)
            if figures is not None and (done is None or not done.stage_done(d.stage)):
                STAGE_SECONDS.labels(d.stage.value).observe(figures.seconds)
        if (mean_reward := HEADLINE.of(it)) is not None:
            MEAN_REWARD.labels(namespace, name, str(it.iteration)).set(mean_reward)
        evaluation = getattr(it, "evaluation", None)
        for field, gauge in EVALUATION.items() if evaluation is not None else ():
            if (value := getattr(evaluation, field)) is not None:
                gauge.labels(namespace, name, str(it.iteration)).set(value)


def forget(namespace: str, name: str) -> None:
    """A deleted run leaves no series behind."""
    with _lock:
        phase = _phases.pop((namespace, name), None)
    if phase is not None:
        RUN_PHASE.remove(namespace, name, phase)
    for gauge in _PER_ROUND:
        for labels in [s.labels for m in gauge.collect() for s in m.samples]:
            if labels.get("namespace") == namespace and labels.get("run") == name:
                gauge.remove(namespace, name, labels["round"])
