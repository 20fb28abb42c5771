"""Reward kind `multi-objective`: ArmoRM's head, in tree, on its published checkpoint layout.

ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1) ships remote code that no longer imports on our
transformers, and read as a plain classifier it gives nonsense (Online-RLHF issue #23). This
module reads the same checkpoint (`model.*` a Llama backbone, `regression_layer.weight`,
`reward_transform_matrix`, `gating.layers.*`, `gating.logit_scale`; config `num_objectives`,
`gating_temperature`, `gating_hidden_dim`, `gating_n_hidden`) without running downloaded code:

- objective rewards: a bias-free linear map of the hidden state at the last token;
- gating: an MLP (ReLU between layers) of the hidden state at the start of the LAST
  occurrence of the assistant-turn token pattern (the end of the user turn and the assistant
  header: Llama-3's `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`, read from
  the chat template here, not hard-coded), softmax(x / temperature) x logit_scale;
- score: sum(gating x (rewards @ reward_transform_matrix)).

The score served is the gated score, or, with `spec.reward.objectiveWeights`, a weighted sum of
the named objective rewards; every objective's reward is a named detail either way.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Sequence

from iterdpo_reward_server.scoring import (
    ScoreInput,
    ScorerError,
    ScoreResult,
    ScoringError,
    UnscorableItem,
    encode,
    model_config,
    pack,
    render,
)
from iterdpo.padding import right_padded
from iterdpo_reward_server.settings import Settings

log = logging.getLogger("iterdpo.reward_server")

ARCHITECTURE = "LlamaForRewardModelWithGating"
# ArmoRM-Llama3-8B-v0.1's 19 objectives, in the order of its regression layer's rows.
ARMO_OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity", "ultrafeedback-overall_score", "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness", "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe",
    "prometheus-score", "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style",
    "code-explanation", "code-instruction-following", "code-readability",
)  # fmt: skip
_PROBE = "iterdpoprobe"


class MultiObjectiveError(ScorerError):
    """The checkpoint is not of ArmoRM's layout, or the run asks for objectives it lacks."""


def objective_names(config) -> list[str]:
    """The objectives' names: the config's `objective_names`, ArmoRM's 19, or objective-K."""
    n = config.num_objectives
    names = getattr(config, "objective_names", None)
    if names:
        return list(names)
    return list(ARMO_OBJECTIVES) if n == len(ARMO_OBJECTIVES) else [f"objective-{k}" for k in range(n)]


def gating_pattern(tokenizer, chat_template: str | None) -> list[int]:
    """Token ids of the text between a user turn's content and the assistant's: where ArmoRM's
    gating reads the prompt. Llama-3's template gives [128009, 128006, 78191, 128007, 271]."""
    turn = [{"role": "user", "content": _PROBE}]
    user = tokenizer.apply_chat_template(turn, tokenize=False, chat_template=chat_template)
    prompt = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, chat_template=chat_template)
    if not prompt.startswith(user) or _PROBE not in user:
        raise MultiObjectiveError("kind multi-objective: the chat template does not write a user turn followed by a "
                                  "generation prompt, so the gating network's token pattern cannot be read from it")  # fmt: skip
    text = user[user.rindex(_PROBE) + len(_PROBE) :] + prompt[len(user) :]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MultiObjectiveError("kind multi-objective: the chat template writes nothing between the user's and the "
                                  "assistant's turns: no token pattern for the gating network")  # fmt: skip
    return list(ids)


def last_occurrence(ids: Sequence[int], pattern: Sequence[int]) -> int | None:
    """Start of the last occurrence of `pattern` in `ids`, or None."""
    n = len(pattern)
    for j in range(len(ids) - n, -1, -1):
        if list(ids[j : j + n]) == list(pattern):
            return j
    return None


