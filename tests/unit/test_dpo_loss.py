"""The train stage's pure parts: DPO loss, sequence log-probs, lr schedule, step plan,
DeepSpeed config and the truncation/collation of pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from iterdpo.spec import TrainingSpec

from iterdpo_trainer.data import TokenizedPair, collate, tokenize_pair, truncate
from iterdpo_trainer.dsconfig import build_ds_config
from iterdpo.errors import UsageError
from iterdpo_trainer.loss import dpo_loss, sequence_logps
from iterdpo_trainer.schedule import StepPlan, lr_factor, rank_micro_batches, warmup_steps


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- dpo_loss -------------------------------------------------------------------------------


def test_dpo_loss_hand_computed_beta_0_1():
    # pi_c=-10, pi_r=-12, ref_c=-11, ref_r=-11: z = (-10 - -12) - (-11 - -11) = 2, beta*z = 0.2
    # loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694
    # rewards: chosen 0.1 * (-10 - -11) = 0.1, rejected 0.1 * (-12 - -11) = -0.1
    losses, chosen, rejected = dpo_loss(_t(-10), _t(-12), _t(-11), _t(-11), beta=0.1, label_smoothing=0.0)
    assert losses.item() == pytest.approx(0.5981388694, abs=1e-9)
    assert chosen.item() == pytest.approx(0.1)
    assert rejected.item() == pytest.approx(-0.1)


def test_dpo_loss_hand_computed_beta_0_5_label_smoothing_0_1():
    # pi_c=-5, pi_r=-4, ref_c=-5, ref_r=-5: z = (-5 - -4) - 0 = -1, beta*z = -0.5
    # log sigmoid(-0.5) = -log(1 + e^0.5)  = -log(2.6487212707) = -0.9740769842
    # log sigmoid(+0.5) = -log(1 + e^-0.5) = -log(1.6065306597) = -0.4740769842
    # loss = -0.9 * (-0.9740769842) - 0.1 * (-0.4740769842) = 0.8766692858 + 0.0474076984 = 0.9240769842
    # rewards: chosen 0.5 * (-5 - -5) = 0, rejected 0.5 * (-4 - -5) = 0.5
    losses, chosen, rejected = dpo_loss(_t(-5), _t(-4), _t(-5), _t(-5), beta=0.5, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9240769842, abs=1e-9)
    assert chosen.item() == pytest.approx(0.0)
    assert rejected.item() == pytest.approx(0.5)


def test_dpo_loss_policy_equal_to_reference_is_log_2_for_any_smoothing():
    # z = 0: -(1-eps) log(1/2) - eps log(1/2) = log 2 = 0.6931471806, whatever beta and eps
    for beta, eps in [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)]:
        logps = _t(-3, -7), _t(-4, -1)
        losses, chosen, rejected = dpo_loss(*logps, *logps, beta=beta, label_smoothing=eps)
        assert losses.tolist() == pytest.approx([0.6931471806] * 2, abs=1e-9)
        assert chosen.tolist() == [0.0, 0.0] and rejected.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.1), (1.0, 0.25)])
def test_dpo_loss_matches_reference_formula_on_random_inputs(beta, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    z = (pc - pr) - (rc - rr)
    expected = -(1 - eps) * torch.log(torch.sigmoid(beta * z)) - eps * torch.log(torch.sigmoid(-beta * z))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert losses.shape == (64,)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(chosen, beta * (pc - rc))
    torch.testing.assert_close(rejected, beta * (pr - rr))


def test_dpo_loss_gradient_reaches_policy_only_and_rewards_are_detached():
    pc, pr = _t(-2.0).requires_grad_(), _t(-1.0).requires_grad_()
    losses, chosen, rejected = dpo_loss(pc, pr, _t(-2.0), _t(-2.0), beta=0.1)
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # d/dpc of -log sigmoid(beta z) = -beta * sigmoid(-beta z); here z = -1
    assert pc.grad.item() == pytest.approx(-0.1 * (1 / (1 + math.exp(-0.1))))
    assert pr.grad.item() == pytest.approx(-pc.grad.item())


# --- sequence_logps --------------------------------------------------------------------------


def test_sequence_logps_sums_response_tokens_only():
    # vocab 2; position 0 predicts token 1, position 1 predicts token 2, position 2 is never used.
    # position 0: logits [0, 0]     -> p = [1/2, 1/2]
    # position 1: logits [ln 3, 0]  -> p = [3/4, 1/4]
    row = [[0.0, 0.0], [math.log(3.0), 0.0], [9.0, -9.0]]
    logits = torch.tensor([row, row, row])
    labels = torch.tensor([[0, 1, 0], [0, 1, 0], [0, 0, 1]])
    mask = torch.tensor(
        [
            [0, 1, 1],  # prompt token 0, response tokens 1 and 0: log(1/2) + log(3/4) = log 0.375
            [0, 0, 1],  # prompt is 2 tokens: only log(3/4)
            [0, 1, 0],  # response of 1 token, then padding: log p(0 | pos 0) = log(1/2)
        ]
    )
    logps = sequence_logps(logits, labels, mask)
    assert logps.tolist() == pytest.approx([math.log(0.375), math.log(0.75), math.log(0.5)], abs=1e-6)


def test_sequence_logps_matches_log_softmax_gather():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.4).long()
    per_token = torch.gather(F.log_softmax(logits[:, :-1], -1), 2, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(sequence_logps(logits, labels, mask), (per_token * mask[:, 1:]).sum(-1))


def test_sequence_logps_is_float32_for_bf16_logits():
    logits = torch.zeros(1, 3, 4, dtype=torch.bfloat16)
    out = sequence_logps(logits, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(2 * math.log(0.25))


# --- lr schedule and step plan ---------------------------------------------------------------


def test_lr_warmup_rises_linearly_and_never_starts_at_zero():
    assert [lr_factor(s, 10, 2, "cosine") for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(0, 5, 1, "linear") == pytest.approx(0.5)


def test_lr_cosine_halfway_and_end_at_zero():
    # warmup 2 of 10: decay runs over 8 steps; step 6 is halfway (progress 4/8) -> 0.5
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(4, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    factors = [lr_factor(s, 10, 2, "cosine") for s in range(2, 11)]
    assert factors == sorted(factors, reverse=True)


def test_lr_linear_and_constant():
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "linear") == pytest.approx(0.0)
    assert [lr_factor(s, 10, 0, "constant") for s in range(10)] == [1.0] * 10
    assert lr_factor(0, 10, 1, "constant") == pytest.approx(0.5)
    with pytest.raises(ValueError):
        lr_factor(0, 10, 0, "exponential")


def test_warmup_steps_is_ceiling_of_ratio():
    assert warmup_steps(10, 0.03) == 1
    assert warmup_steps(100, 0.03) == 3
    assert warmup_steps(100, 0.07) == 7  # 0.07 * 100 = 7.000000000000001 in floating point
    assert warmup_steps(50, 0.0) == 0


def test_step_plan_wraps_around_to_fill_the_last_step_and_counts_repeats():
    plan = StepPlan(pairs=12, global_batch=8, epochs=2)
    assert (plan.steps_per_epoch, plan.total_steps, plan.repeated_per_epoch) == (2, 4, 4)
    order = plan.epoch_order(0, seed=42)
    assert len(order) == 16
    assert sorted(order[:12]) == list(range(12))  # every pair once ...
    assert order[12:] == order[:4]  # ... then the start of the shuffled order again
    assert plan.step_indices(order, 1) == order[8:16]
    assert order == plan.epoch_order(0, seed=42)  # same on every rank
    assert order != plan.epoch_order(1, seed=42)  # reshuffled each epoch


def test_step_plan_fewer_pairs_than_a_batch_and_exact_fit():
    small = StepPlan(pairs=3, global_batch=8, epochs=1)
    assert (small.steps_per_epoch, small.repeated_per_epoch) == (1, 5)
    assert sorted(set(small.epoch_order(0, 1))) == [0, 1, 2] and len(small.epoch_order(0, 1)) == 8
    assert StepPlan(pairs=16, global_batch=8, epochs=1).repeated_per_epoch == 0


def test_rank_micro_batches_cover_the_global_batch_once():
    step = list(range(100, 116))
    parts = [rank_micro_batches(step, rank=r, world_size=2, micro_batch=2) for r in range(2)]
    assert [len(p) for p in parts] == [4, 4]  # gradient accumulation 4 on each rank
    assert sorted(i for p in parts for mb in p for i in mb) == step


# --- DeepSpeed config ------------------------------------------------------------------------


def test_ds_config_accumulation_math():
    report = TrainingSpec(global_batch_size=128, micro_batch_size=1)
    config = build_ds_config(report, world_size=8)
    assert config["train_batch_size"] == 128
    assert config["train_micro_batch_size_per_gpu"] == 1
    assert config["gradient_accumulation_steps"] == 16
    tiny = TrainingSpec(global_batch_size=8, micro_batch_size=2)
    assert build_ds_config(tiny, world_size=2)["gradient_accumulation_steps"] == 2
    assert build_ds_config(tiny, world_size=1)["gradient_accumulation_steps"] == 4
    with pytest.raises(UsageError, match="globalBatchSize"):
        build_ds_config(tiny, world_size=3)


def test_ds_config_zero_stage_precision_and_optimizer():
    z2 = build_ds_config(TrainingSpec(zero_stage=2, precision="bf16", learning_rate=5e-7, weight_decay=0.01), 1)
    assert z2["zero_optimization"] == {"stage": 2}
    assert z2["bf16"] == {"enabled": True} and z2["fp16"] == {"enabled": False}
    assert z2["gradient_clipping"] == 1.0
    assert z2["optimizer"]["type"] == "AdamW"
    assert z2["optimizer"]["params"]["lr"] == 5e-7 and z2["optimizer"]["params"]["weight_decay"] == 0.01
    assert z2["optimizer"]["params"]["torch_adam"] is True
    z3 = build_ds_config(TrainingSpec(zero_stage=3, precision="fp16"), 1)
    assert z3["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert z3["fp16"] == {"enabled": True} and z3["bf16"] == {"enabled": False}
    fp32 = build_ds_config(TrainingSpec(precision="fp32"), 1)
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"]
    assert build_ds_config(TrainingSpec(zero_stage=0, precision="fp32"), 1)["zero_optimization"] == {"stage": 0}


def test_ds_config_refuses_zero_0_with_half_precision():
    # DeepSpeed's stage-0 bf16 optimizer holds the fp32 master weights where they cannot be saved.
    with pytest.raises(UsageError, match="zeroStage 0 with precision bf16"):
        build_ds_config(TrainingSpec(zero_stage=0, precision="bf16"), 1)


# --- truncation and collation ----------------------------------------------------------------


def test_truncate_keeps_prompt_end_then_cuts_responses_to_max_length():
    prompt, chosen, rejected = list(range(10)), [100, 101, 102, 103, 104], [200, 201]
    pair = truncate(prompt, chosen, rejected, max_length=12, max_prompt_length=8)
    assert pair.prompt_ids == [2, 3, 4, 5, 6, 7, 8, 9]  # the END of the prompt is kept
    assert pair.chosen_ids == [100, 101, 102, 103]  # 12 - 8 = 4 tokens of room
    assert pair.rejected_ids == [200, 201]
    assert pair.truncated


def test_truncate_short_prompt_leaves_more_room_for_responses():
    pair = truncate([1, 2, 3], [10] * 9, [20] * 4, max_length=12, max_prompt_length=8)
    assert pair.prompt_ids == [1, 2, 3] and len(pair.chosen_ids) == 9 and not pair.truncated
    pair = truncate([1, 2, 3], [10] * 10, [20] * 4, max_length=12, max_prompt_length=8)
    assert len(pair.chosen_ids) == 9 and pair.truncated


def test_truncate_prompt_only():
    pair = truncate(list(range(20)), [7], [8], max_length=12, max_prompt_length=8)
    assert pair.prompt_ids == list(range(12, 20)) and pair.chosen_ids == [7] and pair.truncated


@pytest.fixture(scope="module")
def policy_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.policy)


def _pair(prompt, chosen, rejected):
    from iterdpo.contracts import PairRecord

    return PairRecord(prompt_id="0", prompt=prompt, chosen=chosen, rejected=rejected, chosen_reward=1.0,
                      rejected_reward=0.0, margin=1.0)  # fmt: skip


def test_tokenize_pair_uses_the_policy_chat_template_and_appends_eos(policy_tokenizer):
    tok = policy_tokenizer
    messages = [{"role": "user", "content": "tell me about the river"}]
    pair = _pair(messages, "kind river", "cruel river")
    out = tokenize_pair(tok, pair, max_length=128, max_prompt_length=64)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>")
    assert out.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert out.chosen_ids == tok("kind river", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out.rejected_ids[-1] == tok.eos_token_id and not out.truncated

    template = "Q: {{ messages[0]['content'] }}\nA:"
    override = tokenize_pair(tok, pair, max_length=128, max_prompt_length=64, chat_template=template)
    assert tok.decode(override.prompt_ids) == "Q: tell me about the river\nA:"


def test_tokenize_pair_truncates_a_long_prompt_from_the_left(policy_tokenizer):
    tok = policy_tokenizer
    prompt = [{"role": "user", "content": "tell me about the river " * 40}]
    pair = _pair(prompt, "kind " * 80, "sad")
    out = tokenize_pair(tok, pair, max_length=64, max_prompt_length=16)
    assert out.truncated
    assert len(out.prompt_ids) == 16 and tok.decode(out.prompt_ids).endswith("<|assistant|>")
    assert len(out.prompt_ids) + len(out.chosen_ids) == 64  # cut to max_length, eos cut away too
    assert out.chosen_ids[-1] != tok.eos_token_id
    assert out.rejected_ids[-1] == tok.eos_token_id


def test_collate_stacks_chosen_then_rejected_with_right_padding():
    pairs = [TokenizedPair([1, 2], [3, 4, 5], [6], False), TokenizedPair([7], [8], [9, 10], False)]
    batch = collate(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],  # pair 0 chosen
        [7, 8, 0, 0, 0],  # pair 1 chosen
        [1, 2, 6, 0, 0],  # pair 0 rejected
        [7, 9, 10, 0, 0],  # pair 1 rejected
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
    ]
