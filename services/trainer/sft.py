"""The SFT stage: fine-tune spec.policy.model on a chat dataset once, before round 1.

    DS_ACCELERATOR=cpu torchrun --nproc-per-node P -m iterdpo_trainer.sft --spec RUN --iteration 0

(on GPUs, without DS_ACCELERATOR). The report's first step (Online-RLHF's `sft/`): next-token
loss on the assistant turns of each conversation, nothing else. A conversation is rendered with
the policy's chat template (`spec.policy.chatTemplate`, else the base's) and cut into spans where
the template writes each assistant turn (the text between its rendering of the turns before
with the generation prompt and its rendering through the turn, as `iterdpo.chat` reads one
turn); the loss is on those spans' tokens, the turn endings included (what Generate stops
on). Conversations longer than `maxLength` are cut at the end (counted); a row with no
assistant turn left, or one the template renders inconsistently, is left out with its reason.
With `packing` (the default, as the report's SFT packs its samples) the conversations are
packed into rows of at most `maxLength` tokens (`packing.py`: attention never crosses two
conversations, so a packed conversation's loss is its loss alone); a step then takes
`globalBatchSize` rows, `microBatchSize` per forward pass. Without it a row holds one
conversation, right-padded.

The DeepSpeed pieces are the DPO trainer's (`train.py`): the step plan and learning-rate curve,
`initialize_engine`, `reduce_means`, `require_finite`, `checkpoint.save_checkpoint`. Writes,
under `iter-00/sft/`: `left-out.jsonl`, `policy/` (round 1's policy and the `initial` DPO
reference) and `metrics.json` last (the marker). A finished stage is not redone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from iterdpo.contracts import LeftOutPair, SftMetrics, SftStepMetrics, read_model, write_lines, write_model
from iterdpo.errors import StageError
from iterdpo.layout import RunLayout
from iterdpo.localpaths import require_model
from iterdpo.prompts import load_prompt_set
from iterdpo.spec import IterativeDPORun, SftSpec
from iterdpo.stages import LEFT_OUT_SHOWN, REASON_CHARS, SftSummary, Stage
from iterdpo.yamlfile import clip

from iterdpo_trainer import cli
from iterdpo_trainer.packing import collate_rows, pack

log = logging.getLogger(__name__)
PROG = "iterdpo_trainer.sft"
FIELD = "spec.policy.sft.data"


@dataclass(frozen=True)
class Conversation:
    row: int
    ids: list[int]
    learn: list[int]  # 1 where the token is part of an assistant turn
    truncated: bool


def render(tokenizer, messages: Sequence[dict], template: str | None, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)  # fmt: skip


def encode_conversation(tokenizer, row: int, messages: Sequence[dict], *, template: str | None,
                        max_length: int) -> Conversation | str:  # fmt: skip
    """Token ids and the assistant-token mask of one conversation, or why it cannot train."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        return "no assistant turn to learn from"
    full = render(tokenizer, messages, template, generation_prompt=False)
    spans: list[tuple[str, int]] = []  # (text, learn)
    done = 0
    for i in assistant:
        before = render(tokenizer, messages[:i], template, generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], template, generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            return (f"the chat template renders turn {i} differently once later turns follow, so its assistant "
                    "tokens cannot be told apart")  # fmt: skip
        spans += [(full[done : len(before)], 0), (full[len(before) : len(through)], 1)]
        done = len(through)
    spans.append((full[done:], 0))
    ids: list[int] = []
    learn: list[int] = []
    for text, flag in spans:  # the template holds any BOS it wants: no special tokens added
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        learn += [flag] * len(piece)
    truncated = len(ids) > max_length
    ids, learn = ids[:max_length], learn[:max_length]
    if sum(learn[1:]) == 0:  # the first token is never a target
        return f"no assistant token within maxLength ({max_length})"
    return Conversation(row, ids, learn, truncated)


# -- the stage ---------------------------------------------------------------------------
def finished(run: IterativeDPORun) -> SftMetrics | None:
    path = RunLayout.of(run).sft_metrics()
    if not path.exists():
        return None
    metrics = read_model(path, SftMetrics)
    return metrics if Path(metrics.checkpoint).is_dir() else None


