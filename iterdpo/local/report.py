"""Human-readable lines and tables of a run's status (pure formatting)."""

from __future__ import annotations

from iterdpo.stages import HEADLINE, STAGES, Column, StageDef, When
from iterdpo.status import RunStatus


def reward_trend(status: RunStatus) -> str | None:
    """'round 1 mean reward -0.41 -> round 3 +0.87', from the first and last scored rounds."""
    scored = [(it.iteration, v) for it in status.iterations if (v := HEADLINE.of(it)) is not None]
    if len(scored) < 2:
        return None
    (first, a), (last, b) = scored[0], scored[-1]
    return f"round {first} mean reward {a:+.3f} -> round {last} {b:+.3f}"


def _columns(status: RunStatus) -> tuple[Column, ...]:
    """round, every stage's columns in run order, then each stage's seconds; a stage that runs
    only before round 1 (round 0) is shown when the run has it."""
    shown = [d for d in STAGES if _shown(d, status)]
    return (
        Column("round", lambda it: str(it.iteration)),
        *(c for d in shown for c in d.columns),
        *(Column(d.seconds_column, lambda it, d=d: _seconds(it.figures(d.stage))) for d in shown),
    )


def _shown(d: StageDef, status: RunStatus) -> bool:
    return bool(d.when & When.EVERY_ROUND) or any(it.figures(d.stage) is not None for it in status.iterations)


def _seconds(figures) -> str:
    return "-" if figures is None else f"{figures.seconds:.0f}"


def status_table(name: str, status: RunStatus, iterations: int | None = None) -> str:
    columns = _columns(status)
    rows = [[c.title for c in columns]] + [[c.cell(it) for c in columns] for it in status.iterations]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    stage = f", {status.current_stage}" if status.current_stage and status.phase != "Succeeded" else ""
    rounds = f" of {iterations}" if iterations else ""
    head = f"run {name}: {status.phase} (round {'-' if status.current_iteration is None else status.current_iteration}{rounds}{stage})"
    failed = status.condition("Failed")
    extra = []
    if failed is not None and failed.status == "True":
        extra.append(f"failed: {failed.message.splitlines()[0]}")
    succeeded = status.condition("Succeeded")
    if succeeded is not None and succeeded.status == "True" and succeeded.reason == "GateTripped":
        extra.append(succeeded.message.splitlines()[0])  # "stopped by gates.<gate>: round N: ..."
    if status.final_policy:
        extra.append(f"final policy: {status.final_policy}")
    trend = reward_trend(status)
    if trend:
        extra.append(trend)
    return "\n".join([head, *lines, *extra])
