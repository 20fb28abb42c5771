"""Preference pairs -> token ids -> padded batches.

Pairs are tokenized with the POLICY's tokenizer and chat template (the model being
trained must see exactly the format it generates with; the reward model's template
is not used here): the prompt with the generation prompt, then each response as the
template writes the assistant turn after it (`iterdpo.chat.assistant_turn`: the response
and the template's end-of-turn tokens, e.g. Llama-3's `<|eot_id|>`, which is what
generation stops on), as TRL renders conversational pairs. A template whose rendering of
the conversation does not begin with its rendering of the prompt gets the response + EOS
instead (counted: `TokenizedPair.ended_with_eos`). Truncation follows TRL: the prompt keeps
its end, then the responses are cut so that prompt + response fits max_length. Truncated
pairs are counted and reported, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from iterdpo.chat import assistant_turn
from iterdpo.padding import right_padded
from iterdpo.contracts import PairRecord, read_lines
from iterdpo.errors import StageError


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the assistant turn's tokens: response + end of turn (unless truncated away)
    rejected_ids: list[int]
    truncated: bool
    ended_with_eos: bool = False  # the template's turn could not be cut out: response + the tokenizer's EOS


def read_pairs(path: Path) -> list[PairRecord]:
    """pairs.jsonl, checked line by line; a malformed line is an error naming file, line and field."""
    return read_lines(path, PairRecord)


def tokenize_pair(
    tokenizer,
    pair: PairRecord,
    *,
    max_length: int,
    max_prompt_length: int,
    chat_template: str | None = None,
) -> TokenizedPair:
    """Token ids of one pair: templated prompt (with the generation prompt), then each
    response's assistant turn as the template writes it."""
    messages = [m.model_dump() for m in pair.prompt]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, chat_template=chat_template)
    # The template already holds any bos it wants; adding special tokens would double it.
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    turns = [assistant_turn(tokenizer, messages, response, chat_template) for response in (pair.chosen, pair.rejected)]
    if None in turns:
        chosen, rejected = (tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                            for r in (pair.chosen, pair.rejected))  # fmt: skip
    else:
        chosen, rejected = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in turns)
    out = truncate(prompt, chosen, rejected, max_length=max_length, max_prompt_length=max_prompt_length)
    return TokenizedPair(out.prompt_ids, out.chosen_ids, out.rejected_ids, out.truncated, ended_with_eos=None in turns)


def truncate(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    max_prompt_length: int,
) -> TokenizedPair:
    """Keep the prompt's last max_prompt_length tokens, then cut each response to fit max_length."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
    kept_prompt = prompt[-max_prompt_length:] if len(prompt) > max_prompt_length else prompt
    room = max_length - len(kept_prompt)
    kept_chosen, kept_rejected = chosen[:room], rejected[:room]
    truncated = (
        len(kept_prompt) < len(prompt) or len(kept_chosen) < len(chosen) or len(kept_rejected) < len(rejected)
    )
    return TokenizedPair(list(kept_prompt), list(kept_chosen), list(kept_rejected), truncated)


def collate(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B sequences: rows [0, B) are chosen, rows [B, 2B) rejected.

    Stacking both halves lets one forward pass serve the pair. Returns input_ids,
    attention_mask and response_mask ([2B, L]; response_mask marks response tokens).
    """
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    input_ids, attention_mask = right_pad([prompt + response for prompt, response in sequences], pad_token_id)
    response_mask = torch.zeros_like(attention_mask)
    for row, (prompt, response) in enumerate(sequences):
        response_mask[row, len(prompt) : len(prompt) + len(response)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def right_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), [N, longest], each row's tokens first, padding after."""
    return right_padded(sequences, pad_token_id)


def pad_token_id(tokenizer) -> int:
    """The id padding uses; its value never matters (masked), but it must be a valid id."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise StageError("the policy tokenizer has neither a pad token nor an eos token")


def load_tokenizer(path: str, chat_template: str | None):
    """The policy's tokenizer, carrying the spec's chat template when one is set."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise StageError(
            f"the policy tokenizer at {path} has no chat template: set spec.policy.chatTemplate"
        )
    if tokenizer.eos_token_id is None:
        raise StageError(f"the policy tokenizer at {path} has no eos token: responses could not be terminated")
    return tokenizer
