"""What a pairwise preference model reads, shared by the trainer and the server so they cannot disagree.

The report's pair-pm code (RLHFlow/RLHF-Reward-Modeling) asks a causal LM, in one user turn,

    [CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b} \\n

and reads the logits of the tokens `A` and `B` at the last position. `context` is the
conversation rendered with the "plain" template below through Hugging Face's chat-template
compiler (trim_blocks and lstrip_blocks on: a plain Jinja render gives a different string). The
turn is rendered with the judge's own template, no generation prompt, the BOS string removed,
and encoded without special tokens: the model sees no BOS. Training (the RewardModel stage,
`iterdpo_trainer.pair_pm`) teaches the label token at that same position; serving
(`iterdpo_reward_server.pairwise`) reads it there. Functions of a transformers tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

CONTEXT_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)
PROMPT = "[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b} \n"
LABELS = ("A", "B")


class Tokens(NamedTuple):
    ids: list[int]
    truncated: bool  # cut from the left to max_length


def pairwise_text(tokenizer, messages: Sequence[dict], a: str, b: str, chat_template: str | None = None) -> str:
    """The text the model reads to say which of `a` and `b` answers `messages` better."""
    context = tokenizer.apply_chat_template(list(messages), chat_template=CONTEXT_TEMPLATE, tokenize=False)
    turn = [{"role": "user", "content": PROMPT.format(context=context, a=a, b=b)}]
    text = tokenizer.apply_chat_template(turn, chat_template=chat_template, tokenize=False)
    return text.replace(tokenizer.bos_token, "") if tokenizer.bos_token else text


def pairwise_ids(tokenizer, text: str, max_length: int) -> Tokens:
    """`text`'s ids without special tokens, the end kept when cut (the label is read at the end)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) <= max_length:
        return Tokens(ids, False)
    return Tokens(ids[len(ids) - max_length :], True)


def label_ids(tokenizer) -> tuple[int, int] | str:
    """The single token ids of `A` and `B`, or why this tokenizer cannot be a pairwise judge."""
    ids = [tokenizer.encode(label, add_special_tokens=False) for label in LABELS]
    if any(len(i) != 1 for i in ids):
        return f"kind pairwise reads the logits of the tokens 'A' and 'B'; this tokenizer splits them: {ids}"
    return ids[0][0], ids[1][0]
