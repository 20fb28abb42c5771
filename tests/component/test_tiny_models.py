"""The demo's tiny models: deterministic, and the reward is the one documented."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from iterdpo.tiny import POLICY_TEMPLATE, REWARD_TEMPLATE, WORD_PRIOR_LOGIT, build_tiny, token_values, word_token_ids


def score(model, tokenizer, response: str) -> tuple[float, float]:
    """(model score, mean token value) of a one-turn conversation."""
    messages = [{"role": "user", "content": "tell me about the river"}, {"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        value = model(input_ids=ids).logits[0, 0].item()
    values = token_values(tokenizer)
    return value, sum(values.get(i, 0.0) for i in ids[0].tolist()) / ids.shape[1]


def test_reward_is_the_mean_token_value_times_a_constant(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny.reward)
    model = AutoModelForSequenceClassification.from_pretrained(tiny.reward).eval()
    assert tokenizer.chat_template == REWARD_TEMPLATE
    kind, kind_mean = score(model, tokenizer, "kind happy gentle warm thanks")
    neutral, _ = score(model, tokenizer, "river stone tree road")
    unkind, unkind_mean = score(model, tokenizer, "cruel sad dark cold")
    assert kind > neutral == 0.0 > unkind
    assert kind / kind_mean == pytest.approx(unkind / unkind_mean, rel=1e-3)


def test_policy_prefers_whole_words_by_the_documented_prior(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny.policy)
    model = AutoModelForCausalLM.from_pretrained(tiny.policy).eval()
    assert tokenizer.chat_template == POLICY_TEMPLATE
    words = word_token_ids(tokenizer)
    others = [i for i in range(len(tokenizer)) if i not in set(words)]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "describe the garden"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    gap = (logits[words].mean() - logits[others].mean()).item()
    assert abs(gap - WORD_PRIOR_LOGIT) < 0.5


def test_build_is_deterministic(tiny, tmp_path):
    again = build_tiny(tmp_path / "again")
    for name in ("policy", "reward"):
        a = AutoModelForCausalLM if name == "policy" else AutoModelForSequenceClassification
        first = a.from_pretrained(getattr(tiny, name)).state_dict()
        second = a.from_pretrained(getattr(again, name)).state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first)
    assert [p.read_text() for p in tiny.prompts] == [p.read_text() for p in again.prompts]
