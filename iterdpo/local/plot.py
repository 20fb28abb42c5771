"""`iterdpo status NAME --plot FILE.png`: a run's rounds drawn from its status (matplotlib).

Four panels, one point per round (round 0 is the initial policy): the mean reward (the
training rounds' Score, and the held-out prompts under the run's reward model and the judge),
the win rate against round 0 with its 95% interval, the response length (mean and p90), and
the KL estimate. A run without `spec.evaluation` gets the reward panel only.
"""

from __future__ import annotations

import os
from pathlib import Path

from iterdpo.stages import HEADLINE
from iterdpo.status import RunStatus


class PlotError(RuntimeError):
    """What keeps a plot from being drawn, said in one line."""


FORMATS = ("png", "svg", "pdf")


def plot_format(path: Path) -> str:
    """The file's format, by its suffix; checked before anything is read or drawn."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise PlotError(f"{path}: the file name must end in .png, .svg or .pdf")
    return suffix


def plot_status(name: str, status: RunStatus, path: Path) -> Path:
    """Draw `status` into `path` (PNG, SVG or PDF, by its suffix), written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: a file is the only output
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib: pip install 'iterdpo[plot]'") from None
    suffix = plot_format(path)
    rounds = sorted(status.iterations, key=lambda it: it.iteration)
    evaluated = [it for it in rounds if getattr(it, "evaluation", None) is not None]
    scored = [(it.iteration, v) for it in rounds if (v := HEADLINE.of(it)) is not None]
    if not scored and not evaluated:
        raise PlotError(f"run {name} has no finished round to draw yet")

    panels = 4 if evaluated else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False, sharex=True)
    axes = axes[0]
    final = "" if not status.final_policy else ", final policy " + "/".join(Path(status.final_policy).parts[-3:])
    fig.suptitle(f"{name}: {status.phase}{final}", fontsize=10)
    first, last = rounds[0].iteration, rounds[-1].iteration
    axes[0].set_xlim(first - 0.25, last + 0.25)  # shared: every panel's rounds line up

    ax = axes[0]
    _line(ax, scored, "Score (training prompts)")
    for field, label in (("mean_reward", "held-out, run's reward model"), ("judge_reward", "held-out, judge")):
        _line(ax, [(it.iteration, v) for it in evaluated if (v := getattr(it.evaluation, field)) is not None], label)
    _finish(ax, "mean reward")

    if evaluated:
        ax = axes[1]
        won = [it for it in evaluated if it.evaluation.win_rate is not None]
        if won:
            x = [it.iteration for it in won]
            y = [it.evaluation.win_rate for it in won]
            low = [w - it.evaluation.win_rate_low for it, w in zip(won, y)]
            high = [it.evaluation.win_rate_high - w for it, w in zip(won, y)]
            ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=4, label=f"by the {won[0].evaluation.judged_by}")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_ylim(-0.03, 1.03)
        _finish(ax, "win rate vs round 0 (95% CI)")

        ax = axes[2]
        _line(ax, [(it.iteration, it.evaluation.length_mean) for it in evaluated], "mean")
        _line(ax, [(it.iteration, it.evaluation.length_p90) for it in evaluated], "p90")
        _finish(ax, "response tokens")

        ax = axes[3]
        _line(ax, [(it.iteration, it.evaluation.kl) for it in evaluated], "k1 estimate")
        _finish(ax, "KL(policy || initial), nats")

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=suffix, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _line(ax, points: list[tuple[int, float]], label: str) -> None:
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)


def _finish(ax, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("round", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
