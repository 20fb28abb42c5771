"""Reward kinds `composite` (a weighted sum of terms, each a kind of its own) and `length`.

A composite loads each term's scorer from the registry as if it were served alone (its
model, template and settings), scores every item with each, and sums weight x score. An
item that some term cannot score has no score, with that term's reason. Each term's raw
score is a detail (`<name>`), and so is each of its own details (`<name>.<detail>`): the
annotator reports their means per round, so a user sees which term moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from iterdpo.spec import RewardComponent
from iterdpo_reward_server.scoring import ScoreInput, ScoreResult
from iterdpo_reward_server.settings import Settings


class LengthScorer:
    """The response's length in characters: the term of a length penalty."""

    @staticmethod
    def preflight(settings: Settings) -> None:
        return None

    @classmethod
    def load(cls, settings: Settings) -> LengthScorer:
        return cls()

    def score(self, items: Sequence[ScoreInput]) -> ScoreResult:
        return ScoreResult([float(len(item.response)) for item in items], 0)


def term_settings(settings: Settings, component: RewardComponent) -> Settings:
    """The server's settings as if it served this term alone."""
    return settings.model_copy(update={"reward": component.as_reward(settings.reward)})


@dataclass(frozen=True)
class Term:
    name: str
    weight: float
    scorer: object


class CompositeScorer:
    def __init__(self, terms: list[Term]):
        self.terms = terms

    @staticmethod
    def preflight(settings: Settings) -> None:
        from iterdpo_reward_server.scorers import ScorerError, scorer_kind

        for i, c in enumerate(settings.reward.components or []):
            try:
                scorer_kind(c.kind).preflight(term_settings(settings, c))
            except ScorerError as exc:
                raise ScorerError(f"spec.reward.components[{i}] ({c.name}): {exc}") from None

    @classmethod
    def load(cls, settings: Settings) -> CompositeScorer:
        from iterdpo_reward_server.scorers import scorer_kind

        cls.preflight(settings)
        terms = [Term(c.name, c.weight, scorer_kind(c.kind).load(term_settings(settings, c)))
                 for c in settings.reward.components or []]  # fmt: skip
        return cls(terms)

    def close(self) -> None:
        for term in self.terms:
            close = getattr(term.scorer, "close", None)
            if close is not None:
                close()

    def score(self, items: Sequence[ScoreInput]) -> ScoreResult:
        results = [(term, term.scorer.score(items)) for term in self.terms]
        scores: list[float | None] = []
        unscored: dict[int, str] = {}
        for i in range(len(items)):
            why = next((f"{t.name}: {r.unscored[i]}" for t, r in results if i in r.unscored), None)
            if why is not None:
                unscored[i] = why
                scores.append(None)
            else:
                scores.append(sum(t.weight * r.scores[i] for t, r in results))  # type: ignore[operator]
        details: dict[str, list[float | None]] = {}
        for term, result in results:
            details[term.name] = list(result.scores)
            details.update({f"{term.name}.{name}": values for name, values in result.details.items()})
        # The most items any one term cut to maxLength: each term truncates on its own tokenizer.
        truncated = max((r.truncated for _, r in results), default=0)
        return ScoreResult(scores, truncated, unscored, details)
