"""The assistant turn as the policy's template writes it: what Train teaches and Generate stops
on, for a Llama-3-style template (turns end with <|eot_id|>, not the tokenizer's EOS) and a
ChatML-style one (<|im_end|> and a newline)."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken

from iterdpo.chat import assistant_turn, end_of_turn, end_of_turn_ids
from iterdpo.contracts import PairRecord
from iterdpo.spec import GenerationSpec
from iterdpo.tiny import POLICY_TEMPLATE, _train_tokenizer
from iterdpo_generator.generate import stop_token_ids
from iterdpo_trainer.data import tokenize_pair

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders a prompt differently once an assistant turn follows (a default system turn only then):
# no turn can be cut out.
SHIFTING = (
    "{% if messages[-1]['role'] == 'assistant' %}<|im_start|>system\nbe kind<|im_end|>\n{% endif %}" + CHATML
)
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
PROMPT = [{"role": "user", "content": "tell me about the river"}]


@pytest.fixture(scope="module")
def tokenizer():
    tok = _train_tokenizer()  # the tiny byte-level BPE; its EOS is <|eos|>
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def pair(chosen: str = "a kind river", rejected: str = "a cold river") -> PairRecord:
    return PairRecord(prompt_id="p0", prompt=PROMPT, chosen=chosen, rejected=rejected, chosen_reward=1.0,
                      rejected_reward=-1.0, margin=2.0)  # fmt: skip


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("template", "ending", "stop"), [
    (LLAMA3, "<|eot_id|>", ["<|eot_id|>"]),
    (CHATML, "<|im_end|>\n", ["<|im_end|>"]),
    (POLICY_TEMPLATE, "<|eos|>", ["<|eos|>"]),
])  # fmt: skip
def test_the_end_of_an_assistant_turn_is_read_from_the_template(tokenizer, template, ending, stop):
    assert end_of_turn(tokenizer, template) == ending
    assert end_of_turn_ids(tokenizer, template) == tokenizer.convert_tokens_to_ids(stop)


@pytest.mark.parametrize("template", [LLAMA3, CHATML])
def test_dpo_teaches_the_templates_turn_ending_not_the_tokenizers_eos(tokenizer, template):
    tokenized = tokenize_pair(tokenizer, pair(), max_length=128, max_prompt_length=64, chat_template=template)
    full = tokenizer.apply_chat_template([*PROMPT, {"role": "assistant", "content": "a kind river"}], tokenize=False,
                                         chat_template=template)  # fmt: skip
    assert tokenized.prompt_ids + tokenized.chosen_ids == ids(tokenizer, full)  # the whole conversation, as rendered
    assert tokenizer.eos_token_id not in tokenized.chosen_ids + tokenized.rejected_ids
    stop = end_of_turn_ids(tokenizer, template)
    for response in (tokenized.chosen_ids, tokenized.rejected_ids):
        (end,) = [i for i in response if i in stop]  # exactly one end of turn, where generation stops
        assert response[: response.index(end)] in (ids(tokenizer, "a kind river"), ids(tokenizer, "a cold river"))
    assert not tokenized.ended_with_eos and not tokenized.truncated


def test_the_tiny_template_still_ends_responses_with_eos(tokenizer):
    tokenized = tokenize_pair(tokenizer, pair(), max_length=128, max_prompt_length=64, chat_template=POLICY_TEMPLATE)
    assert tokenized.chosen_ids == ids(tokenizer, "a kind river") + [tokenizer.eos_token_id]


def test_a_template_that_renders_the_prompt_differently_falls_back_to_eos_and_says_so(tokenizer):
    assert assistant_turn(tokenizer, PROMPT, "x", SHIFTING) is None
    tokenized = tokenize_pair(tokenizer, pair(), max_length=128, max_prompt_length=64, chat_template=SHIFTING)
    assert tokenized.ended_with_eos and tokenized.chosen_ids[-1] == tokenizer.eos_token_id
    assert end_of_turn_ids(tokenizer, SHIFTING) == []


def test_truncation_cuts_the_turn_ending_too(tokenizer):
    long = " ".join(["river"] * 60)
    tokenized = tokenize_pair(tokenizer, pair(chosen=long), max_length=40, max_prompt_length=20, chat_template=LLAMA3)
    assert tokenized.truncated and len(tokenized.prompt_ids) + len(tokenized.chosen_ids) == 40


def test_generation_stops_where_training_ends_a_turn(tokenizer):
    gen = GenerationSpec(stopTokenIds=[5])
    eot, im_end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|im_end|>"])
    assert stop_token_ids(gen, tokenizer, LLAMA3) == sorted({5, tokenizer.eos_token_id, eot})
    assert stop_token_ids(gen, tokenizer, CHATML) == sorted({5, tokenizer.eos_token_id, im_end})
    assert stop_token_ids(GenerationSpec(), tokenizer, POLICY_TEMPLATE) == [tokenizer.eos_token_id]
