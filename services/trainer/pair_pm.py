"""The pairwise objective of the RewardModel stage: a causal LM taught to answer `A` or `B`.

The report's pair-pm model (RLHFlow/RLHF-Reward-Modeling, pair-pm/) is trained as SFT on one
assistant token: given the turn `iterdpo.pairwise_prompt.pairwise_text` writes for a prompt and
two responses, the label of the better one, the chosen response placed at a random slot (a
seeded draw per row, so a run is reproducible and the model cannot learn "A is better"). The
loss is the cross-entropy of that label token over the whole vocabulary at the last position
(SFT's loss with every other token masked), so the checkpoint stays an ordinary causal LM that
`serve-reward --kind pairwise` reads at the same position.

Accuracy and margin are on the same footing as Bradley-Terry's: while training, the label's
logit against the other label's (margin = l_label - l_other, the log-odds of the two-way
softmax the server takes); held out, the server's own reading, both orders averaged:
p = (p_A(chosen, rejected) + 1 - p_A(rejected, chosen)) / 2, correct when p > 0.5, margin
log(p / (1 - p)), which under Bradley-Terry would be r_chosen - r_rejected.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from iterdpo.errors import StageError
from iterdpo.pairwise_prompt import Tokens, label_ids, pairwise_ids, pairwise_text
from iterdpo.prompts import clipped
from iterdpo_trainer.bt import BTLoss, EncodedPairs
from iterdpo_trainer.data import right_pad
from iterdpo_trainer.preferences import LeftOutRow, PreferencePair

BASE_FIELD = "spec.reward.training.base"


@dataclass(frozen=True)
class PairwiseExample:
    row: int  # the pair's row id in its dataset
    ordered: Tokens  # the chosen response at its drawn slot: what training reads
    swapped: Tokens  # the other order: held-out evaluation reads both, as the server does
    chosen_is_a: bool
    labels: tuple[int, int]  # the token ids of A and B

    @property
    def target(self) -> tuple[int, int]:
        """(the chosen slot's label id, the other label's id) in the ordered sequence."""
        a, b = self.labels
        return (a, b) if self.chosen_is_a else (b, a)

    @property
    def truncated(self) -> bool:
        return self.ordered.truncated or self.swapped.truncated


def chosen_is_a(seed: int, row: int) -> bool:
    """The drawn slot of a row's chosen response: a function of (seed, row) only."""
    return random.Random(f"pair-pm:{seed}:{row}").random() < 0.5


def _single_response(turns) -> str | None:
    """A side's one assistant response (None: the side is something else)."""
    return turns[0].content if len(turns) == 1 and turns[0].role == "assistant" else None


def encode_example(tokenizer, pair: PreferencePair, *, labels: tuple[int, int], max_length: int,
                   chat_template: str | None, seed: int) -> PairwiseExample | str:  # fmt: skip
    """Both orders of a pair as the judge reads them, or why the pair cannot train."""
    from jinja2 import TemplateError

    for side, turns in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if _single_response(turns) is None:
            roles = [t.role for t in turns]
            return f"kind pairwise compares one assistant response per side; {side} has turns {roles}"
    chosen, rejected = _single_response(pair.chosen), _single_response(pair.rejected)
    if chosen == rejected:
        return "chosen and rejected are the same response"
    a_first = chosen_is_a(seed, pair.row)
    prompt = [m.as_dict() for m in pair.prompt]
    orders = ((chosen, rejected), (rejected, chosen)) if a_first else ((rejected, chosen), (chosen, rejected))
    encoded = []
    for a, b in orders:
        try:
            text = pairwise_text(tokenizer, prompt, a, b, chat_template)
        except TemplateError as exc:
            return f"the chat template cannot format the comparison: {clipped(str(exc) or type(exc).__name__, 120)}"
        encoded.append(pairwise_ids(tokenizer, text, max_length))
    if encoded[0].ids == encoded[1].ids:
        return f"both orders are the same {len(encoded[0].ids)} tokens after truncation from the left to {max_length}"
    return PairwiseExample(pair.row, encoded[0], encoded[1], a_first, labels)


