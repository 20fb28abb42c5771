"""Turn (conversation, response) items into scores: format, tokenize, pack, forward.

Kept apart from HTTP so that each step is testable on its own:
- `render` formats with the REWARD model's tokenizer and template (scoring with
  the policy's template is a known way to get rewards that carry no signal);
- `encode` tokenizes without a second BOS and truncates from the left;
- `pack` groups items, longest first, into forward passes of at most
  `batch_tokens` padded tokens;
- `forward` pads on the RIGHT: with causal attention and default positions the
  real tokens then see exactly what they see unbatched, so batched scores equal
  one-by-one scores for any position encoding (left padding shifts positions:
  harmless for rotary, not for absolute embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from iterdpo.errors import StageError
from iterdpo.padding import right_padded


class ScorerError(StageError):
    """The model cannot be served as the asked-for kind; the message says why."""


def model_config(model: str):
    """The transformers config of `model`, or a ScorerError naming spec.reward.model."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ScorerError(f"spec.reward.model (--model): cannot read a model config from {model}: {exc}") from None


class ScoringError(RuntimeError):
    """The model gave something that is not a usable score."""


class UnscorableItem(ValueError):
    """One item cannot be formatted (the client's fault: a 422 naming the item)."""

    def __init__(self, index: int, message: str, *, field: str = "messages"):
        super().__init__(message)
        self.index = index
        self.message = message
        self.field = field  # the item's field at fault


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    truncated: bool


class ScoreInput(NamedTuple):
    """One thing to score: a prompt conversation, a response to it, and the prompt's gold answer if it has one."""

    messages: Sequence[dict]
    response: str
    answer: str | None = None
    text: str | None = None  # the conversation already formatted (OpenRLHF's query): scored as it is


@dataclass(frozen=True)
class ScoreResult:
    scores: list[float | None]  # in item order; None where `unscored` says why
    truncated: int
    unscored: dict[int, str] = field(default_factory=dict)  # item index -> why it has no score
    # Named parts of each score, one value per item (verifiable: correct, answered): their
    # means per round are reported; None where the item has no score.
    details: dict[str, list[float | None]] = field(default_factory=dict)


class CompareInput(NamedTuple):
    """Two responses to one prompt: which answers it better?"""

    messages: Sequence[dict]
    a: str
    b: str
    answer: str | None = None


@dataclass(frozen=True)
class CompareResult:
    probabilities: list[float | None]  # p(a beats b) per item; None where `unscored` says why
    forward_passes: int  # sequences run through the model
    truncated: int
    unscored: dict[int, str] = field(default_factory=dict)


def compare_by_scores(scorer, items: Sequence[CompareInput]) -> CompareResult:
    """A comparison from a scorer of single responses: the Bradley-Terry probability
    sigmoid(score(a) - score(b)); equal scores give 0.5 exactly."""
    flat = [ScoreInput(item.messages, response, item.answer) for item in items for response in (item.a, item.b)]
    result = scorer.score(flat)
    probabilities: list[float | None] = []
    unscored: dict[int, str] = {}
    for i in range(len(items)):
        sa, sb = result.scores[2 * i], result.scores[2 * i + 1]
        if sa is None or sb is None:
            unscored[i] = result.unscored.get(2 * i) or result.unscored.get(2 * i + 1) or "not scored"
            probabilities.append(None)
        else:
            d = sa - sb
            probabilities.append(1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d)))
    return CompareResult(probabilities, len(flat), result.truncated, unscored)


def render(tokenizer, messages: Sequence[dict], response: str, chat_template: str | None = None) -> str:
    """The conversation + response as the reward model was trained to read it."""
    conversation = [*messages, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False)


def encode(tokenizer, text: str, max_length: int) -> Encoded:
    """Token ids of `text`; a leading BOS from the template is not doubled, and kept on truncation."""
    bos = tokenizer.bos_token
    template_has_bos = bool(bos) and text.startswith(bos)
    ids = tokenizer(text, add_special_tokens=not template_has_bos)["input_ids"]
    if len(ids) <= max_length:
        return Encoded(list(ids), False)
    if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        return Encoded([ids[0], *ids[len(ids) - max_length + 1 :]], True)
    return Encoded(list(ids[len(ids) - max_length :]), True)


def pack(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped so that rows x longest <= batch_tokens in every group.

    Longest first, so the largest forward pass runs first and a memory problem
    shows at once; an item longer than the budget goes alone.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > batch_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def forward(model, sequences: Sequence[list[int]], groups: list[list[int]], *, pad_id: int, device) -> list[float]:
    """One score per sequence (read from logit 0), in sequence order."""
    import torch

    scores: list[float | None] = [None] * len(sequences)
    with torch.inference_mode():
        for group in groups:
            input_ids, attention = right_padded([sequences[i] for i in group], pad_id, device)
            logits = model(input_ids=input_ids, attention_mask=attention).logits
            for row, value in zip(group, logits[:, 0].float().cpu().tolist()):
                if not math.isfinite(value):
                    raise ScoringError(f"the model produced a non-finite score ({value}) for item {row}")
                scores[row] = value
    return scores  # type: ignore[return-value]