def summary_of(metrics: SftMetrics) -> SftSummary:
    return SftSummary(
        conversations=metrics.conversations, conversations_left_out=metrics.conversations_left_out,
        left_out_reasons=[clip(r, REASON_CHARS) for r in metrics.left_out_reasons[:LEFT_OUT_SHOWN]],
        conversations_truncated=metrics.conversations_truncated, rows=metrics.rows,
        tokens_trained=metrics.tokens_trained,
        loss=metrics.final_loss, checkpoint=metrics.checkpoint, seconds=metrics.seconds,
    )  # fmt: skip


def prepare(run: IterativeDPORun, rank: int):
    """Read and encode the conversations; rank 0 writes left-out.jsonl. No process group."""
    from iterdpo_trainer.data import load_tokenizer

    sft = run.spec.policy.sft
    assert sft is not None  # load_for_stage: the stage runs only when it is set
    require_model(run.spec.policy.model, "spec.policy.model (the base the SFT stage fine-tunes)", 0)
    layout = RunLayout.of(run)
    tokenizer = load_tokenizer(run.spec.policy.model, run.spec.policy.chat_template)
    rows = load_prompt_set(sft.data, field_path=FIELD, conversations=True)
    left_out = [LeftOutPair(row=int(r.prompt_id), split=sft.data.split, reason=r.reason) for r in rows.left_out]
    conversations: list[Conversation] = []
    for prompt in rows.prompts:
        if prompt is None:
            continue
        encoded = encode_conversation(tokenizer, int(prompt.prompt_id), prompt.messages, template=None,
                                      max_length=sft.max_length)  # fmt: skip
        if isinstance(encoded, str):
            left_out.append(LeftOutPair(row=int(prompt.prompt_id), split=sft.data.split,
                                        reason=f"row {prompt.prompt_id}: {encoded}"))  # fmt: skip
        else:
            conversations.append(encoded)
    left_out.sort(key=lambda r: r.row)
    if rank == 0:
        write_lines(layout.sft_left_out(), left_out)
    if not conversations:
        raise StageError(f"{FIELD}.dataset: no conversation can be trained on (see {layout.sft_left_out()})")
    log.info("%d conversations (%d truncated), %d rows left out (%s)", len(conversations),
             sum(c.truncated for c in conversations), len(left_out), layout.sft_left_out())  # fmt: skip
    return layout, tokenizer, conversations, left_out


def rows_of(conversations: Sequence[Conversation], sft: SftSpec) -> list[list[int]]:
    """The training rows: conversation indices per row (packed, or one each)."""
    if sft.packing:
        return pack([len(c.ids) for c in conversations], sft.max_length)
    return [[i] for i in range(len(conversations))]


def collate(rows: Sequence[Sequence[Conversation]], pad_token_id: int):
    """A micro-batch of rows: token ids, position ids restarting per conversation (no attention
    mask: see packing.py) and the learn mask. A conversation's first token is never a target:
    it is not predicted from the conversation before it."""
    import torch

    input_ids, position_ids = collate_rows([[c.ids for c in row] for row in rows], pad_token_id)
    learn, _ = collate_rows([[[0, *c.learn[1:]] for c in row] for row in rows], 0)
    return {"input_ids": input_ids, "position_ids": position_ids, "learn": learn.to(torch.bool)}


def token_loss(logits, batch) -> tuple[object, object]:
    """(sum of next-token losses over assistant tokens, their count), in float32."""
    import torch
    import torch.nn.functional as F

    targets = batch["input_ids"][:, 1:].to(logits.device)
    mask = batch["learn"][:, 1:].to(logits.device)
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="none").view_as(targets)  # fmt: skip
    return (losses * mask).sum(), mask.sum().to(torch.float64)


