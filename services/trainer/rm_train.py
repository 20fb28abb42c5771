"""Train a reward model on DeepSpeed ZeRO (0-3) under torchrun, with one of two objectives.

The reward-modelling half of the report's recipe (RLHFlow/RLHF-Reward-Modeling), one loop for
the objectives in `OBJECTIVES`, chosen by `spec.reward.kind`:
- `bradley-terry` (`bt.BradleyTerry`): a one-label score head on a causal-LM (or
  sequence-classification) base, loss -log sigmoid(r_c - r_r - margin) (`bt.bt_loss`);
- `pairwise` (`pair_pm.PairPreference`): the causal LM itself, taught the label token (`A` or
  `B`) of the better response, the chosen one at a random slot.
An objective encodes the pairs, loads the model, and gives per-pair (loss, correct, margin) for
training and for the held-out evaluation each epoch. Then a Hugging Face checkpoint that
`iterdpo serve-reward --kind KIND --model DIR` loads as is, and a metrics file written last (the
marker). A new objective is a class with those methods and one entry in `OBJECTIVES`.

Shared with the DPO loop (train.py), not copied: process group and device (`init_distributed`),
seeding, the step plan, its warmup and learning-rate curve (`plan_steps`, `initialize_engine`),
the DeepSpeed config (`dsconfig.build_ds_config`), the per-step all-reduce (`reduce_means`), the
divergence check (`require_finite`) and the checkpoint writer (`checkpoint.save_checkpoint`,
ZeRO-3 weights gathered from the fp32 master copy).

The reward is the score-head logit at each row's last non-pad token: batches are right-padded
with the tokenizer's pad token, and transformers' `*ForSequenceClassification` picks, per row,
the rightmost token that is not `config.pad_token_id` (`bt.ensure_pad_token` sets it, before
DeepSpeed wraps the model). The serving side (reward_server/scoring.forward) pads on the right
too, so a model is served exactly as it was trained. A sequence whose last real token is the pad
id would be read at the wrong position: refused before training.

The stage program (reading the run's preference data, the held-out split, the counts) is
`iterdpo_trainer.reward_model`; `train_reward_model(...)` is its distributed part, called on
every rank under torchrun with pairs encoded by `bt.encode_pairs`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from iterdpo.contracts import HeldOutMetrics, RewardModelMetrics, RMStepMetrics, write_model
from iterdpo.errors import StageError
from iterdpo.spec import OptimizationSpec

from iterdpo_trainer.bt import BradleyTerry, ensure_pad_token
from iterdpo_trainer.checkpoint import save_checkpoint
from iterdpo_trainer.dsconfig import build_ds_config
from iterdpo_trainer.pair_pm import PairPreference
from iterdpo_trainer.schedule import rank_micro_batches
from iterdpo_trainer.train import (
    DTYPES,
    init_distributed,
    initialize_engine,
    original_dtype,
    plan_steps,
    prepare_model,
    reduce_means,
    require_finite,
    seed_everything,
)

log = logging.getLogger(__name__)

# spec.reward.kind -> the objective that trains a model of that kind (stateless).
OBJECTIVES = {"bradley-terry": BradleyTerry(), "pairwise": PairPreference()}


# -- tokenizer and batches -----------------------------------------------------------------
def load_tokenizer(base: str | Path, chat_template: str | None = None):
    """The base's tokenizer with the template the reward model reads, and a pad token.

    Encode the pairs (bt.encode_pairs) with this tokenizer; it is also the one saved with the
    checkpoint, so the server formats conversations as they were trained.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise StageError(f"the tokenizer at {base} has no chat template: set the reward model's chat template")
    ensure_pad_token(tokenizer)
    return tokenizer


