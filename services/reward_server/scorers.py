"""Scorer registry: how a score is read from a model, keyed by spec.reward.kind.

A wrong reading of a reward model gives plausible-looking nonsense (ArmoRM read
as a plain classifier), so the kind is explicit and each kind checks that the
checkpoint is what it expects before serving. New kinds register here, under a name
of `iterdpo.spec.SCORER_KINDS` (a unit test checks that the two agree).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol, Sequence

from iterdpo_reward_server.scoring import (  # noqa: F401  (ScorerError: this registry's error, defined with the rest)
    ScoreInput,
    ScoreResult,
    ScorerError,
    UnscorableItem,
    encode,
    forward,
    model_config,
    pack,
    render,
)
from iterdpo_reward_server.settings import Settings
from iterdpo_reward_server.armo import MultiObjectiveScorer
from iterdpo_reward_server.composite import CompositeScorer, LengthScorer
from iterdpo_reward_server.pairwise import PairwiseScorer
from iterdpo_reward_server.verifiable import VerifiableScorer

log = logging.getLogger("iterdpo.reward_server")


class Scorer(Protocol):
    def score(self, items: Sequence[ScoreInput]) -> ScoreResult: ...


class BradleyTerryScorer:
    """A sequence classifier with one label: the score is that logit at the last token."""

    def __init__(self, settings: Settings, model, tokenizer, template: str | None, pad_id: int, device: str):
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.template = template  # None: the tokenizer's own
        self.pad_id = pad_id
        self.device = device
        self._lock = threading.Lock()  # one forward pass at a time, whoever calls

    @staticmethod
    def preflight(settings: Settings):
        """Cheap checks (config + tokenizer, no weights): fail before serving. Returns the tokenizer."""
        from transformers import AutoTokenizer

        config = model_config(settings.reward.model)
        num_labels = config.num_labels
        if num_labels != 1:
            raise ScorerError(
                f"kind bradley-terry (spec.reward.kind) needs a reward model with exactly one output label; "
                f"{settings.reward.model} has num_labels={num_labels}"
            )
        architectures = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ScorerError(
                f"kind bradley-terry (spec.reward.kind) needs a sequence-classification checkpoint (a trained score head); "
                f"{settings.reward.model} declares architectures {architectures}, whose score head would be random"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(settings.reward.model)
        except (OSError, ValueError) as exc:
            raise ScorerError(f"spec.reward.model (--model): cannot load the tokenizer of {settings.reward.model}: {exc}") from None
        if not (settings.reward.chat_template or tokenizer.chat_template):
            raise ScorerError(
                f"the tokenizer of {settings.reward.model} has no chat template: set the one the reward "
                f"model was trained with as spec.reward.chatTemplate (--chat-template FILE)"
            )
        return tokenizer

    @classmethod
    def load(cls, settings: Settings) -> BradleyTerryScorer:
        import torch
        from transformers import AutoModelForSequenceClassification

        tokenizer = cls.preflight(settings)
        device = settings.resolved_device()
        dtype = settings.resolved_dtype(device)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            settings.reward.model, dtype=getattr(torch, dtype), output_loading_info=True
        )
        missing = [k for k in info.get("missing_keys", []) if "score" in k or "classifier" in k]
        if missing:
            raise ScorerError(f"{settings.reward.model} has no trained score head (missing {missing}): not a reward model")
        text_config = model.config.get_text_config()
        pad_id = text_config.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad_id is None:
                raise ScorerError(f"{settings.reward.model} defines neither a pad nor an eos token: cannot batch")
            text_config.pad_token_id = pad_id  # the model finds each row's last token by it
        model.to(device).eval()
        log.info("loaded %s (%s, %s, pad id %s)", settings.reward.model, device, dtype, pad_id)
        return cls(settings, model, tokenizer, settings.reward.chat_template, pad_id, device)

    def score(self, items: Sequence[ScoreInput]) -> ScoreResult:
        encoded = []
        for index, item in enumerate(items):
            try:
                text = item.text if item.text is not None else render(self.tokenizer, item.messages, item.response, self.template)
            except Exception as exc:  # the template's own checks (e.g. roles must alternate)
                raise UnscorableItem(index, f"the chat template cannot format this conversation: {exc}") from None
            encoded.append(encode(self.tokenizer, text, self.settings.reward.max_length))
        sequences = [e.ids for e in encoded]
        groups = pack([len(s) for s in sequences], self.settings.reward.batch_tokens)
        with self._lock:
            scores = forward(self.model, sequences, groups, pad_id=self.pad_id, device=self.device)
        return ScoreResult(scores, sum(e.truncated for e in encoded))


# kind -> class with `preflight(settings)` (cheap checks) and `load(settings) -> Scorer`.
SCORERS: dict[str, type] = {
    "bradley-terry": BradleyTerryScorer,
    "multi-objective": MultiObjectiveScorer,
    "pairwise": PairwiseScorer,
    "verifiable": VerifiableScorer,
    "length": LengthScorer,
    "composite": CompositeScorer,
}


def scorer_kind(kind: str):
    try:
        return SCORERS[kind]
    except KeyError:
        raise ScorerError(f"spec.reward.kind (--kind): unknown scorer kind {kind!r}; known: {', '.join(SCORERS)}") from None