class PairPreference:
    """The objective `OBJECTIVES["pairwise"]` of rm_train: a causal LM, loss on the label token."""

    name = "pairwise"
    uses_margins = False  # it learns which side won, not by how much

    def check_base(self, base: str) -> None:
        from transformers import AutoConfig

        architectures = AutoConfig.from_pretrained(str(base)).architectures or []
        if not any(a.endswith("ForCausalLM") for a in architectures):
            raise StageError(f"{BASE_FIELD}: kind pairwise trains a causal LM to answer A or B; {base} declares "
                             f"architectures {architectures}")  # fmt: skip

    def encode_pairs(self, tokenizer, pairs: Sequence[PreferencePair], *, max_length: int,
                     chat_template: str | None = None, seed: int = 0) -> EncodedPairs:  # fmt: skip
        """Every pair encoded or left out with its reason: len(pairs) == usable + unusable."""
        labels = label_ids(tokenizer)
        if isinstance(labels, str):
            raise StageError(f"{BASE_FIELD}: {labels}")
        usable, unusable = [], []
        for pair in pairs:
            example = encode_example(tokenizer, pair, labels=labels, max_length=max_length,
                                     chat_template=chat_template, seed=seed)  # fmt: skip
            if isinstance(example, str):
                unusable.append(LeftOutRow(pair.row, f"row {pair.row}: {example}"))
            else:
                usable.append(example)
        return EncodedPairs(usable, unusable, sum(e.truncated for e in usable))

    def check(self, examples: Sequence[PairwiseExample], pad_token_id: int, what: str) -> None:
        for example in examples:
            if not example.ordered.ids or not example.swapped.ids:
                raise StageError(f"{what} pair (row {example.row}) has no tokens")

    def load_model(self, base: str, dtype):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)

    def train_losses(self, model, examples: Sequence[PairwiseExample], pad_token_id: int, device) -> BTLoss:
        logits = last_logits(model, [e.ordered.ids for e in examples], pad_token_id, device)
        label, other = torch.tensor([e.target for e in examples], device=device).unbind(-1)
        return label_loss(logits, label, other)

    def held_out(self, model, examples: Sequence[PairwiseExample], pad_token_id: int, device) -> BTLoss:
        a, b = examples[0].labels  # one tokenizer encoded them all
        logits = last_logits(model, [e.ordered.ids for e in examples] + [e.swapped.ids for e in examples],
                             pad_token_id, device)  # fmt: skip
        p_a = torch.softmax(logits[:, [a, b]].double(), dim=-1)[:, 0]
        half = len(examples)
        return both_orders(p_a[:half], p_a[half:], torch.tensor([e.chosen_is_a for e in examples], device=device))


def last_logits(model, sequences: list[list[int]], pad_token_id: int, device) -> torch.Tensor:
    """[N, vocab] next-token logits at each sequence's last token (right-padded, one forward).

    The whole [N, L, vocab] is computed, as the server computes it: a model-specific shortcut
    (the decoder's hidden state through the LM head) would skip heads that post-process their
    logits (Gemma-2's soft-capping, the family the report's pair-pm models come from).
    """
    input_ids, attention_mask = right_pad(sequences, pad_token_id)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
    last = torch.tensor([len(s) - 1 for s in sequences], device=logits.device)
    return logits[torch.arange(len(sequences), device=logits.device), last]


def label_loss(logits: torch.Tensor, label: torch.Tensor, other: torch.Tensor) -> BTLoss:
    """Per-example cross-entropy of the label token over the vocabulary (float32 at least),
    with the two-label accuracy (a tie is wrong) and margin l_label - l_other, detached."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    losses = F.cross_entropy(logits, label, reduction="none")
    rows = torch.arange(logits.shape[0], device=logits.device)
    margins = (logits[rows, label] - logits[rows, other]).detach()
    return BTLoss(losses, (margins > 0).to(margins.dtype), margins)


def both_orders(p_a_ordered: torch.Tensor, p_a_swapped: torch.Tensor, chosen_is_a: torch.Tensor) -> BTLoss:
    """The server's reading of held-out pairs: p(chosen wins) averaged over both orders; correct
    when above 0.5 (0.5 is a tie: wrong), margin its log-odds. No loss (zeros)."""
    p_chosen_ordered = torch.where(chosen_is_a, p_a_ordered, 1.0 - p_a_ordered)
    p_chosen_swapped = torch.where(chosen_is_a, 1.0 - p_a_swapped, p_a_swapped)
    p = ((p_chosen_ordered + p_chosen_swapped) / 2).double()
    margins = torch.logit(p, eps=1e-12)
    return BTLoss(torch.zeros_like(p), (p > 0.5).to(p.dtype), margins)
