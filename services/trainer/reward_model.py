"""The RewardModel stage: train the run's reward model once, before round 1.

    DS_ACCELERATOR=cpu torchrun --nproc-per-node P -m iterdpo_trainer.reward_model --spec RUN --iteration 0

(on GPUs, without DS_ACCELERATOR). It reads `spec.reward.training`: the preference data
(`preferences.read_preferences`, every row counted), holds out a seeded share of the pairs or
reads a held-out split, encodes them with the base's tokenizer and the reward model's template
(`spec.reward.chatTemplate`, else the base's), truncated from the left to `spec.reward.maxLength`,
then trains (`rm_train.train_reward_model`). The objective follows `spec.reward.kind`
(`rm_train.OBJECTIVES`): kind bradley-terry trains a score head on both sides (`bt`), kind
pairwise teaches the base to name the better of the two in the report's A/B prompt (`pair_pm`).

Writes, under `iter-00/reward_model/`: `left-out.jsonl` (every row that is not a pair, with its
split, row and reason), `model/` (the Hugging Face checkpoint that every round's Score serves)
and `metrics.json` last (the marker). A stage with a marker and its checkpoint is not redone.
Everything is read and checked before any process group exists, so bad data fails the same
way on every rank, at once.
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from iterdpo.contracts import LeftOutPair, RewardModelMetrics, read_model, write_lines
from iterdpo.layout import RunLayout
from iterdpo.spec import IterativeDPORun, PreferenceDataSpec
from iterdpo.stages import LEFT_OUT_SHOWN, REASON_CHARS, RewardModelSummary, Stage
from iterdpo.yamlfile import clip

from iterdpo_trainer import cli
from iterdpo_trainer.preferences import LeftOutRow, PreferencePair, PreferenceSource, read_preferences

log = logging.getLogger(__name__)
PROG = "iterdpo_trainer.reward_model"
FIELD = "spec.reward.training.data"


@dataclass(frozen=True)
class Inputs:
    run: IterativeDPORun
    layout: RunLayout
    tokenizer: object
    objective: object  # an rm_train.OBJECTIVES entry
    train: list
    held_out: list
    left_out: list[LeftOutPair]


def source_of(data: PreferenceDataSpec, split: str | None = None) -> PreferenceSource:
    """The reader's view of spec.reward.training.data (another split of it, for held-out pairs)."""
    margin = {} if data.margin_field is None else {"margin_field": data.margin_field}
    return PreferenceSource(
        dataset=data.dataset, split=split or data.split, format=data.format, chosen_field=data.chosen_field,
        rejected_field=data.rejected_field, prompt_field=data.prompt_field, max_rows=data.max_pairs, **margin,
    )  # fmt: skip


