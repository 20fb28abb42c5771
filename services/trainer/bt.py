"""Bradley-Terry reward modelling: the loss as pure tensor functions, and how a conversation
becomes the token ids a reward model is trained on.

The text follows the report's code (RLHFlow/RLHF-Reward-Modeling, llama3_8B_rm.py): the
REWARD model's chat template without a generation prompt, the template's leading BOS string
removed, then tokenized with special tokens, so the sequence holds exactly one BOS, and
truncated from the left (the end of the conversation, where the two sides differ, is kept; so
is the BOS). These are the ids `serve-reward` scores (services/reward_server/scoring.py), so a
model trained here is served as it was trained; a unit test checks the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from iterdpo.errors import StageError
from iterdpo.prompts import clipped
from iterdpo_trainer.data import right_pad
from iterdpo_trainer.preferences import LeftOutRow, PreferencePair

PAD_TOKEN = "[PAD]"  # what the report adds when the tokenizer has no pad token


class BTLoss(NamedTuple):
    """Per-pair figures of a reward-model objective (the pairwise one returns the same shape)."""

    losses: torch.Tensor  # [B] -log sigmoid(r_c - r_r - margin); the training loss is their mean
    correct: torch.Tensor  # [B] 1.0 where r_c > r_r (a tie is wrong), detached: accuracy = mean
    margins: torch.Tensor  # [B] r_c - r_r, detached (the data's margin not subtracted)


def bt_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> BTLoss:
    """Per-pair Bradley-Terry loss, with TRL RewardTrainer's optional per-pair margin.

    loss = -log sigmoid(r_chosen - r_rejected - margin): the chosen side must win by at
    least `margin` before the loss flattens (TRL subtracts the data's margin inside the
    sigmoid). Rewards are [B] or a score head's [B, 1]; computed in float32 at least
    (bf16 rewards lose the loss's small differences); logsigmoid keeps any difference finite.
    """
    chosen = _rewards(chosen_rewards, "chosen_rewards")
    rejected = _rewards(rejected_rewards, "rejected_rewards")
    if chosen.shape != rejected.shape:
        shapes = f"chosen_rewards {tuple(chosen.shape)} and rejected_rewards {tuple(rejected.shape)}"
        raise ValueError(f"{shapes} differ in shape")
    logits = chosen - rejected
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=logits.dtype, device=logits.device)
        if margin.shape != logits.shape:
            raise ValueError(f"margin {tuple(margin.shape)} must have one value per pair {tuple(logits.shape)}")
        logits = logits - margin
    difference = (chosen - rejected).detach()
    return BTLoss(-F.logsigmoid(logits), (difference > 0).to(difference.dtype), difference)


def _rewards(rewards: torch.Tensor, name: str) -> torch.Tensor:
    if rewards.dim() == 2 and rewards.shape[-1] == 1:
        rewards = rewards.squeeze(-1)
    if rewards.dim() != 1:
        raise ValueError(f"{name} must be [B] or [B, 1] (got {tuple(rewards.shape)})")
    return rewards if rewards.dtype == torch.float64 else rewards.float()


# -- text and tokens ----------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    truncated: bool  # tokens were cut from the left to fit max_length


@dataclass(frozen=True)
class EncodedPair:
    row: int  # the pair's row id in its dataset
    chosen: Encoded
    rejected: Encoded
    margin: float | None
    unusable: str | None  # why the pair cannot train (None: it can)

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def render(tokenizer, messages: Sequence[dict], chat_template: str | None = None) -> str:
    """The whole conversation as the reward model reads it: its template, no generation prompt."""
    return tokenizer.apply_chat_template(
        list(messages), chat_template=chat_template, tokenize=False, add_generation_prompt=False
    )


def encode(tokenizer, text: str, max_length: int) -> Encoded:
    """Token ids of a rendered conversation: one BOS at most once, the rest cut from the left.

    The template's BOS string is removed and the tokenizer adds its own (the report's way);
    a tokenizer that adds none while its template wrote one (the tiny models') gets it back,
    so the ids always start with exactly one BOS when the template or the tokenizer uses one.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 (got {max_length})")
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    template_bos = bool(bos) and text.startswith(bos)
    if template_bos:
        text = text[len(bos) :]
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if template_bos and (not ids or ids[0] != bos_id):
        ids.insert(0, bos_id)
    if len(ids) <= max_length:
        return Encoded(ids, False)
    if bos_id is not None and ids[0] == bos_id:  # as the tokenizer's own left truncation: BOS stays
        return Encoded([bos_id, *ids[len(ids) - max_length + 1 :]], True)
    return Encoded(ids[len(ids) - max_length :], True)


def encode_pair(tokenizer, pair: PreferencePair, *, max_length: int, chat_template: str | None = None) -> EncodedPair:
    """Both sides of a pair; unusable (with the reason) when the template refuses it or both
    sides end up as the same ids (left truncation can cut away everything that differed)."""
    from jinja2 import TemplateError

    sides = []
    for name, messages in (("chosen", pair.chosen_messages()), ("rejected", pair.rejected_messages())):
        try:
            sides.append(encode(tokenizer, render(tokenizer, messages, chat_template), max_length))
        except TemplateError as exc:  # the template's own checks, e.g. "roles must alternate"
            why = f"the chat template cannot format {name}: {clipped(str(exc) or type(exc).__name__, 120)}"
            empty = Encoded([], False)
            return EncodedPair(pair.row, empty, empty, pair.margin, why)
    chosen, rejected = sides
    unusable = None
    if chosen.ids == rejected.ids:
        unusable = (
            f"chosen and rejected are the same {len(chosen.ids)} tokens after truncation from the left to {max_length}"
            if chosen.truncated or rejected.truncated
            else "chosen and rejected tokenize to the same ids"
        )
    return EncodedPair(pair.row, chosen, rejected, pair.margin, unusable)


@dataclass(frozen=True)
class EncodedPairs:
    pairs: list  # usable ones, in input order (EncodedPair; pair_pm.PairwiseExample for kind pairwise)
    unusable: list[LeftOutRow]  # the rest, each with its reason
    truncated: int  # usable pairs with either side truncated


def encode_pairs(
    tokenizer, pairs: Sequence[PreferencePair], *, max_length: int, chat_template: str | None = None
) -> EncodedPairs:
    """Every pair encoded and counted: len(pairs) == len(usable) + len(unusable)."""
    usable, unusable = [], []
    for pair in pairs:
        encoded = encode_pair(tokenizer, pair, max_length=max_length, chat_template=chat_template)
        if encoded.unusable:
            unusable.append(LeftOutRow(pair.row, f"row {pair.row}: {encoded.unusable}"))
        else:
            usable.append(encoded)
    return EncodedPairs(usable, unusable, sum(p.truncated for p in usable))


# -- the objective rm_train runs ----------------------------------------------------------
class BradleyTerry:
    """The objective `OBJECTIVES["bradley-terry"]` of rm_train: a one-label score head, bt_loss."""

    name = "bradley-terry"
    uses_margins = True  # a pair's margin, when the data has one, is subtracted inside the sigmoid

    def check_base(self, base: str) -> None:
        """Any causal-LM or sequence-classification base takes a score head."""

    def encode_pairs(self, tokenizer, pairs: Sequence[PreferencePair], *, max_length: int,
                     chat_template: str | None = None, seed: int = 0) -> EncodedPairs:  # fmt: skip
        return encode_pairs(tokenizer, pairs, max_length=max_length, chat_template=chat_template)

    def check(self, pairs: Sequence[EncodedPair], pad_token_id: int, what: str) -> None:
        """Every side non-empty, and not ending with the pad id (the head would read the wrong token)."""
        for pair in pairs:
            for side, encoded in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                if not encoded.ids:
                    raise StageError(f"{what} pair (row {pair.row}): {side} has no tokens")
                if encoded.ids[-1] == pad_token_id:
                    raise StageError(
                        f"{what} pair (row {pair.row}): {side} ends with the pad token (id {pad_token_id}), so the "
                        "score head would read an earlier token: use a tokenizer whose pad token differs from its "
                        "end-of-turn tokens"
                    )

    def load_model(self, base: str, dtype):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)

    def train_losses(self, model, pairs: Sequence[EncodedPair], pad_token_id: int, device) -> BTLoss:
        batch = collate(pairs, pad_token_id)
        chosen, rejected = pair_rewards(model, batch, device)
        margin = batch.get("margin")
        return bt_loss(chosen, rejected, None if margin is None else margin.to(device))

    def held_out(self, model, pairs: Sequence[EncodedPair], pad_token_id: int, device) -> BTLoss:
        return bt_loss(*pair_rewards(model, collate(pairs, pad_token_id), device))


