"""Packing keeps conversations apart: on a real transformers Llama, a conversation's logits and
loss in a packed row (position ids restarting, no attention mask) equal its logits alone, with
eager and SDPA attention, so packing changes the padding and nothing the model learns."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from iterdpo_trainer.sft import Conversation, collate, token_loss

CONVERSATIONS = [
    Conversation(0, [1, 17, 23, 5, 9, 40, 2], [0, 0, 0, 1, 1, 1, 1], False),
    Conversation(1, [1, 33, 8, 2], [0, 0, 1, 1], False),
    Conversation(2, [1, 12, 12, 12, 30, 31, 7, 6, 2], [0, 0, 0, 0, 0, 1, 1, 1, 1], False),
]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    config._attn_implementation = request.param
    return LlamaForCausalLM(config).eval()


def forward(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def test_a_packed_conversation_sees_only_itself(model):
    packed = collate([CONVERSATIONS, CONVERSATIONS[1:2]], pad_token_id=0)  # row 2 is padded
    logits = forward(model, packed)
    start = 0
    for c in CONVERSATIONS:
        alone = forward(model, collate([[c]], pad_token_id=0))[0]
        torch.testing.assert_close(logits[0, start : start + len(c.ids)], alone, atol=1e-5, rtol=1e-5)
        start += len(c.ids)
    alone = forward(model, collate([[CONVERSATIONS[1]]], pad_token_id=0))[0]
    torch.testing.assert_close(logits[1, : len(CONVERSATIONS[1].ids)], alone, atol=1e-5, rtol=1e-5)


def test_the_packed_loss_is_the_sum_of_each_conversations_loss(model):
    packed = collate([CONVERSATIONS], pad_token_id=0)
    total, tokens = token_loss(forward(model, packed), packed)
    parts = [token_loss(forward(model, b), b) for b in (collate([[c]], pad_token_id=0) for c in CONVERSATIONS)]
    torch.testing.assert_close(total, sum(p[0] for p in parts), atol=1e-5, rtol=1e-5)
    assert int(tokens) == sum(int(p[1]) for p in parts) == sum(sum(c.learn[1:]) for c in CONVERSATIONS)
    # the loss that crossing the boundary would add is really excluded: packed rows differ from a concatenation
    # of the same ids read as one sequence
    joined = Conversation(9, [t for c in CONVERSATIONS for t in c.ids], [f for c in CONVERSATIONS for f in c.learn], False)
    crossed = forward(model, collate([[joined]], pad_token_id=0))
    assert not torch.allclose(crossed, forward(model, packed), atol=1e-3)
