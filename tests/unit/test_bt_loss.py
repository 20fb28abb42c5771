"""The Bradley-Terry and pairwise objectives against hand-computed values, and how a conversation becomes a reward
model's token ids: one BOS, left truncation, unusable pairs, the pad token; on the tiny models
and on a Llama-3-style tokenizer built offline."""

import math

import pytest
import torch

from iterdpo_trainer.bt import (
    PAD_TOKEN,
    Encoded,
    bt_loss,
    encode,
    encode_pair,
    encode_pairs,
    ensure_pad_token,
    render,
)
from iterdpo_trainer.preferences import Message, PreferencePair

LN2 = math.log(2.0)


def t(*values, dtype=torch.float32, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


# -- the loss -------------------------------------------------------------------------------
def test_hand_computed_values():
    out = bt_loss(t(1.0, 0.0, -1.0, 2.5), t(0.0, 0.0, 1.0, 0.5))
    # -log sigmoid(d) = log(1 + e^-d)
    expected = [math.log1p(math.exp(-1.0)), LN2, math.log1p(math.exp(2.0)), math.log1p(math.exp(-2.0))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.losses[0].item() == pytest.approx(0.31326168751822286, abs=1e-7)
    assert out.correct.tolist() == [1.0, 0.0, 0.0, 1.0]  # a tie is not a win
    assert out.margins.tolist() == [1.0, 0.0, -2.0, 2.0]


def test_the_margin_is_subtracted_inside_the_sigmoid_as_trl_does():
    out = bt_loss(t(1.0, 1.0, 1.0), t(0.0, 0.0, 0.0), margin=t(0.5, -1.0, 1.0))
    assert out.losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.exp(-2.0)), LN2])
    assert out.losses[0].item() == pytest.approx(0.47407698418010663, abs=1e-7)
    # the reported margins and accuracy are the rewards' own, whatever the data's margin
    assert out.margins.tolist() == [1.0, 1.0, 1.0] and out.correct.tolist() == [1.0, 1.0, 1.0]
    # a list of margins works too, and a zero margin is no margin
    assert bt_loss(t(1.0), t(0.0), margin=[0.5]).losses.item() == pytest.approx(0.47407698418010663, abs=1e-7)
    assert torch.equal(bt_loss(t(1.0, 2.0), t(0.0, 3.0), margin=t(0.0, 0.0)).losses, bt_loss(t(1.0, 2.0), t(0.0, 3.0)).losses)


def test_the_mean_is_the_reports_loss_and_its_gradient_is_right():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    out = bt_loss(chosen, rejected)
    report = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    assert out.losses.mean().item() == pytest.approx(report.item(), abs=1e-7)
    out.losses.mean().backward()
    # d/dr_c of -log sigmoid(r_c - r_r) is -(1 - sigmoid(d)); averaged over B
    expected = -(1 - torch.sigmoid(chosen.detach() - rejected.detach())) / 16
    assert torch.allclose(chosen.grad, expected, atol=1e-7) and torch.allclose(rejected.grad, -expected, atol=1e-7)
    assert not out.correct.requires_grad and not out.margins.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_differences_stay_finite(dtype):
    chosen = t(1e4, -1e4, 60000.0, 0.0, dtype=dtype, grad=True)
    rejected = t(0.0, 0.0, -60000.0, 0.0, dtype=dtype, grad=True)
    out = bt_loss(chosen, rejected)
    assert out.losses.dtype == torch.float32  # computed in float32 whatever the rewards' dtype
    assert torch.isfinite(out.losses).all()
    assert out.losses[0].item() == 0.0 and out.losses[2].item() == 0.0
    assert out.losses[1].item() == pytest.approx(-chosen[1].item())  # -d for a large negative d (1e4 is 9984 in bf16)
    assert out.margins[2].item() == 2 * chosen[2].item()  # subtracted after the upcast: in float16 it would be inf
    out.losses.sum().backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert chosen.grad.float().tolist() == pytest.approx([0.0, -1.0, 0.0, -0.5], abs=1e-3)


