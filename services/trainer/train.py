"""The train stage of one round: pairs -> reference pass -> DPO on DeepSpeed -> checkpoint.

`prepare` reads and checks everything before any process group exists, so bad input
fails the same way on every rank, at once. `train` is the distributed part.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from iterdpo.contracts import PhaseSeconds, StepMetrics, TrainMetrics, read_model, write_model
from iterdpo.errors import StageError
from iterdpo.layout import RunLayout, policy_for, reference_for
from iterdpo.lineage import digest
from iterdpo.localpaths import require_model
from iterdpo.spec import IterativeDPORun
from iterdpo.stages import TrainSummary

from iterdpo_trainer import data
from iterdpo_trainer.checkpoint import save_checkpoint
from iterdpo_trainer.dsconfig import build_ds_config
from iterdpo_trainer.forward import batch_logps
from iterdpo_trainer.loss import LOSSES
from iterdpo_trainer.reference import cache_key, reference_logps
from iterdpo_trainer.schedule import StepPlan, lr_factor, rank_micro_batches, warmup_steps

log = logging.getLogger(__name__)

METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Inputs:
    """Everything the distributed part needs, checked."""

    run: IterativeDPORun
    iteration: int
    layout: RunLayout
    pairs_file: Path
    policy: str
    reference: str
    tokenizer: object
    pairs: list[data.TokenizedPair]
    truncated: int
    world_size: int
    ds_config: dict


def finished_metrics(run: IterativeDPORun, iteration: int) -> TrainMetrics | None:
    """metrics.json of a finished stage whose checkpoint is still there, else None."""
    path = RunLayout.of(run).train_metrics(iteration)
    if not path.exists():
        return None
    metrics = read_model(path, TrainMetrics)
    return metrics if Path(metrics.checkpoint).is_dir() else None


def summary_of(metrics: TrainMetrics) -> TrainSummary:
    final = metrics.final
    return TrainSummary(
        loss=final.loss,
        reward_accuracy=final.rewards_accuracies,
        reward_margin=final.rewards_margins,
        checkpoint=metrics.checkpoint,
        seconds=metrics.seconds,
        pairs=metrics.pairs,
        pairs_truncated=metrics.pairs_truncated,
    )


def prepare(run: IterativeDPORun, iteration: int, world_size: int, policy: str | None = None) -> Inputs:
    """Read, check and tokenize the round's pairs; no process group needed."""
    try:
        layout = RunLayout.of(run)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    pairs_file = layout.pairs_file(iteration)
    if not pairs_file.is_file():
        raise StageError(f"pairs file {pairs_file} not found: run the Score stage of round {iteration} first")
    records = data.read_pairs(pairs_file)
    if not records:
        raise StageError(f"pairs file {pairs_file} holds no pairs: nothing to train on in round {iteration}")
    policy = policy or policy_for(run, iteration)  # the round's start (evaluation.rollback may choose another)
    reference = reference_for(run, iteration, policy)
    require_model(policy, f"the policy of round {iteration}", iteration)
    require_model(reference, f"the reference model of round {iteration}", iteration)
    ds_config = build_ds_config(run.spec.training, world_size)

    training = run.spec.training
    tokenizer = data.load_tokenizer(policy, run.spec.policy.chat_template)
    pairs = [
        data.tokenize_pair(tokenizer, r, max_length=training.max_length, max_prompt_length=training.max_prompt_length)
        for r in records
    ]
    fallback = sum(p.ended_with_eos for p in pairs)
    if fallback:
        log.warning(
            "%d of %d pairs end with the tokenizer's EOS: the chat template renders a conversation with another "
            "beginning than its prompt, so the assistant turn it writes could not be cut out", fallback, len(pairs),
        )  # fmt: skip
    truncated = sum(p.truncated for p in pairs)
    if truncated:
        log.warning(
            "%d of %d pairs were truncated to maxPromptLength %d / maxLength %d",
            truncated, len(pairs), training.max_prompt_length, training.max_length,
        )
    return Inputs(
        run, iteration, layout, pairs_file, policy, reference, tokenizer, pairs, truncated, world_size, ds_config
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def original_dtype(path: str) -> torch.dtype:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


# -- shared by the DPO loop and the reward-model loop (rm_train.py) ------------------------
@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device


def init_distributed() -> Distributed:
    """The process group (NCCL on CUDA, gloo on CPU) and this rank's device."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    on_cuda = get_accelerator().device_name() == "cuda"
    deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device(get_accelerator().device_name(local_rank) if on_cuda else "cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def plan_steps(pairs: int, training, world_size: int, ds_config: dict, what: str = "pairs") -> tuple[StepPlan, int]:
    """The step plan and its warmup steps, logged (with a warning for repeated pairs)."""
    plan = StepPlan(pairs=pairs, global_batch=training.global_batch_size, epochs=training.epochs)
    warmup = warmup_steps(plan.total_steps, training.warmup_ratio)
    if plan.repeated_per_epoch:
        log.warning(
            "%d %s do not fill whole global batches of %d: %d %s are repeated per epoch to fill the last step",
            plan.pairs, what, plan.global_batch, plan.repeated_per_epoch, what,
        )
    log.info(
        "training %d %s: %d epoch(s) x %d step(s), warmup %d, world size %d, gradient accumulation %d",
        plan.pairs, what, plan.epochs, plan.steps_per_epoch, warmup, world_size,
        ds_config["gradient_accumulation_steps"],
    )
    return plan, warmup


def prepare_model(model, training) -> None:
    """Training settings on the module before DeepSpeed wraps it: no KV cache, checkpointing."""
    model.config.use_cache = False
    if training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def initialize_engine(model, training, plan: StepPlan, warmup: int, ds_config: dict):
    """deepspeed.initialize with the shared learning-rate curve; the engine in train mode."""
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, plan.total_steps, warmup, training.scheduler)
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), lr_scheduler=scheduler, config=ds_config
    )
    engine.train()
    return engine


def reduce_means(sums: torch.Tensor) -> list[float]:
    """All-reduce per-rank sums whose last entry is the count; the means of the others."""
    import torch.distributed as dist

    dist.all_reduce(sums)
    return (sums[:-1] / sums[-1]).tolist()


def require_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise StageError(f"loss is {loss} at step {step}: training diverged (lower learningRate?)")


def train(inputs: Inputs, *, started: float) -> TrainMetrics:
    """Run DPO for the round on every rank; rank 0 writes the checkpoint and metrics.json.

    Returns the metrics (on every rank).
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    training = inputs.run.spec.training
    distributed = init_distributed()
    rank, world_size, device = distributed.rank, distributed.world_size, distributed.device
    seed_everything(training.seed)
    dtype = DTYPES[training.precision]
    pad_id = data.pad_token_id(inputs.tokenizer)

    key = cache_key(
        pairs_digest=digest(inputs.pairs_file),
        reference=inputs.reference,
        tokenization={
            "policyTokenizer": inputs.policy,
            "chatTemplate": inputs.tokenizer.chat_template,
            "maxLength": training.max_length,
            "maxPromptLength": training.max_prompt_length,
            "precision": training.precision,
        },
    )
    reference_started = time.monotonic()
    ref_chosen, ref_rejected = reference_logps(
        reference=inputs.reference,
        pairs=inputs.pairs,
        cache=inputs.layout.reference_cache(inputs.iteration),
        key=key,
        pad_token_id=pad_id,
        batch_pairs=training.micro_batch_size,
        dtype=dtype,
        device=device,
        rank=rank,
        world_size=world_size,
    )

    plan, warmup = plan_steps(len(inputs.pairs), training, world_size, inputs.ds_config)

    dtype_to_save = original_dtype(inputs.policy)
    model = AutoModelForCausalLM.from_pretrained(inputs.policy, dtype=dtype)
    prepare_model(model, training)
    engine = initialize_engine(model, training, plan, warmup, inputs.ds_config)
    beta, smoothing = training.loss.beta, training.loss.label_smoothing
    loss_fn = LOSSES[training.loss.type]

    reference_seconds = time.monotonic() - reference_started
    loop_started = time.monotonic()
    steps: list[dict] = []
    for epoch in range(plan.epochs):
        order = plan.epoch_order(epoch, training.seed)
        for step_in_epoch in range(plan.steps_per_epoch):
            learning_rate = float(engine.get_lr()[0])
            sums = torch.zeros(5, dtype=torch.float64, device=device)
            micro_batches = rank_micro_batches(
                plan.step_indices(order, step_in_epoch),
                rank=rank, world_size=world_size, micro_batch=training.micro_batch_size,
            )
            for indices in micro_batches:
                batch = data.collate([inputs.pairs[i] for i in indices], pad_id)
                chosen, rejected = batch_logps(engine, batch, device)
                index = torch.tensor(indices)
                losses, chosen_rewards, rejected_rewards = loss_fn(
                    chosen, rejected,
                    ref_chosen[index].to(device), ref_rejected[index].to(device),
                    beta=beta, label_smoothing=smoothing,
                )
                engine.backward(losses.mean())  # DeepSpeed divides by the accumulation steps
                engine.step()  # steps the optimizer at the accumulation boundary only
                sums += torch.stack([
                    losses.detach().sum(),
                    chosen_rewards.sum(),
                    rejected_rewards.sum(),
                    (chosen_rewards > rejected_rewards).float().sum(),
                    torch.tensor(float(len(indices)), device=device),
                ]).double()
            loss, chosen_r, rejected_r, accuracy = reduce_means(sums)
            record = {
                "step": epoch * plan.steps_per_epoch + step_in_epoch + 1,
                "epoch": round(epoch + (step_in_epoch + 1) / plan.steps_per_epoch, 4),
                "loss": loss,
                "rewards/chosen": chosen_r,
                "rewards/rejected": rejected_r,
                "rewards/accuracies": accuracy,
                "rewards/margins": chosen_r - rejected_r,
                "learning_rate": learning_rate,
            }
            steps.append(record)
            log.info(
                "step %d/%d epoch %.2f loss %.4f rewards/chosen %.4f rewards/rejected %.4f "
                "rewards/accuracies %.3f rewards/margins %.4f lr %.3g",
                record["step"], plan.total_steps, record["epoch"], loss, chosen_r, rejected_r,
                accuracy, record["rewards/margins"], learning_rate,
            )
            require_finite(loss, record["step"])

    loop_seconds = time.monotonic() - loop_started
    save_started = time.monotonic()
    checkpoint = inputs.layout.checkpoint(inputs.iteration)
    save_checkpoint(
        engine=engine, zero_stage=training.zero_stage, tokenizer=inputs.tokenizer,
        destination=checkpoint, dtype=dtype_to_save,
    )
    # final: loss and rewards averaged over the last epoch's steps (one step is noisy);
    # step, epoch and learning_rate are the last step's.
    last_epoch = steps[-plan.steps_per_epoch :]
    final = {name: sum(s[name] for s in last_epoch) / len(last_epoch) for name in METRIC_NAMES}
    final.update(step=steps[-1]["step"], epoch=steps[-1]["epoch"], learning_rate=steps[-1]["learning_rate"])
    metrics = TrainMetrics(
        final=StepMetrics.model_validate(final),
        steps=[StepMetrics.model_validate(s) for s in steps],
        pairs=plan.pairs,
        pairs_truncated=inputs.truncated,
        pairs_ended_with_eos=sum(p.ended_with_eos for p in inputs.pairs),
        pairs_repeated_to_fill_last_step=plan.repeated_per_epoch,
        seconds=round(time.monotonic() - started, 3),
        # Where the time went: the rest of `seconds` is start-up (imports, process group, loading).
        phase_seconds=PhaseSeconds(
            reference_pass=round(reference_seconds, 3),
            training_loop=round(loop_seconds, 3),
            checkpoint_save=round(time.monotonic() - save_started, 3),
        ),
        checkpoint=str(checkpoint),
        reference=inputs.reference,
        policy=inputs.policy,
        world_size=world_size,
    )
    if rank == 0:
        write_model(inputs.layout.train_metrics(inputs.iteration), metrics)  # last: the completion marker
    dist.barrier()
    return metrics