def split_held_out(pairs: list[PreferencePair], share: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded draw of round(share x pairs) pairs (at least 1 when share > 0
    and there are 2 pairs), the rest kept in row order. Always leaves a training pair."""
    if share <= 0 or len(pairs) < 2:
        return list(pairs), []
    count = min(len(pairs) - 1, max(1, round(share * len(pairs))))
    held = set(random.Random(seed).sample(range(len(pairs)), count))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def finished(run: IterativeDPORun) -> RewardModelMetrics | None:
    """metrics.json of a finished stage whose checkpoint is still there, else None."""
    path = RunLayout.of(run).reward_model_metrics()
    if not path.exists():
        return None
    metrics = read_model(path, RewardModelMetrics)
    return metrics if Path(metrics.checkpoint).is_dir() else None


def summary_of(metrics: RewardModelMetrics) -> RewardModelSummary:
    return RewardModelSummary(
        pairs=metrics.pairs, pairs_left_out=metrics.pairs_left_out,
        left_out_reasons=[clip(r, REASON_CHARS) for r in metrics.left_out_reasons[:LEFT_OUT_SHOWN]],
        pairs_truncated=metrics.pairs_truncated, held_out_pairs=metrics.held_out_pairs,
        held_out_accuracy=metrics.held_out_accuracy, held_out_margin=metrics.held_out_margin,
        loss=metrics.final_loss, checkpoint=metrics.checkpoint, seconds=metrics.seconds,
    )  # fmt: skip


def prepare(run: IterativeDPORun, rank: int) -> Inputs:
    """Read, split, check and encode the pairs; rank 0 writes left-out.jsonl. No process group."""
    from iterdpo_trainer.rm_train import OBJECTIVES, load_tokenizer

    spec = run.spec.reward
    training = spec.training
    assert training is not None  # load_for_stage: the stage runs only when it is set
    layout = RunLayout.of(run)
    objective = OBJECTIVES[spec.kind]
    objective.check_base(training.base)
    read = read_preferences(source_of(training.data), field_path=FIELD)
    left_out = _left_out(read.left_out, training.data.split)
    log.info("%s: %d rows -> %d pairs (%s format), %d left out", training.data.dataset, read.rows_in,
             read.pairs_out, read.format, len(read.left_out))  # fmt: skip
    if training.held_out_split:
        train_pairs = read.pairs
        held = read_preferences(source_of(training.data, training.held_out_split), field_path=FIELD)
        held_pairs = held.pairs
        left_out += _left_out(held.left_out, training.held_out_split)
    else:
        train_pairs, held_pairs = split_held_out(read.pairs, training.held_out, training.seed)
    if read.margins and not objective.uses_margins:
        log.warning("kind %s has no use for a per-pair margin: the margins of %s are not used", spec.kind,
                    training.data.dataset)  # fmt: skip
    tokenizer = load_tokenizer(training.base, spec.chat_template)
    encode = functools.partial(objective.encode_pairs, tokenizer, max_length=spec.max_length,
                               chat_template=spec.chat_template, seed=training.seed)  # fmt: skip
    encoded_train, encoded_held = encode(train_pairs), encode(held_pairs)
    left_out += _left_out(encoded_train.unusable, training.data.split)
    left_out += _left_out(encoded_held.unusable, training.held_out_split or training.data.split)
    if rank == 0:
        write_lines(layout.reward_model_left_out(), left_out)
    log.info("%d training pairs (%d truncated), %d held out, %d rows left out (%s)", len(encoded_train.pairs),
             encoded_train.truncated, len(encoded_held.pairs), len(left_out), layout.reward_model_left_out())  # fmt: skip
    return Inputs(run, layout, tokenizer, objective, encoded_train.pairs, encoded_held.pairs, left_out)


def _left_out(rows: list[LeftOutRow], split: str) -> list[LeftOutPair]:
    return [LeftOutPair(row=r.row, split=split, reason=r.reason) for r in rows]


def _main(args: argparse.Namespace, *, rank: int, world_size: int, started: float) -> int:
    return cli.run_once(args, Stage.REWARD_MODEL, rank=rank, finished=finished, summary_of=summary_of,
                        work=lambda run: train(run, rank, started), what="the reward model",
                        reads=lambda run: [run.spec.reward.training.base, run.spec.reward.training.data.dataset])  # fmt: skip


def train(run: IterativeDPORun, rank: int, started: float) -> RewardModelMetrics:
    from iterdpo_trainer.rm_train import train_reward_model

    inputs = prepare(run, rank)
    training = run.spec.reward.training
    return train_reward_model(
        base=training.base, training=training, tokenizer=inputs.tokenizer, train_pairs=inputs.train,
        held_out=inputs.held_out, destination=inputs.layout.reward_model(),
        metrics_path=inputs.layout.reward_model_metrics(), pairs_left_out=len(inputs.left_out),
        left_out_reasons=[p.reason for p in inputs.left_out[:LEFT_OUT_SHOWN]], started=started,
        objective=inputs.objective,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(
        argv, prog=PROG, first_round=0,
        description="RewardModel stage (round 0, before round 1): train the run's reward model (Bradley-Terry, "
        "or pairwise with kind pairwise) on spec.reward.training's preference pairs with DeepSpeed; writes iter-00/reward_model/model "
        "(Hugging Face checkpoint), left-out.jsonl and metrics.json.",
    )  # fmt: skip
    return cli.launch(args, PROG, _main, label="reward-model")


if __name__ == "__main__":
    sys.exit(main())