def test_float64_is_kept():
    assert bt_loss(t(1.0, dtype=torch.float64), t(0.0, dtype=torch.float64)).losses.dtype == torch.float64


def test_a_score_heads_column_is_accepted_and_bad_shapes_are_not():
    out = bt_loss(torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [0.0]]))
    assert out.losses.shape == (2,) and out.losses[1].item() == pytest.approx(LN2)
    with pytest.raises(ValueError, match=r"chosen_rewards \(2,\) and rejected_rewards \(3,\) differ in shape"):
        bt_loss(t(1.0, 2.0), t(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"chosen_rewards must be \[B\] or \[B, 1\] \(got \(2, 2\)\)"):
        bt_loss(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"margin \(1,\) must have one value per pair \(2,\)"):
        bt_loss(t(1.0, 2.0), t(0.0, 0.0), margin=t(1.0))


# -- tokenizers -------------------------------------------------------------------------------
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)  # Meta-Llama-3-8B-Instruct's template
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = "the sky is blue and the grass is green tell me about a river stone tree cloud kind cruel yes no"


def _byte_bpe(special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([WORDS] * 4, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def llama3():
    """Llama-3's layout offline: BOS added by the post-processor and written by the template, no pad token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _byte_bpe(LLAMA3_SPECIAL)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    assert tokenizer.pad_token is None
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    """No BOS at all (Qwen's layout)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(["<|im_start|>", "<|im_end|>"]), eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_reward_tokenizer(tiny):
    """The tiny reward model's: its template writes the BOS, the tokenizer itself adds none."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.reward)


@pytest.fixture(params=["tiny", "llama3", "chatml"])
def tokenizer(request):
    return request.getfixturevalue({"tiny": "tiny_reward_tokenizer"}.get(request.param, request.param))


def pair(question="tell me about the river", good="the river is kind", bad="the river is cruel", row=0, margin=None):
    return PreferencePair(row, (Message("user", question),), (Message("assistant", good),),
                          (Message("assistant", bad),), margin)  # fmt: skip


def test_render_uses_the_template_without_a_generation_prompt(llama3, tiny_reward_tokenizer):
    messages = pair().chosen_messages()
    assert render(llama3, messages) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\ntell me about the river<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nthe river is kind<|eot_id|>"
    )
    assert render(tiny_reward_tokenizer, messages) == "<|bos|>[USER] tell me about the river\n[ASSISTANT] the river is kind\n"
    assert render(tiny_reward_tokenizer, messages, chat_template="{{ messages[0]['content'] }}") == "tell me about the river"


def test_exactly_one_bos_when_the_template_or_the_tokenizer_has_one(tokenizer):
    text = render(tokenizer, pair().chosen_messages())
    encoded = encode(tokenizer, text, 4096)
    assert not encoded.truncated
    bos = tokenizer.bos_token_id
    if bos is None:
        assert encoded.ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        return
    assert encoded.ids[0] == bos and encoded.ids.count(bos) == 1
    rest = text.removeprefix(tokenizer.bos_token)
    assert encoded.ids[1:] == tokenizer(rest, add_special_tokens=False)["input_ids"]


def test_the_llama3_ids_end_with_the_end_of_turn(llama3):
    encoded = encode(llama3, render(llama3, pair().chosen_messages()), 4096)
    assert llama3.convert_ids_to_tokens(encoded.ids[:2]) == ["<|begin_of_text|>", "<|start_header_id|>"]
    assert llama3.convert_ids_to_tokens(encoded.ids[-1]) == "<|eot_id|>"


def test_a_template_without_bos_gets_the_tokenizers_own(llama3):
    # the tokenizer's post-processor adds BOS; a template that writes none still gives one
    encoded = encode(llama3, "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", 4096)
    assert encoded.ids[0] == llama3.bos_token_id and encoded.ids.count(llama3.bos_token_id) == 1


def test_left_truncation_keeps_the_bos_and_the_end_of_the_conversation(tokenizer):
    long_question = " ".join(["tell me about the river and the stone and the tree"] * 20)
    text = render(tokenizer, pair(question=long_question, good="yes the sky is blue").chosen_messages())
    full = encode(tokenizer, text, 100_000)
    cut = encode(tokenizer, text, 24)
    assert cut.truncated and len(cut.ids) == 24 and len(full.ids) > 24
    bos = tokenizer.bos_token_id
    if bos is not None:
        assert cut.ids[0] == bos and cut.ids.count(bos) == 1
        assert cut.ids[1:] == full.ids[-23:]
    else:
        assert cut.ids == full.ids[-24:]
    assert "yes the sky is blue" in tokenizer.decode(cut.ids)  # the end, where the sides differ
    assert "tell me about" in tokenizer.decode(full.ids[: len(full.ids) - 24])  # the start is what went
    assert encode(tokenizer, text, len(full.ids)) == Encoded(full.ids, False)  # exactly fits: no cut


def test_the_same_ids_as_the_reward_server_scores(tokenizer):
    """A model trained on these ids is served by serve-reward: the two encodings must agree."""
    from iterdpo_reward_server import scoring

    p = pair(question=" ".join(["tell me about the river"] * 8))
    for max_length in (8, 17, 40, 4096):
        ours = encode(tokenizer, render(tokenizer, p.chosen_messages()), max_length)
        served = scoring.encode(tokenizer, scoring.render(tokenizer, p.chosen_messages()[:-1], p.chosen[0].content), max_length)
        assert (ours.ids, ours.truncated) == (served.ids, served.truncated), max_length


def test_a_usable_pair(tokenizer):
    encoded = encode_pair(tokenizer, pair(row=7, margin=0.5), max_length=4096)
    assert encoded.unusable is None and not encoded.truncated
    assert (encoded.row, encoded.margin) == (7, 0.5)
    assert encoded.chosen.ids != encoded.rejected.ids


def test_a_pair_whose_difference_is_truncated_away_is_unusable(tokenizer):
    tail = " and the sky is blue and the grass is green" * 6
    p = pair(good="yes" + tail, bad="no" + tail)
    assert encode_pair(tokenizer, p, max_length=4096).unusable is None
    encoded = encode_pair(tokenizer, p, max_length=12)
    assert encoded.truncated and encoded.chosen.ids == encoded.rejected.ids
    assert encoded.unusable == "chosen and rejected are the same 12 tokens after truncation from the left to 12"


def test_a_pair_the_template_refuses_is_unusable_with_the_templates_words(tiny_reward_tokenizer):
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn must come first') }}{% endif %}x"
    encoded = encode_pair(tiny_reward_tokenizer, pair(), max_length=64, chat_template=strict)
    assert encoded.unusable == "the chat template cannot format chosen: a system turn must come first"


def test_encode_pairs_counts_every_pair(tiny_reward_tokenizer):
    tail = " and the sky is blue" * 10
    pairs = [pair(row=0), pair(row=3, good="yes" + tail, bad="no" + tail), pair(row=5, question="the stone " * 30)]
    result = encode_pairs(tiny_reward_tokenizer, pairs, max_length=16)
    assert [p.row for p in result.pairs] == [0, 5]
    assert [(u.row, u.reason) for u in result.unusable] == [
        (3, "row 3: chosen and rejected are the same 16 tokens after truncation from the left to 16")
    ]
    assert result.truncated == 2  # pair 0 (the tiny template is long) and pair 5 are cut, and still usable
    assert len(result.pairs) + len(result.unusable) == len(pairs)


def test_max_length_must_be_positive(llama3):
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        encode(llama3, "hi", 0)


# -- the pad token ---------------------------------------------------------------------------------
def _classifier(vocab: int, pad_token_id=None):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_labels=1,
                         pad_token_id=pad_token_id)  # fmt: skip
    return LlamaForSequenceClassification(config).eval()


def test_a_pad_token_is_added_and_the_embeddings_grow_as_the_report_does(llama3):
    import copy

    tokenizer = copy.deepcopy(llama3)
    before = len(tokenizer)
    model = _classifier(before)
    pad = ensure_pad_token(tokenizer, model)
    assert (pad.token, pad.id, pad.added, pad.embeddings) == (PAD_TOKEN, before, True, before + 1)  # 128256 -> 128257
    assert len(tokenizer) == before + 1 and tokenizer.pad_token == PAD_TOKEN
    assert model.get_input_embeddings().weight.shape[0] == before + 1
    assert model.config.pad_token_id == before
    # Again: nothing more to do.
    assert ensure_pad_token(tokenizer, model) == type(pad)(PAD_TOKEN, before, False, before + 1)
    # The head now reads each row's last real token: a right-padded batch scores as each row alone.
    a = encode(tokenizer, render(tokenizer, pair().chosen_messages()), 4096).ids
    b = encode(tokenizer, render(tokenizer, pair(good="no").chosen_messages()), 4096).ids
    width = max(len(a), len(b))
    ids = torch.tensor([x + [pad.id] * (width - len(x)) for x in (a, b)])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in (a, b)])
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        alone = [model(input_ids=torch.tensor([x])).logits[0, 0] for x in (a, b)]
    assert torch.allclose(batched, torch.stack(alone), atol=1e-5)


def test_a_tokenizer_with_a_pad_token_keeps_it_and_the_model_learns_it(tiny_reward_tokenizer):
    model = _classifier(len(tiny_reward_tokenizer))
    assert model.config.pad_token_id is None
    pad = ensure_pad_token(tiny_reward_tokenizer, model)
    assert (pad.token, pad.added, pad.embeddings) == ("<|pad|>", False, len(tiny_reward_tokenizer))
    assert model.config.pad_token_id == tiny_reward_tokenizer.pad_token_id


def test_embeddings_never_shrink(llama3):
    import copy

    tokenizer = copy.deepcopy(llama3)
    model = _classifier(len(tokenizer) + 64)  # a checkpoint whose vocabulary is padded (as Qwen's is)
    pad = ensure_pad_token(tokenizer, model)
    assert pad.added and pad.embeddings == len(llama3) + 64
    assert model.get_input_embeddings().weight.shape[0] == len(llama3) + 64


def test_without_a_model_only_the_tokenizer_changes(llama3):
    import copy

    tokenizer = copy.deepcopy(llama3)
    pad = ensure_pad_token(tokenizer)
    assert pad.added and pad.embeddings is None and pad.id == len(llama3)


# -- the pairwise objective (kind pairwise, issue 13 item 2) ----------------------------------
def test_the_pairwise_prompt_has_no_bos_even_when_the_tokenizer_adds_one(llama3):
    """The report encodes the judge's turn with add_special_tokens=False: Llama-3's tokenizer
    would otherwise add <|begin_of_text|>; training and serving share pairwise_ids."""
    from iterdpo.pairwise_prompt import pairwise_ids, pairwise_text

    text = pairwise_text(llama3, pair().chosen_messages()[:1], "x", "y")
    assert text.startswith("<|start_header_id|>user<|end_header_id|>\n\n[CONTEXT] \n\n<turn> user\n tell me about")
    ids, truncated = pairwise_ids(llama3, text, 4096)
    assert llama3.bos_token_id not in ids and not truncated
    assert llama3.convert_ids_to_tokens(ids[-1]) == "<|eot_id|>"
    cut = pairwise_ids(llama3, text, 5)
    assert cut.truncated and cut.ids == ids[-5:]  # the end, where the label is read, is kept


def test_label_loss_is_the_label_tokens_cross_entropy_over_the_vocabulary():
    from iterdpo_trainer.pair_pm import label_loss

    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 3.0, 0.0]])
    out = label_loss(logits, torch.tensor([0, 1]), torch.tensor([2, 2]))
    expected = [-torch.log_softmax(logits[0], -1)[0].item(), -torch.log_softmax(logits[1], -1)[1].item()]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.margins.tolist() == [1.0, 0.0] and out.correct.tolist() == [1.0, 0.0]  # a tie is wrong
    grad = logits.clone().requires_grad_()
    label_loss(grad, torch.tensor([0, 1]), torch.tensor([2, 2])).losses.sum().backward()
    assert grad.grad[0, 1] > 0 and grad.grad[0, 0] < 0  # every other token is pushed down, not only the other label


def test_held_out_reading_averages_both_orders_as_the_server_does():
    from iterdpo_trainer.pair_pm import both_orders

    out = both_orders(torch.tensor([0.8, 0.3, 0.5]), torch.tensor([0.3, 0.6, 0.5]), torch.tensor([True, False, True]))
    # chosen is A: (0.8 + (1 - 0.3)) / 2; chosen is B: ((1 - 0.3) + 0.6) / 2; identical readings tie
    assert out.margins.tolist() == pytest.approx([math.log(0.75 / 0.25), math.log(0.65 / 0.35), 0.0])
    assert out.correct.tolist() == [1.0, 1.0, 0.0]


def test_the_chosen_slot_is_a_seeded_coin_per_row():
    from iterdpo_trainer.pair_pm import chosen_is_a

    draws = [chosen_is_a(7, row) for row in range(2000)]
    assert draws == [chosen_is_a(7, row) for row in range(2000)]
    assert 900 < sum(draws) < 1100 and draws != [chosen_is_a(8, row) for row in range(2000)]


def test_pairwise_encoding_puts_the_chosen_at_its_slot_and_counts_what_it_leaves_out(llama3):
    from iterdpo.pairwise_prompt import pairwise_ids, pairwise_text
    from iterdpo_trainer.pair_pm import PairPreference, PairwiseExample

    objective = PairPreference()
    two_turns = PreferencePair(3, (Message("user", "q"),), (Message("assistant", "a"), Message("user", "more?")),
                               (Message("assistant", "b"),))  # fmt: skip
    pairs = [pair(row=r) for r in range(6)] + [pair(row=6, good="same", bad="same"), two_turns]
    encoded = objective.encode_pairs(llama3, pairs, max_length=4096, seed=1)
    assert len(encoded.pairs) == 6 and [r.row for r in encoded.unusable] == [6, 3]
    assert encoded.unusable[0].reason == "row 6: chosen and rejected are the same response"
    assert encoded.unusable[1].reason.startswith("row 3: kind pairwise compares one assistant response per side; "
                                                 "chosen has turns ['assistant', 'user']")  # fmt: skip
    assert {e.chosen_is_a for e in encoded.pairs} == {True, False}  # both slots occur
    prompt = pair().chosen_messages()[:1]
    for example in encoded.pairs:
        assert isinstance(example, PairwiseExample)
        a, b = ("the river is kind", "the river is cruel")[:: 1 if example.chosen_is_a else -1]
        assert example.ordered.ids == pairwise_ids(llama3, pairwise_text(llama3, prompt, a, b), 4096).ids
        assert example.swapped.ids == pairwise_ids(llama3, pairwise_text(llama3, prompt, b, a), 4096).ids
    labels = (llama3.convert_tokens_to_ids("A"), llama3.convert_tokens_to_ids("B"))
    assert all(e.labels == labels for e in encoded.pairs)
    assert all(e.target == (labels if e.chosen_is_a else labels[::-1]) for e in encoded.pairs)