@functools.cache
def model_class():
    """The head as a transformers model (built on first use: torch loads only then)."""
    import torch
    from torch import nn
    from transformers import LlamaModel, LlamaPreTrainedModel

    class GatingNetwork(nn.Module):
        def __init__(self, in_features: int, out_features: int, temperature: float, hidden_dim: int, n_hidden: int):
            super().__init__()
            self.temperature = temperature
            self.logit_scale = nn.Parameter(torch.ones(1))
            sizes = [in_features] + [hidden_dim] * n_hidden
            self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])] + [nn.Linear(sizes[-1], out_features)])

        def forward(self, x):
            for layer in self.layers[:-1]:
                x = torch.relu(layer(x))
            x = self.layers[-1](x)
            return torch.softmax(x / self.temperature, dim=-1) * self.logit_scale[0]

    class MultiObjectiveRewardModel(LlamaPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            n = config.num_objectives
            self.model = LlamaModel(config)
            self.regression_layer = nn.Linear(config.hidden_size, n, bias=False)
            self.reward_transform_matrix = nn.Parameter(torch.eye(n), requires_grad=False)
            self.gating = GatingNetwork(config.hidden_size, n, float(getattr(config, "gating_temperature", 10)),
                                        int(getattr(config, "gating_hidden_dim", 1024)), int(getattr(config, "gating_n_hidden", 3)))  # fmt: skip
            self.post_init()

        def forward(self, input_ids, attention_mask, last, gate):
            """(objective rewards [B, n], gating [B, n], score [B]); `last` and `gate`: per-row positions."""
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            rewards = self.regression_layer(hidden[rows, last])
            gating = self.gating(hidden[rows, gate])
            score = (gating * (rewards @ self.reward_transform_matrix)).sum(dim=-1)
            return rewards, gating, score

    return MultiObjectiveRewardModel


@dataclass
class MultiObjectiveScorer:
    settings: Settings
    model: object
    tokenizer: object
    pattern: list[int]  # the gating network's token pattern
    names: list[str]  # the objectives, in the regression layer's order
    pad_id: int
    device: str
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def weights(self) -> list[float] | None:
        """spec.reward.objectiveWeights in objective order (0 for the rest), or None: the gated score."""
        weights = self.settings.reward.objective_weights
        return None if weights is None else [weights.get(name, 0.0) for name in self.names]

    @staticmethod
    def preflight(settings: Settings):
        """Config, tokenizer, template and objective names: every check but the weights. Returns
        (tokenizer, pattern, names, config)."""
        from transformers import AutoTokenizer

        reward = settings.reward
        config = model_config(reward.model)
        architectures = config.architectures or []
        if ARCHITECTURE not in architectures or not getattr(config, "num_objectives", None):
            raise MultiObjectiveError(
                f"kind multi-objective reads ArmoRM's checkpoint layout ({ARCHITECTURE}, config num_objectives); "
                f"{reward.model} declares architectures {architectures}"
            )
        if config.model_type != "llama":
            raise MultiObjectiveError(f"kind multi-objective reads a Llama backbone; {reward.model} is {config.model_type!r}")
        tokenizer = AutoTokenizer.from_pretrained(reward.model)
        template = reward.chat_template or tokenizer.chat_template
        if not template:
            raise MultiObjectiveError(f"the tokenizer of {reward.model} has no chat template: set spec.reward.chatTemplate")
        names = objective_names(config)
        if len(names) != config.num_objectives:
            raise MultiObjectiveError(f"{reward.model}: config objective_names lists {len(names)} names for "
                                      f"num_objectives {config.num_objectives}")  # fmt: skip
        unknown = sorted(set(reward.objective_weights or {}) - set(names))
        if unknown:
            raise MultiObjectiveError(f"spec.reward.objectiveWeights: {reward.model} has no objective {unknown[0]!r}; "
                                      f"its objectives: {', '.join(names)}")  # fmt: skip
        return tokenizer, gating_pattern(tokenizer, reward.chat_template), names, config

    @classmethod
    def load(cls, settings: Settings) -> MultiObjectiveScorer:
        import torch

        tokenizer, pattern, names, config = cls.preflight(settings)
        device = settings.resolved_device()
        dtype = settings.resolved_dtype(device)
        model, info = model_class().from_pretrained(settings.reward.model, dtype=getattr(torch, dtype), output_loading_info=True)
        if info.get("missing_keys"):
            raise MultiObjectiveError(f"{settings.reward.model} lacks weights of ArmoRM's head: {sorted(info['missing_keys'])[:5]}")
        pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id
        model.to(device).eval()
        log.info("loaded %s (multi-objective: %d objectives, gating pattern %s)", settings.reward.model, len(names), pattern)
        return cls(settings, model, tokenizer, pattern, names, pad_id, device)

    def score(self, items: Sequence[ScoreInput]) -> ScoreResult:
        import torch

        reward = self.settings.reward
        sequences, gates, truncated = [], [], 0
        unscored: dict[int, str] = {}
        for index, item in enumerate(items):
            try:
                text = item.text if item.text is not None else render(self.tokenizer, item.messages, item.response, reward.chat_template)
            except Exception as exc:  # the template's own checks
                raise UnscorableItem(index, f"the chat template cannot format this conversation: {exc}") from None
            encoded = encode(self.tokenizer, text, reward.max_length)
            truncated += encoded.truncated
            gate = last_occurrence(encoded.ids, self.pattern)
            if gate is None:
                unscored[index] = ("the assistant-turn token pattern the gating network reads is not in the conversation"
                                   + (" (cut off by maxLength)" if encoded.truncated else ""))  # fmt: skip
            sequences.append(encoded.ids)
            gates.append(gate)
        weights = self.weights
        rewards: list[list[float] | None] = [None] * len(items)
        scores: list[float | None] = [None] * len(items)
        live = [i for i in range(len(items)) if i not in unscored]
        groups = pack([len(sequences[i]) for i in live], reward.batch_tokens)
        with self._lock, torch.inference_mode():
            for group in groups:
                rows = [live[k] for k in group]
                ids, mask = right_padded([sequences[i] for i in rows], self.pad_id, self.device)
                last = torch.tensor([len(sequences[i]) - 1 for i in rows], device=self.device)
                gate = torch.tensor([gates[i] for i in rows], device=self.device)
                objective, _, gated = self.model(ids, mask, last, gate)
                for r, i in enumerate(rows):
                    values = objective[r].float().cpu().tolist()
                    total = gated[r].float().item() if weights is None else sum(w * v for w, v in zip(weights, values))
                    if not math.isfinite(total) or not all(math.isfinite(v) for v in values):
                        raise ScoringError(f"the model produced a non-finite score for item {i}")
                    rewards[i], scores[i] = values, total
        details = {name: [None if r is None else r[k] for r in rewards] for k, name in enumerate(self.names)}
        return ScoreResult(scores, truncated, unscored, details)
