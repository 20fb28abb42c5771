"""Reward kind `pairwise`: a causal-LM preference model, read as the report's pair-pm code reads it.

The model (e.g. RLHFlow/pair-preference-model-LLaMA3-8B, or one the RewardModel stage trained) was
trained to answer `A` or `B` to one user turn; what it reads is `iterdpo.pairwise_prompt`'s, shared
with the trainer. p(A) is the softmax of the `A` and `B` logits at the last position; both orders
are scored and averaged against position bias: p(a beats b) = (p_A(a, b) + 1 - p_A(b, a)) / 2, so
identical responses tie at 0.5 exactly. Each comparison costs two forward sequences (`forward_passes`).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

from iterdpo_reward_server.scoring import (
    CompareInput,
    CompareResult,
    ScoreInput,
    ScorerError,
    ScoringError,
    UnscorableItem,
    model_config,
    pack,
)
from iterdpo.padding import right_padded
from iterdpo.pairwise_prompt import label_ids, pairwise_ids, pairwise_text
from iterdpo_reward_server.settings import Settings

log = logging.getLogger("iterdpo.reward_server")


class PairwiseError(ScorerError):
    """The checkpoint cannot be read as a pairwise preference model; the message says why."""


@dataclass
class PairwiseScorer:
    settings: Settings
    model: object
    tokenizer: object
    labels: tuple[int, int]  # the token ids of A and B
    pad_id: int
    device: str
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def preflight(settings: Settings):
        from transformers import AutoTokenizer

        reward = settings.reward
        config = model_config(reward.model)
        architectures = config.architectures or []
        if not any(a.endswith("ForCausalLM") for a in architectures):
            raise PairwiseError(f"kind pairwise reads a causal LM's next-token logits; {reward.model} declares "
                                f"architectures {architectures}")  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(reward.model)
        if not (reward.chat_template or tokenizer.chat_template):
            raise PairwiseError(f"the tokenizer of {reward.model} has no chat template: set spec.reward.chatTemplate")
        labels = label_ids(tokenizer)
        if isinstance(labels, str):
            raise PairwiseError(labels)
        return tokenizer, labels

    @classmethod
    def load(cls, settings: Settings) -> PairwiseScorer:
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer, labels = cls.preflight(settings)
        device = settings.resolved_device()
        dtype = settings.resolved_dtype(device)
        model = AutoModelForCausalLM.from_pretrained(settings.reward.model, dtype=getattr(torch, dtype))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.to(device).eval()
        log.info("loaded %s (pairwise: tokens A=%d, B=%d)", settings.reward.model, *labels)
        return cls(settings, model, tokenizer, labels, pad_id, device)

    def score(self, items: Sequence[ScoreInput]):
        raise UnscorableItem(0, "kind pairwise compares two responses and gives no score to one: POST /v1/compare",
                             field="response")  # fmt: skip

    def compare(self, items: Sequence[CompareInput]) -> CompareResult:
        reward = self.settings.reward
        sequences, truncated = [], 0
        for index, item in enumerate(items):
            for first, second in ((item.a, item.b), (item.b, item.a)):
                try:
                    text = pairwise_text(self.tokenizer, item.messages, first, second, reward.chat_template)
                except Exception as exc:  # the template's own checks
                    raise UnscorableItem(index, f"the chat template cannot format this comparison: {exc}") from None
                encoded = pairwise_ids(self.tokenizer, text, reward.max_length)
                truncated += encoded.truncated
                sequences.append(encoded.ids)
        p_first = self._p_a(sequences)
        probabilities = [(p_first[2 * i] + 1.0 - p_first[2 * i + 1]) / 2.0 for i in range(len(items))]
        return CompareResult(probabilities, len(sequences), truncated)

    def _p_a(self, sequences: list[list[int]]) -> list[float]:
        """p(A) at the last position of each sequence (right-padded batches of batchTokens)."""
        import torch

        out: list[float] = [0.0] * len(sequences)
        a, b = self.labels
        with self._lock, torch.inference_mode():
            for group in pack([len(s) for s in sequences], self.settings.reward.batch_tokens):
                ids, mask = right_padded([sequences[i] for i in group], self.pad_id, self.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits
                for row, i in enumerate(group):
                    last = logits[row, len(sequences[i]) - 1, [a, b]].float()
                    p = torch.softmax(last, dim=-1)[0].item()
                    if not math.isfinite(p):
                        raise ScoringError(f"the model produced a non-finite probability for comparison {i // 2}")
                    out[i] = p
        return out
