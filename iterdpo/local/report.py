"""Human-readable lines and tables of a run's status (pure formatting)."""

from __future__ import annotations

from iterdpo.status import GenerationFigures, RunStatus, ScoringFigures, TrainingFigures


def stage_line(stage: str, figures) -> str:
    if isinstance(figures, GenerationFigures):
        return (
            f"{figures.prompts} prompts -> {figures.samples} samples "
            f"({figures.prompts_left_out} prompts left out) in {figures.seconds:.1f}s"
        )
    if isinstance(figures, ScoringFigures):
        return (
            f"mean reward {_signed(figures.mean_reward)} (min {_signed(figures.min_reward)}, "
            f"max {_signed(figures.max_reward)}), "
            f"{figures.pairs} pairs, {figures.ties_dropped} ties dropped, "
            f"{figures.prompts_left_out} prompts left out in {figures.seconds:.1f}s"
        )
    if isinstance(figures, TrainingFigures):
        return (
            f"loss {figures.loss:.4f}, reward accuracy {figures.reward_accuracy:.2f}, "
            f"reward margin {figures.reward_margin:+.4f} in {figures.seconds:.1f}s -> {figures.checkpoint}"
        )
    raise TypeError(f"no line for {stage} figures {figures!r}")


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def reward_trend(status: RunStatus) -> str | None:
    """'round 1 mean reward -0.41 -> round 3 +0.87', from the first and last scored rounds."""
    scored = [it for it in status.iterations if it.scoring is not None and it.scoring.mean_reward is not None]
    if len(scored) < 2:
        return None
    first, last = scored[0], scored[-1]
    return (
        f"round {first.iteration} mean reward {first.scoring.mean_reward:+.3f} -> "
        f"round {last.iteration} {last.scoring.mean_reward:+.3f}"
    )


_COLUMNS = (
    ("round", lambda it: str(it.iteration)),
    ("prompts", lambda it: _f(it.generation, "prompts")),
    ("samples", lambda it: _f(it.generation, "samples")),
    ("mean reward", lambda it: _f(it.scoring, "mean_reward", "{:+.3f}")),
    ("min", lambda it: _f(it.scoring, "min_reward", "{:+.3f}")),
    ("max", lambda it: _f(it.scoring, "max_reward", "{:+.3f}")),
    ("pairs", lambda it: _f(it.scoring, "pairs")),
    ("ties", lambda it: _f(it.scoring, "ties_dropped")),
    ("left out", lambda it: _left_out(it)),
    ("loss", lambda it: _f(it.training, "loss", "{:.4f}")),
    ("acc", lambda it: _f(it.training, "reward_accuracy", "{:.2f}")),
    ("margin", lambda it: _f(it.training, "reward_margin", "{:+.4f}")),
    ("gen s", lambda it: _f(it.generation, "seconds", "{:.0f}")),
    ("score s", lambda it: _f(it.scoring, "seconds", "{:.0f}")),
    ("train s", lambda it: _f(it.training, "seconds", "{:.0f}")),
)


def _f(figures, field: str, fmt: str = "{}") -> str:
    value = None if figures is None else getattr(figures, field)
    return "-" if value is None else fmt.format(value)


def _left_out(it) -> str:
    if it.generation is None:
        return "-"
    gen = it.generation.prompts_left_out
    return str(gen if it.scoring is None else it.scoring.prompts_left_out)


def status_table(name: str, status: RunStatus, iterations: int | None = None) -> str:
    rows = [[title for title, _ in _COLUMNS]] + [[cell(it) for _, cell in _COLUMNS] for it in status.iterations]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    stage = f", {status.current_stage}" if status.current_stage and status.phase != "Succeeded" else ""
    rounds = f" of {iterations}" if iterations else ""
    head = f"run {name}: {status.phase} (round {status.current_iteration or '-'}{rounds}{stage})"
    failed = status.condition("Failed")
    extra = []
    if failed is not None and failed.status == "True":
        extra.append(f"failed: {failed.message.splitlines()[0]}")
    if status.final_policy:
        extra.append(f"final policy: {status.final_policy}")
    trend = reward_trend(status)
    if trend:
        extra.append(trend)
    return "\n".join([head, *lines, *extra])
