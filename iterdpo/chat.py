"""How the policy's chat template writes an assistant turn, read once for Generate and Train.

Generation starts after the template's generation prompt and should stop where the template
ends an assistant turn (Llama-3's `<|eot_id|>`, ChatML's `<|im_end|>`), which is often not the
tokenizer's EOS (Llama-3's is `<|end_of_text|>`). DPO must then teach exactly that ending: the
response tokens are what the template writes for the assistant turn after the generation prompt
(the response, then its end-of-turn text), as TRL renders conversational pairs. Both stages take
it from here, so they cannot disagree. Functions of a transformers tokenizer; nothing is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

# A response no template rewrites (letters only), to find where the turn's content ends.
_PROBE = "iterdpoprobe"
_PROBE_PROMPT = ({"role": "user", "content": "hi"},)


def assistant_turn(tokenizer, prompt: Sequence[dict], response: str, chat_template: str | None = None) -> str | None:
    """The text the template writes after the generation prompt when the assistant says
    `response` (the response and its end-of-turn text), or None when the template renders the
    conversation with a different beginning than the prompt (then no turn can be cut out)."""
    prefix = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False,
                                           chat_template=chat_template)  # fmt: skip
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}],
                                         add_generation_prompt=False, tokenize=False, chat_template=chat_template)  # fmt: skip
    return full[len(prefix) :] if full.startswith(prefix) else None


def end_of_turn(tokenizer, chat_template: str | None = None) -> str | None:
    """What the template writes after an assistant turn's content ('<|eot_id|>', '<|im_end|>\\n'),
    or None when it cannot be read from the template (see assistant_turn)."""
    turn = assistant_turn(tokenizer, _PROBE_PROMPT, _PROBE, chat_template)
    if turn is None or _PROBE not in turn:
        return None
    return turn[turn.index(_PROBE) + len(_PROBE) :]


def end_of_turn_ids(tokenizer, chat_template: str | None = None) -> list[int]:
    """The special tokens among the end-of-turn text's ids: what generation stops on."""
    text = end_of_turn(tokenizer, chat_template)
    if not text:
        return []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in special]
