"""The SFT stage: which tokens the loss is on, what is left out, and where its checkpoint goes
(round 1's policy and the initial DPO reference). The program end to end: tests/e2e."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken

from iterdpo.layout import RunLayout, policy_for, reference_for
from iterdpo.planner import next_step
from iterdpo.runfile import SpecError, parse_run
from iterdpo.stages import SFT, SftFigures, Stage
from iterdpo.status import RunStatus, stage_finished, stage_started
from iterdpo.tiny import POLICY_TEMPLATE, _train_tokenizer
from iterdpo.spec import SftSpec
from iterdpo_trainer.packing import pack
from iterdpo_trainer.sft import Conversation, collate, encode_conversation, rows_of

NOW = "2026-12-02T00:00:00Z"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SFT_SPEC = {"data": {"dataset": "/data/chat.jsonl"}}
RM = {"base": "/models/base", "data": {"dataset": "/data/prefs.jsonl"}}


def body(**policy) -> dict:
    return {
        "apiVersion": "iterdpo.io/v1alpha1", "kind": "IterativeDPORun", "metadata": {"name": "demo"},
        "spec": {"iterations": 2, "policy": {"model": "/models/base", **policy}, "prompts": {"dataset": "/d/p.jsonl"},
                 "reward": {"training": RM}, "storage": {"root": "/runs"}},
    }  # fmt: skip


RUN = parse_run(body(sft=SFT_SPEC))


@pytest.fixture(scope="module")
def tokenizer():
    tok = _train_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    return tok


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


TWO_TURNS = [
    {"role": "user", "content": "tell me about the river"}, {"role": "assistant", "content": "a calm river"},
    {"role": "user", "content": "why"}, {"role": "assistant", "content": "it is good"},
]  # fmt: skip


@pytest.mark.parametrize("template", [CHATML, POLICY_TEMPLATE])
def test_the_loss_is_on_every_assistant_turn_and_its_ending_only(tokenizer, template):
    encoded = encode_conversation(tokenizer, 0, TWO_TURNS, template=template, max_length=256)
    full = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False, chat_template=template)
    assert encoded.ids == ids(tokenizer, full) and not encoded.truncated
    learned = [i for i, flag in zip(encoded.ids, encoded.learn) if flag]
    ending = "<|im_end|>\n" if template == CHATML else "<|eos|>"
    assert learned == ids(tokenizer, "a calm river" + ending) + ids(tokenizer, "it is good" + ending)


def test_truncation_and_rows_that_cannot_train_are_reported(tokenizer):
    cut = encode_conversation(tokenizer, 3, TWO_TURNS, template=CHATML, max_length=24)
    assert cut.truncated and len(cut.ids) == 24 and sum(cut.learn) > 0
    assert encode_conversation(tokenizer, 1, TWO_TURNS[:1], template=CHATML, max_length=64) == \
        "no assistant turn to learn from"  # fmt: skip
    assert encode_conversation(tokenizer, 2, TWO_TURNS, template=CHATML, max_length=4) == \
        "no assistant token within maxLength (4)"  # fmt: skip
    shifting = "{% if messages|length > 2 %}<|im_start|>system\nhi<|im_end|>\n{% endif %}" + CHATML
    assert "renders turn 1 differently" in encode_conversation(tokenizer, 4, TWO_TURNS, template=shifting,
                                                               max_length=256)  # fmt: skip


def test_sft_runs_first_and_its_checkpoint_is_round_1s_policy_and_the_reference():
    step = next_step(RUN, RunStatus(), spec_file="/r.json")
    assert (step.iteration, step.stage) == (0, Stage.SFT)
    assert step.jobs[0].argv[:5] == ("torchrun", "--nnodes=1", "--nproc-per-node=1", "-m", "iterdpo_trainer.sft")
    figures = SftFigures(conversations=9, conversations_left_out=1, conversations_truncated=0, rows=3,
                         tokens_trained=90, loss=1.5, checkpoint="/runs/demo/iter-00/sft/policy", seconds=3.0)  # fmt: skip
    status = stage_finished(stage_started(RunStatus(), 0, Stage.SFT, "/models/base", NOW), 0, Stage.SFT, figures, NOW)
    assert next_step(RUN, status, spec_file="/r.json").stage == Stage.REWARD_MODEL  # then the reward model, round 0
    checkpoint = str(RunLayout.of(RUN).sft_checkpoint())
    assert policy_for(RUN, 0) == "/models/base" and policy_for(RUN, 1) == checkpoint
    assert reference_for(RUN, 1) == reference_for(RUN, 2) == checkpoint
    plain = parse_run(body())
    assert policy_for(plain, 1) == reference_for(plain, 2) == "/models/base" and not SFT.enabled(plain)
    assert SFT.line(figures).startswith("9 conversations (1 left out, 0 truncated) in 3 rows, 90 assistant tokens")


def test_sft_takes_the_reports_defaults_and_its_own_rules():
    sft = RUN.spec.policy.sft
    assert (sft.epochs, sft.learning_rate, sft.global_batch_size, sft.max_length) == (2, 2e-5, 128, 8192)
    assert sft.packing
    with pytest.raises(SpecError) as err:
        parse_run(body(sft={**SFT_SPEC, "globalBatchSize": 10, "microBatchSize": 4}))
    assert err.value.problems[0].startswith("spec.policy.sft.globalBatchSize: must be a multiple")


def test_packing_puts_every_conversation_in_one_row_best_fit_longest_first():
    assert pack([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    lengths = [(i * 37) % 50 + 1 for i in range(200)]
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 64) * 11 // 9 + 1  # best-fit decreasing's bound
    assert pack([], 8) == [] and pack([8], 8) == [[0]]
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens; each must have 1..8"):
        pack([3, 9], 8)


def test_rows_and_collate_restart_positions_and_never_learn_a_conversations_first_token():
    a = Conversation(0, [5, 6, 7], [1, 1, 1], False)
    b = Conversation(1, [8, 9], [0, 1], False)
    c = Conversation(2, [4, 4, 4, 4], [0, 0, 1, 1], False)
    packed = SftSpec.model_validate({**SFT_SPEC, "maxLength": 16})
    assert rows_of([a, b, c], packed) == [[0, 1, 2]]
    assert rows_of([a, b, c], packed.model_copy(update={"packing": False})) == [[0], [1], [2]]
    batch = collate([[a, b], [c]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 4, 4, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["learn"].int().tolist() == [[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]]
