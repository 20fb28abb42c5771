"""Turn the summaries stage programs emit into the status figures of a round.

Shared by every backend: the local runner reads summaries from files, the
operator from termination messages; both measure `seconds` themselves (the
stage's wall time, start-up included) and pass it in.
"""

from __future__ import annotations

from pydantic import ValidationError

from iterdpo.status import GenerationFigures, ScoringFigures, Stage, TrainingFigures


class MissingSummary(ValueError):
    pass


def generation_figures(shard_summaries: list[dict], seconds: float) -> GenerationFigures:
    if not shard_summaries:
        raise MissingSummary("no generation shard left a summary")
    return GenerationFigures(
        prompts=sum(s["prompts"] for s in shard_summaries),
        samples=sum(s["samples"] for s in shard_summaries),
        prompts_left_out=sum(s["promptsLeftOut"] for s in shard_summaries),
        seconds=round(seconds, 1),
    )


def scoring_figures(summary: dict, seconds: float) -> ScoringFigures:
    return ScoringFigures(
        mean_reward=summary["meanReward"],
        min_reward=summary["minReward"],
        max_reward=summary["maxReward"],
        pairs=summary["pairs"],
        ties_dropped=summary["tiesDropped"],
        prompts_left_out=summary["promptsLeftOut"],
        seconds=round(seconds, 1),
    )


def training_figures(summary: dict, seconds: float) -> TrainingFigures:
    return TrainingFigures(
        loss=summary["loss"],
        reward_accuracy=summary["rewardAccuracy"],
        reward_margin=summary["rewardMargin"],
        checkpoint=summary["checkpoint"],
        seconds=round(seconds, 1),
    )


def stage_figures(stage: Stage, summaries: list[dict], seconds: float):
    """Figures of `stage` from the summaries of its job processes."""
    try:
        if stage == "Generate":
            return generation_figures(summaries, seconds)
        if len(summaries) != 1:
            raise MissingSummary(f"{stage} should leave one summary, found {len(summaries)}")
        if stage == "Score":
            return scoring_figures(summaries[0], seconds)
        return training_figures(summaries[0], seconds)
    except (KeyError, TypeError, ValidationError) as exc:
        raise MissingSummary(f"{stage} left a summary without the expected figures: {exc}") from None