def train_sft(*, base: str, sft: SftSpec, tokenizer, conversations: Sequence[Conversation], destination: Path,
              metrics_path: Path, left_out: Sequence[LeftOutPair], started: float) -> SftMetrics:  # fmt: skip
    """Train on every rank; rank 0 writes the checkpoint, then `metrics_path` (last: the marker)."""
    import os

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from iterdpo_trainer.checkpoint import save_checkpoint
    from iterdpo_trainer.data import pad_token_id
    from iterdpo_trainer.dsconfig import build_ds_config
    from iterdpo_trainer.schedule import rank_micro_batches
    from iterdpo_trainer.train import (DTYPES, init_distributed, initialize_engine, original_dtype, plan_steps,
                                       prepare_model, reduce_means, require_finite, seed_everything)  # fmt: skip

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = build_ds_config(sft, world_size)
    distributed = init_distributed()
    rank, device = distributed.rank, distributed.device
    rows = rows_of(conversations, sft)
    log.info("%d conversations in %d rows of at most %d tokens (packing %s)", len(conversations), len(rows),
             sft.max_length, "on" if sft.packing else "off")  # fmt: skip
    plan, warmup = plan_steps(len(rows), sft, world_size, ds_config, what="rows")
    dtype_to_save = original_dtype(base)
    seed_everything(sft.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[sft.precision])
    prepare_model(model, sft)
    engine = initialize_engine(model, sft, plan, warmup, ds_config)
    pad = pad_token_id(tokenizer)

    steps: list[SftStepMetrics] = []
    for epoch in range(plan.epochs):
        order = plan.epoch_order(epoch, sft.seed)
        for step_in_epoch in range(plan.steps_per_epoch):
            learning_rate = float(engine.get_lr()[0])
            sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, tokens
            for indices in rank_micro_batches(plan.step_indices(order, step_in_epoch), rank=rank,
                                              world_size=world_size, micro_batch=sft.micro_batch_size):  # fmt: skip
                batch = collate([[conversations[c] for c in rows[i]] for i in indices], pad)
                logits = engine(input_ids=batch["input_ids"].to(device),
                                position_ids=batch["position_ids"].to(device), use_cache=False).logits  # fmt: skip
                total, tokens = token_loss(logits, batch)
                engine.backward(total / tokens.clamp(min=1.0))  # the micro-batch's mean over its assistant tokens
                engine.step()
                sums += torch.stack([total.detach().double(), tokens])
            (loss,) = reduce_means(sums)  # the step's mean over every assistant token, all ranks
            record = SftStepMetrics(step=epoch * plan.steps_per_epoch + step_in_epoch + 1,
                                    epoch=round(epoch + (step_in_epoch + 1) / plan.steps_per_epoch, 4), loss=loss,
                                    learning_rate=learning_rate)  # fmt: skip
            steps.append(record)
            log.info("step %d/%d epoch %.2f loss %.4f lr %.3g", record.step, plan.total_steps, record.epoch, loss,
                     learning_rate)  # fmt: skip
            require_finite(loss, record.step)

    save_checkpoint(engine=engine, zero_stage=sft.zero_stage, tokenizer=tokenizer, destination=destination,
                    dtype=dtype_to_save)  # fmt: skip
    last_epoch = steps[-plan.steps_per_epoch :]
    metrics = SftMetrics(
        conversations=len(conversations), conversations_left_out=len(left_out),
        left_out_reasons=[r.reason for r in left_out[:LEFT_OUT_SHOWN]],
        conversations_truncated=sum(c.truncated for c in conversations), rows=len(rows),
        tokens_trained=sum(sum(c.learn[1:]) for c in conversations),
        rows_repeated_to_fill_last_step=plan.repeated_per_epoch, steps=steps,
        final_loss=sum(s.loss for s in last_epoch) / len(last_epoch), seconds=round(time.monotonic() - started, 3),
        checkpoint=str(destination), base=base, world_size=world_size,
    )  # fmt: skip
    if rank == 0:
        write_model(metrics_path, metrics)  # last: the completion marker
    dist.barrier()
    return metrics


def _main(args: argparse.Namespace, *, rank: int, world_size: int, started: float) -> int:
    return cli.run_once(args, Stage.SFT, rank=rank, finished=finished, summary_of=summary_of,
                        work=lambda run: train(run, rank, started), what="the SFT policy",
                        reads=lambda run: [run.spec.policy.model, run.spec.policy.sft.data.dataset])  # fmt: skip


def train(run: IterativeDPORun, rank: int, started: float) -> SftMetrics:
    layout, tokenizer, conversations, left_out = prepare(run, rank)
    return train_sft(base=run.spec.policy.model, sft=run.spec.policy.sft, tokenizer=tokenizer,
                     conversations=conversations, destination=layout.sft_checkpoint(),
                     metrics_path=layout.sft_metrics(), left_out=left_out, started=started)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(
        argv, prog=PROG, first_round=0,
        description="SFT stage (round 0, before round 1): fine-tune spec.policy.model on spec.policy.sft's chat "
        "dataset (loss on the assistant turns) with DeepSpeed; writes iter-00/sft/policy (round 1's policy), "
        "left-out.jsonl and metrics.json.",
    )  # fmt: skip
    return cli.launch(args, PROG, _main, label="sft")


if __name__ == "__main__":
    sys.exit(main())