# -- the distributed part --------------------------------------------------------------------
def evaluate(engine, objective, pairs: Sequence, *, pad_token_id: int, micro_batch: int, rank: int,
             world_size: int, device) -> tuple[float, float]:
    """(accuracy, mean margin) over all held-out pairs, every rank taking a contiguous slice.

    Every rank runs the same number of forwards (under ZeRO-3 each forward gathers parameters
    collectively): a rank whose slice ran out scores a placeholder pair and counts nothing.
    """
    per_rank = -(-len(pairs) // world_size)
    mine = list(range(rank * per_rank, min(len(pairs), (rank + 1) * per_rank)))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, margin, count
    engine.eval()
    with torch.no_grad():
        for start in range(0, per_rank, micro_batch):
            indices = mine[start : start + micro_batch]
            result = objective.held_out(engine, [pairs[i] for i in (indices or [0])], pad_token_id, device)
            if indices:
                sums += torch.stack([
                    result.correct.sum(), result.margins.sum(), torch.tensor(float(len(indices)), device=device),
                ]).double()  # fmt: skip
    engine.train()
    accuracy, margin = reduce_means(sums)
    return accuracy, margin


def train_reward_model(
    *,
    base: str | Path,
    training: OptimizationSpec,
    tokenizer,
    train_pairs: Sequence,
    held_out: Sequence,
    destination: Path,
    metrics_path: Path,
    pairs_left_out: int = 0,
    left_out_reasons: Sequence[str] = (),
    started: float | None = None,
    objective=None,
) -> RewardModelMetrics:
    """Train on every rank; rank 0 writes the checkpoint, then `metrics_path` (last: the marker).

    `tokenizer` is the one the pairs were encoded with (`load_tokenizer`), by `objective`'s
    `encode_pairs` (default: a Bradley-Terry objective). Returns the metrics on every rank.
    """
    import torch.distributed as dist

    objective = OBJECTIVES["bradley-terry"] if objective is None else objective

    started = time.monotonic() if started is None else started
    base = str(base)
    if not train_pairs:
        raise StageError("no usable training pairs: nothing to train the reward model on")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = build_ds_config(training, world_size)  # bad batch arithmetic fails before any process group
    pad = ensure_pad_token(tokenizer)
    objective.check(train_pairs, pad.id, "a training")
    objective.check(held_out, pad.id, "a held-out")

    distributed = init_distributed()
    rank, device = distributed.rank, distributed.device
    plan, warmup = plan_steps(len(train_pairs), training, world_size, ds_config)

    dtype_to_save = original_dtype(base)
    seed_everything(training.seed)  # before loading: a new score head's initial weights follow the seed
    model = objective.load_model(base, DTYPES[training.precision])
    ensure_pad_token(tokenizer, model)  # resizes the embeddings if a pad token was added; sets pad_token_id
    prepare_model(model, training)
    engine = initialize_engine(model, training, plan, warmup, ds_config)

    steps: list[dict] = []
    evaluations: list[HeldOutMetrics] = []
    for epoch in range(plan.epochs):
        order = plan.epoch_order(epoch, training.seed)
        for step_in_epoch in range(plan.steps_per_epoch):
            learning_rate = float(engine.get_lr()[0])
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, margin, count
            micro_batches = rank_micro_batches(
                plan.step_indices(order, step_in_epoch),
                rank=rank, world_size=world_size, micro_batch=training.micro_batch_size,
            )
            for indices in micro_batches:
                result = objective.train_losses(engine, [train_pairs[i] for i in indices], pad.id, device)
                engine.backward(result.losses.mean())  # DeepSpeed divides by the accumulation steps
                engine.step()  # steps the optimizer at the accumulation boundary only
                sums += torch.stack([
                    result.losses.detach().sum(), result.correct.sum(), result.margins.sum(),
                    torch.tensor(float(len(indices)), device=device),
                ]).double()  # fmt: skip
            loss, accuracy, margin_mean = reduce_means(sums)
            record = {
                "step": epoch * plan.steps_per_epoch + step_in_epoch + 1,
                "epoch": round(epoch + (step_in_epoch + 1) / plan.steps_per_epoch, 4),
                "loss": loss, "accuracy": accuracy, "margin": margin_mean, "learning_rate": learning_rate,
            }  # fmt: skip
            steps.append(record)
            log.info(
                "step %d/%d epoch %.2f loss %.4f accuracy %.3f margin %.4f lr %.3g",
                record["step"], plan.total_steps, record["epoch"], loss, accuracy, margin_mean, learning_rate,
            )
            require_finite(loss, record["step"])
        if held_out:
            accuracy, margin_mean = evaluate(
                engine, objective, held_out, pad_token_id=pad.id, micro_batch=training.micro_batch_size,
                rank=rank, world_size=world_size, device=device,
            )
            evaluations.append(HeldOutMetrics(epoch=epoch + 1, pairs=len(held_out), accuracy=accuracy, margin=margin_mean))
            log.info("epoch %d held-out: %d pairs, accuracy %.3f, margin %.4f", epoch + 1, len(held_out), accuracy, margin_mean)

    save_checkpoint(
        engine=engine, zero_stage=training.zero_stage, tokenizer=tokenizer, destination=destination, dtype=dtype_to_save
    )
    last_epoch = steps[-plan.steps_per_epoch :]
    metrics = RewardModelMetrics(
        objective=objective.name,
        pairs=len(train_pairs),
        pairs_left_out=pairs_left_out,
        left_out_reasons=list(left_out_reasons),
        pairs_truncated=sum(p.truncated for p in train_pairs),
        pairs_repeated_to_fill_last_step=plan.repeated_per_epoch,
        held_out_pairs=len(held_out),
        held_out_pairs_truncated=sum(p.truncated for p in held_out),
        steps=[RMStepMetrics.model_validate(s) for s in steps],
        final_loss=sum(s["loss"] for s in last_epoch) / len(last_epoch),
        held_out=evaluations,
        held_out_accuracy=evaluations[-1].accuracy if evaluations else None,
        held_out_margin=evaluations[-1].margin if evaluations else None,
        seconds=round(time.monotonic() - started, 3),
        checkpoint=str(destination),
        base=base,
        world_size=world_size,
    )
    if rank == 0:
        write_model(metrics_path, metrics)  # last: the completion marker
    dist.barrier()
    return metrics