def collate(pairs: Sequence[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [2B, L] batch: rows [0, B) chosen, [B, 2B) rejected; margins [B] or absent."""
    input_ids, attention_mask = right_pad([p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs], pad_token_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if all(p.margin is not None for p in pairs):
        batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    return batch


def pair_rewards(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) in one forward of both halves."""
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
    ).logits[:, 0]
    half = logits.shape[0] // 2
    return logits[:half], logits[half:]


# -- the pad token ----------------------------------------------------------------------
@dataclass(frozen=True)
class PadToken:
    token: str
    id: int
    added: bool  # the tokenizer had none; PAD_TOKEN was added
    embeddings: int | None  # the model's embedding rows afterwards (None: no model given)


def ensure_pad_token(tokenizer, model=None) -> PadToken:
    """A pad token the model can batch with, as the report does for Llama-3 (vocab 128257, pad 128256).

    A score head reads the last non-pad token, so padding with EOS would misplace it on
    sequences that end with EOS: a tokenizer without a pad token gets a new `[PAD]`, and the
    model's embeddings grow to hold it (never shrink: many checkpoints pad their vocabulary).
    `model.config.pad_token_id` is set so the head finds each row's end. Resize before
    DeepSpeed wraps the model (under ZeRO-3 the weights are partitioned).
    """
    added = tokenizer.pad_token is None
    if added:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    pad_id = tokenizer.pad_token_id
    rows = None
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        wanted = max(len(tokenizer), pad_id + 1)
        if wanted > rows:
            model.resize_token_embeddings(wanted)
            rows = wanted
        model.config.pad_token_id = pad_id
        text_config = model.config.get_text_config()
        if text_config is not model.config:
            text_config.pad_token_id = pad_id
    return PadToken(tokenizer.pad_token, pad_id, added, rows)
