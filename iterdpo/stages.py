"""The stage table: what each stage of a run is, declared once.

A stage is one entry of `STAGES`, in run order. The entry says when the stage runs
(every round, or once before round 1 as "round 0"), the exact command lines of its
processes (the planner's argv, the same locally and in a container), the summary each
process reports to its backend (the termination message, a typed `StageSummary`), how
those summaries become the round's status figures, where its artifacts live and which
files, written last, mark them complete, which pods
it has on Kubernetes, and how a person reads it (a line per stage, columns of the
status table). The planner, the status, the local runner, the report, the CRD and the
operator (through its own table, `iterdpo_operator.stage_children`) all read it; none
of them knows a stage by name.

This module is the one place, with the operator's table, where stage names are
spelled. Of iterdpo it imports only the contracts' error wording and the lineage record at
run time (the spec imports it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Flag, StrEnum, auto
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from iterdpo.contracts import describe
from iterdpo.lineage import Lineage, merge_all

if TYPE_CHECKING:
    from pathlib import Path

    from iterdpo.layout import RunLayout
    from iterdpo.spec import IterativeDPORun

T = TypeVar("T")
REWARD, JUDGE = "reward", "judge"  # Server.key (the SERVERS table below): the one spelling of each server's name


class Stage(StrEnum):
    """The one name of each stage (status.currentStage, conditions, Events, metrics)."""

    SFT = "SFT"
    REWARD_MODEL = "RewardModel"
    GENERATE = "Generate"
    SCORE = "Score"
    TRAIN = "Train"
    EVALUATE = "Evaluate"


class When(Flag):
    """The rounds a stage runs in."""

    BEFORE_ROUNDS = auto()  # once, as round 0, before round 1 (a model to train first, a baseline)
    EVERY_ROUND = auto()  # in each of rounds 1..spec.iterations

    def includes(self, iteration: int) -> bool:
        return bool(self & When.BEFORE_ROUNDS) if iteration == 0 else bool(self & When.EVERY_ROUND)


class SummaryError(ValueError):
    """A stage's processes left no summary, too many, or one without the expected figures."""


# -- what crosses from a stage program to its backend ---------------------------------------
class StageSummary(BaseModel):
    """What one process of a stage reports when it exits 0: its termination message.

    Kubernetes keeps 4096 bytes of it, so it holds figures, not lists. `stage` says which
    stage wrote it; a summary read for another stage is an error, not a silent mix-up."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    stage: str
    lineage: Lineage = Field(default_factory=Lineage)  # what the process read and wrote (iterdpo.lineage)

    def to_message(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, text: str, *, source: str):
        """The summary in `text` (from `source`: a file, a pod), or SummaryError naming the field."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise SummaryError(f"{source} left no valid {cls.__name__} ({describe(exc)})") from None


class Figures(BaseModel):
    """A stage's figures in status.iterations[] (camelCase, like the rest of the status)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# -- the table's vocabulary -------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """One process of a stage."""

    name: str  # unique within the stage, e.g. "generate-shard-0"
    argv: tuple[str, ...]


@dataclass(frozen=True)
class JobContext:
    """What a backend tells the planner about where the stage's processes run."""

    spec_file: str  # the run file as the processes see it
    urls: Mapping[str, str] = field(default_factory=dict)  # Server.key -> where they reach it (the run serves it)
    # The policy the round starts from, when it is not the previous round's checkpoint (evaluation.rollback).
    policy: str | None = None

    @property
    def policy_flag(self) -> tuple[str, ...]:
        return ("--policy", self.policy) if self.policy else ()

    @property
    def reward_url(self) -> str:
        return self.urls[REWARD]

    @property
    def judge_url(self) -> str | None:
        """spec.evaluation.judge's server; None when the run has no judge."""
        return self.urls.get(JUDGE)


@dataclass(frozen=True)
class Pod:
    """A kind of pod on Kubernetes: its key under spec.kubernetes.resources, and the GPUs
    it asks for when the run leaves them unset."""

    key: str
    description: str
    default_gpus: Callable[[object], int]  # of the run's spec
    gpus_doc: str  # the same, in words


@dataclass(frozen=True)
class Program:
    """An `iterdpo` subcommand that a stage's command lines run."""

    name: str
    target: str  # "module:function", called with the remaining argv
    help: str


@dataclass(frozen=True)
class Column:
    """A column of the per-round status table."""

    title: str
    cell: Callable[[BaseModel], str]  # of the round's IterationStatus


@dataclass(frozen=True)
class StageDef:
    """One stage, all of it: what a new stage adds here (docs/architecture.md, "Add a stage")."""

    stage: Stage
    when: When
    status_field: str  # the status.iterations[] field holding its figures
    folder: str  # its artifacts: <root>/<name>/iter-NN/<folder>/
    description: str  # of that status field
    summary: type[StageSummary]  # what each of its processes reports
    figures: type[Figures]  # what status records once it finished
    jobs: Callable[[IterativeDPORun, int, JobContext], tuple[Command, ...]]  # run to completion
    figures_of: Callable[[list, float, IterativeDPORun], Figures]  # its summaries -> figures
    line: Callable[[Figures], str]  # "64 prompts -> 512 samples ..."
    columns: tuple[Column, ...]
    seconds_column: str
    pods: tuple[Pod, ...]  # its own pods (the reward server's is the run's)
    markers: Callable[[RunLayout, int, IterativeDPORun], tuple[Path, ...]]  # written last: its work is on disk
    timeout_seconds: int  # default of spec.kubernetes.stageTimeoutSeconds.<folder>: an attempt's deadline
    programs: tuple[Program, ...] = ()
    servers: tuple[str, ...] = ()  # keys of SERVERS it calls: the backend runs each (that the run serves) beside its jobs
    trains: Callable[[IterativeDPORun], object] | None = None  # the spec section its torchrun trains by
    enabled: Callable[[IterativeDPORun], bool] = field(default=lambda run: True)  # e.g. only when configured

    def record(self, summaries: list, seconds: float, run: IterativeDPORun) -> tuple[Figures, Lineage]:
        """What status records once it finished: its figures, and the lineage of all its processes."""
        try:
            lineage = merge_all((s.lineage for s in summaries), what=f"{self.stage}'s processes")
        except ValueError as exc:
            raise SummaryError(str(exc)) from None
        return self.figures_of(summaries, seconds, run), lineage

    @property
    def deepspeed(self) -> bool:
        """Its jobs train with DeepSpeed under torchrun: on CPUs the backend sets DS_ACCELERATOR=cpu;
        on Kubernetes a training launcher runs it with `trains(run)`'s nodes and processes."""
        return self.trains is not None


def table_of(entries: Mapping[Stage, T], what: str) -> Mapping[Stage, T]:
    """A per-stage table with exactly one entry for every Stage, checked when it is built
    (at import): a stage added to the enum but not to a table fails at once, by name."""
    missing = [s.value for s in Stage if s not in entries]
    if missing:
        raise TypeError(f"{what} has no entry for stage(s) {missing}")
    return MappingProxyType(dict(entries))


def _one(summaries: list, stage: Stage):
    if len(summaries) != 1:
        raise SummaryError(f"{stage} should leave one summary, found {len(summaries)}")
    return summaries[0]


def _figure(it: BaseModel, status_field: str, attr: str):
    """One figure of a round's IterationStatus, None until its stage finished."""
    figures = getattr(it, status_field)
    return None if figures is None else getattr(figures, attr)


def _cell(status_field: str, attr: str, fmt: str = "{}") -> Callable[[BaseModel], str]:
    def cell(it: BaseModel) -> str:
        value = _figure(it, status_field, attr)
        return "-" if value is None else fmt.format(value)

    return cell


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


LEFT_OUT_SHOWN = 3  # reasons a summary carries (the termination message keeps 4096 bytes)
REASON_CHARS = 200


# -- SFT: the policy fine-tuned on a chat dataset once, before round 1 -------------------------
class SftSummary(StageSummary):
    stage: Literal["sft"] = "sft"
    conversations: int  # trained on
    conversations_left_out: int
    left_out_reasons: list[str]  # the first few, each clipped; all of them in left-out.jsonl
    conversations_truncated: int
    rows: int  # training rows per epoch (packed: several conversations each)
    tokens_trained: int  # assistant tokens the loss is on, per epoch
    loss: float
    checkpoint: str
    seconds: float


class SftFigures(Figures):
    conversations: int = Field(description="Conversations the policy was fine-tuned on.")
    conversations_left_out: int = Field(
        description="Rows of the chat dataset that could not be trained on, each listed with its row and reason in "
        "the stage's left-out.jsonl."
    )
    left_out_reasons: list[str] = Field(
        default_factory=list, description="The first 3 reasons a row was left out."
    )
    conversations_truncated: int = Field(description="Conversations cut at policy.sft.maxLength.")
    rows: int = Field(
        description="Training rows per epoch, each at most policy.sft.maxLength tokens: with packing, several "
        "conversations each (globalBatchSize counts rows)."
    )
    tokens_trained: int = Field(description="Assistant tokens the loss is on, per epoch.")
    loss: float = Field(description="Mean next-token loss over the last epoch.")
    checkpoint: str = Field(description="The fine-tuned policy: round 1's policy and the initial DPO reference.")
    seconds: float = Field(description="Wall-clock seconds of the stage.")


def _sft_jobs(run: IterativeDPORun, iteration: int, ctx: JobContext) -> tuple[Command, ...]:
    return (Command("sft", torchrun_argv(SFT.trains(run), "iterdpo_trainer.sft", ctx.spec_file, iteration)),)


def _sft_figures(summaries: list[SftSummary], seconds: float, run: IterativeDPORun) -> SftFigures:
    s = _one(summaries, Stage.SFT)
    return SftFigures(
        conversations=s.conversations, conversations_left_out=s.conversations_left_out,
        left_out_reasons=s.left_out_reasons[:LEFT_OUT_SHOWN], conversations_truncated=s.conversations_truncated,
        rows=s.rows, tokens_trained=s.tokens_trained, loss=_rounded(s.loss), checkpoint=s.checkpoint, seconds=round(seconds, 1),
    )  # fmt: skip


def _sft_line(f: SftFigures) -> str:
    return (
        f"{f.conversations} conversations ({f.conversations_left_out} left out, {f.conversations_truncated} "
        f"truncated) in {f.rows} rows, {f.tokens_trained} assistant tokens, loss {f.loss:.4f} in {f.seconds:.1f}s -> {f.checkpoint}"
    )


# -- RewardModel: a Bradley-Terry reward model trained once, before round 1 --------------------


class RewardModelSummary(StageSummary):
    stage: Literal["reward-model"] = "reward-model"
    pairs: int  # trained on
    pairs_left_out: int
    left_out_reasons: list[str]  # the first few, each clipped; all of them in left-out.jsonl
    pairs_truncated: int
    held_out_pairs: int
    held_out_accuracy: float | None
    held_out_margin: float | None
    loss: float
    checkpoint: str
    seconds: float


class RewardModelFigures(Figures):
    pairs: int = Field(description="Preference pairs the reward model was trained on.")
    pairs_left_out: int = Field(
        description="Rows of the preference data that could not be a pair (unreadable, unusable after the template or "
        "truncation), each listed with its row and reason in the stage's left-out.jsonl."
    )
    left_out_reasons: list[str] = Field(
        default_factory=list, description=f"The first {LEFT_OUT_SHOWN} reasons a row was left out."
    )
    pairs_truncated: int = Field(description="Training pairs with a side cut from the left to reward.maxLength.")
    held_out_pairs: int = Field(description="Held-out pairs evaluated after each epoch.")
    held_out_accuracy: float | None = Field(
        default=None, description="Share of held-out pairs whose chosen side scores higher, after the last epoch."
    )
    held_out_margin: float | None = Field(
        default=None, description="Mean held-out reward of chosen minus rejected, after the last epoch."
    )
    loss: float = Field(description="Mean Bradley-Terry loss over the last epoch.")
    checkpoint: str = Field(description="The trained reward model, which every round's Score serves.")
    seconds: float = Field(description="Wall-clock seconds of the stage.")


def torchrun_argv(training, module: str, spec_file: str, iteration: int) -> tuple[str, ...]:
    """A training stage's one command: torchrun of `module` with the spec's node and process counts."""
    return ("torchrun", f"--nnodes={training.nodes}", f"--nproc-per-node={training.nproc_per_node}", "-m", module,
            "--spec", spec_file, "--iteration", str(iteration))  # fmt: skip


def _reward_model_jobs(run: IterativeDPORun, iteration: int, ctx: JobContext) -> tuple[Command, ...]:
    argv = torchrun_argv(REWARD_MODEL.trains(run), "iterdpo_trainer.reward_model", ctx.spec_file, iteration)
    return (Command("reward-model", argv),)


def _reward_model_figures(summaries: list[RewardModelSummary], seconds: float, run: IterativeDPORun) -> RewardModelFigures:
    s = _one(summaries, Stage.REWARD_MODEL)
    return RewardModelFigures(
        pairs=s.pairs, pairs_left_out=s.pairs_left_out, left_out_reasons=s.left_out_reasons[:LEFT_OUT_SHOWN],
        pairs_truncated=s.pairs_truncated, held_out_pairs=s.held_out_pairs,
        held_out_accuracy=_rounded(s.held_out_accuracy), held_out_margin=_rounded(s.held_out_margin),
        loss=_rounded(s.loss), checkpoint=s.checkpoint, seconds=round(seconds, 1),
    )  # fmt: skip


def _reward_model_line(f: RewardModelFigures) -> str:
    held = ("no held-out pairs" if f.held_out_accuracy is None else
            f"held-out accuracy {f.held_out_accuracy:.3f}, margin {f.held_out_margin:+.3f} ({f.held_out_pairs} pairs)")  # fmt: skip
    return (
        f"reward model: {f.pairs} pairs ({f.pairs_left_out} left out, {f.pairs_truncated} truncated), "
        f"loss {f.loss:.4f}, {held} in {f.seconds:.1f}s -> {f.checkpoint}"
    )


# -- Generate: K responses per prompt with vLLM, one process (or pod) per shard ---------------
class GenerateSummary(StageSummary):
    stage: Literal["generate"] = "generate"
    shard: int
    shards: int
    prompts: int  # given to the shard
    prompts_out: int  # with responses
    samples: int
    prompts_left_out: int
    seconds: float


class GenerationFigures(Figures):
    prompts: int = Field(description="Prompts given to the generator.")
    samples: int = Field(description="Responses sampled.")
    prompts_left_out: int = Field(
        default=0, description="Prompts left out at generation (malformed, or longer than training.maxPromptLength)."
    )
    seconds: float = Field(description="Wall-clock seconds of the stage.")


def _generate_jobs(run: IterativeDPORun, iteration: int, ctx: JobContext) -> tuple[Command, ...]:
    """One process per shard; an Indexed Job drops --shard (its pods read JOB_COMPLETION_INDEX)."""
    argv = ("iterdpo", "generate", "--spec", ctx.spec_file, "--iteration", str(iteration))
    return tuple(Command(f"generate-shard-{i}", (*argv, "--shard", str(i), *ctx.policy_flag))
                 for i in range(run.spec.generation.shards))  # fmt: skip


def _generation_figures(summaries: list[GenerateSummary], seconds: float, run: IterativeDPORun) -> GenerationFigures:
    shards = run.spec.generation.shards
    seen = sorted(s.shard for s in summaries if s.shards == shards)
    if seen != list(range(shards)):
        raise SummaryError(
            f"expected a summary from each of the {shards} generation shards, found shards {seen} "
            f"in {len(summaries)} summaries"
        )
    return GenerationFigures(
        prompts=sum(s.prompts for s in summaries),
        samples=sum(s.samples for s in summaries),
        prompts_left_out=sum(s.prompts_left_out for s in summaries),
        seconds=round(seconds, 1),
    )


def _generation_line(f: GenerationFigures) -> str:
    return f"{f.prompts} prompts -> {f.samples} samples ({f.prompts_left_out} prompts left out) in {f.seconds:.1f}s"


GENERATE = StageDef(
    stage=Stage.GENERATE,
    when=When.EVERY_ROUND,
    status_field="generation",
    folder="generate",
    description="Figures of the Generate stage, once it finished.",
    summary=GenerateSummary,
    figures=GenerationFigures,
    jobs=_generate_jobs,
    figures_of=_generation_figures,
    line=_generation_line,
    columns=(Column("prompts", _cell("generation", "prompts")), Column("samples", _cell("generation", "samples"))),
    seconds_column="gen s",
    timeout_seconds=6 * 3600,
    pods=(Pod("generate", "Each generation shard's pod.", lambda spec: spec.generation.tensor_parallel_size,
              "generation.tensorParallelSize"),),  # fmt: skip
    markers=lambda layout, t, run: tuple(layout.shard_marker(t, i, run.spec.generation.shards)
                                         for i in range(run.spec.generation.shards)),  # fmt: skip
    programs=(Program("generate", "iterdpo_generator.generate:main", "stage: vLLM generation of one shard"),),
)


# -- Score: every response scored by the reward server over HTTP, then paired ------------------
class ScoreSummary(StageSummary):
    stage: Literal["score"] = "score"
    mean_reward: float | None  # None when no response was scored (every prompt left out)
    min_reward: float | None
    max_reward: float | None
    pairs: int
    ties_dropped: int
    prompts_left_out: int
    seconds: float
    details: dict[str, float] = Field(default_factory=dict)  # mean of each named part of the reward
    comparisons: int = 0  # kind pairwise
    forward_passes: int = 0


class ScoringFigures(Figures):
    mean_reward: float | None = Field(
        default=None, description="Mean reward of the round's responses (unset when none was scored)."
    )
    min_reward: float | None = Field(default=None, description="Lowest reward (unset when no response was scored).")
    max_reward: float | None = Field(default=None, description="Highest reward (unset when no response was scored).")
    pairs: int = Field(description="DPO pairs made.")
    ties_dropped: int = Field(description="Prompts without a pair because the candidates' rewards tied.")
    prompts_left_out: int = Field(
        description="Prompts without a pair for another reason (left out at generation, or under 2 responses)."
    )
    seconds: float = Field(description="Wall-clock seconds of the stage.")
    details: dict[str, float] | None = Field(
        default=None,
        description="Mean of each named part of the reward over the round's responses (verifiable: correct and "
        "answered, the shares of responses with the right answer and with any answer); unset when the kind has none.",
    )
    comparisons: int | None = Field(
        default=None, description="Kind pairwise: comparisons the tournaments made (pairing.selection)."
    )
    forward_passes: int | None = Field(
        default=None, description="Kind pairwise: sequences the reward model read (two per comparison)."
    )


FIGURE_DECIMALS = 4


def _score_jobs(run: IterativeDPORun, iteration: int, ctx: JobContext) -> tuple[Command, ...]:
    argv = ("iterdpo", "annotate", "--spec", ctx.spec_file, "--iteration", str(iteration), "--reward-url", ctx.reward_url)
    return (Command("annotate", argv),)


def _rounded(value: float | None) -> float | None:
    """A status figure: 4 decimals (stats.json and metrics.json keep every digit), so that
    `kubectl get` and the table show 0.1235, not 0.12345678901234566."""
    return None if value is None else round(value, FIGURE_DECIMALS)


def _scoring_figures(summaries: list[ScoreSummary], seconds: float, run: IterativeDPORun) -> ScoringFigures:
    s = _one(summaries, Stage.SCORE)
    return ScoringFigures(
        mean_reward=_rounded(s.mean_reward), min_reward=_rounded(s.min_reward), max_reward=_rounded(s.max_reward),
        pairs=s.pairs,
        ties_dropped=s.ties_dropped, prompts_left_out=s.prompts_left_out, seconds=round(seconds, 1),
        details={name: _rounded(v) for name, v in s.details.items()} or None,
        comparisons=s.comparisons or None, forward_passes=s.forward_passes or None,
    )  # fmt: skip


def _scoring_line(f: ScoringFigures) -> str:
    return (
        f"mean reward {_signed(f.mean_reward)} (min {_signed(f.min_reward)}, max {_signed(f.max_reward)}), "
        f"{f.pairs} pairs, {f.ties_dropped} ties dropped, {f.prompts_left_out} prompts left out in {f.seconds:.1f}s"
        + "".join(f", {name} {value:.3f}" for name, value in (f.details or {}).items())
        + (f", {f.comparisons} comparisons ({f.forward_passes} forward passes)" if f.comparisons else "")
    )


def _left_out(it: BaseModel) -> str:
    """Prompts without a pair: the Score stage's count once it ran, else the generator's."""
    if it.generation is None:  # type: ignore[attr-defined]
        return "-"
    return str((it.scoring or it.generation).prompts_left_out)  # type: ignore[attr-defined]


SCORE = StageDef(
    stage=Stage.SCORE,
    when=When.EVERY_ROUND,
    status_field="scoring",
    folder="score",
    description="Figures of the Score stage (reward + pairing), once it finished.",
    summary=ScoreSummary,
    figures=ScoringFigures,
    jobs=_score_jobs,
    figures_of=_scoring_figures,
    line=_scoring_line,
    columns=(
        Column("mean reward", _cell("scoring", "mean_reward", "{:+.3f}")),
        Column("min", _cell("scoring", "min_reward", "{:+.3f}")),
        Column("max", _cell("scoring", "max_reward", "{:+.3f}")),
        Column("pairs", _cell("scoring", "pairs")),
        Column("ties", _cell("scoring", "ties_dropped")),
        Column("left out", _left_out),
    ),
    seconds_column="score s",
    timeout_seconds=6 * 3600,
    pods=(Pod("annotate", "The annotator's pod (calls the reward server).", lambda spec: 0, "0"),),
    markers=lambda layout, t, run: (layout.score_stats(t),),
    programs=(Program("annotate", "iterdpo_reward_server.annotate:annotate_main", "stage: score through the server, pair"),),
    servers=(REWARD,),
)


# -- Train: DPO on the round's pairs with DeepSpeed under torchrun ------------------------------
class TrainSummary(StageSummary):
    stage: Literal["train"] = "train"
    loss: float
    reward_accuracy: float
    reward_margin: float
    checkpoint: str
    seconds: float
    pairs: int
    pairs_truncated: int


class TrainingFigures(Figures):
    loss: float = Field(description="DPO loss at the end of the round's training.")
    reward_accuracy: float = Field(
        description="Share of pairs whose implicit DPO reward prefers the chosen response, at the end of training."
    )
    reward_margin: float = Field(description="Mean implicit DPO reward of chosen minus rejected, at the end of training.")
    checkpoint: str = Field(description="The checkpoint the round produced (the next round's policy).")
    seconds: float = Field(description="Wall-clock seconds of the stage.")


def _train_jobs(run: IterativeDPORun, iteration: int, ctx: JobContext) -> tuple[Command, ...]:
    return (Command("train", (*torchrun_argv(TRAIN.trains(run), "iterdpo_trainer", ctx.spec_file, iteration),
                              *ctx.policy_flag)),)  # fmt: skip


def _training_figures(summaries: list[TrainSummary], seconds: float, run: IterativeDPORun) -> TrainingFigures:
    s = _one(summaries, Stage.TRAIN)
    return TrainingFigures(
        loss=_rounded(s.loss), reward_accuracy=_rounded(s.reward_accuracy), reward_margin=_rounded(s.reward_margin),
        checkpoint=s.checkpoint,
        seconds=round(seconds, 1),
    )  # fmt: skip


def _training_line(f: TrainingFigures) -> str:
    return (
        f"loss {f.loss:.4f}, reward accuracy {f.reward_accuracy:.2f}, "
        f"reward margin {f.reward_margin:+.4f} in {f.seconds:.1f}s -> {f.checkpoint}"
    )


TRAIN = StageDef(
    stage=Stage.TRAIN,
    when=When.EVERY_ROUND,
    status_field="training",
    folder="train",
    description="Figures of the Train stage, once it finished.",
    summary=TrainSummary,
    figures=TrainingFigures,
    jobs=_train_jobs,
    figures_of=_training_figures,
    line=_training_line,
    columns=(
        Column("loss", _cell("training", "loss", "{:.4f}")),
        Column("acc", _cell("training", "reward_accuracy", "{:.2f}")),
        Column("margin", _cell("training", "reward_margin", "{:+.4f}")),
    ),
    seconds_column="train s",
    timeout_seconds=24 * 3600,
    pods=(Pod("train", "Each training node's pod.", lambda spec: spec.training.nproc_per_node, "training.nprocPerNode"),),
    markers=lambda layout, t, run: (layout.train_metrics(t),),
    trains=lambda run: run.spec.training,
)


SFT = StageDef(
    stage=Stage.SFT,
    when=When.BEFORE_ROUNDS,
    status_field="sft",
    folder="sft",
    description="Figures of the SFT stage (round 0, when spec.policy.sft is set), once it finished.",
    summary=SftSummary,
    figures=SftFigures,
    jobs=_sft_jobs,
    figures_of=_sft_figures,
    line=_sft_line,
    columns=(),  # round 0 has no samples: the line says it all
    seconds_column="sft s",
    timeout_seconds=24 * 3600,
    pods=(Pod("sft", "Each SFT training node's pod.", lambda spec: spec.policy.sft.nproc_per_node
              if spec.policy.sft else 1, "policy.sft.nprocPerNode"),),  # fmt: skip
    markers=lambda layout, t, run: (layout.sft_metrics(),),
    trains=lambda run: run.spec.policy.sft,
    enabled=lambda run: run.spec.policy.sft is not None,
)


REWARD_MODEL = StageDef(
    stage=Stage.REWARD_MODEL,
    when=When.BEFORE_ROUNDS,
    status_field="reward_model",
    folder="reward_model",
    description="Figures of the RewardModel stage (round 0, when spec.reward.training is set), once it finished.",
    summary=RewardModelSummary,
    figures=RewardModelFigures,
    jobs=_reward_model_jobs,
    figures_of=_reward_model_figures,
    line=_reward_model_line,
    columns=(),  # round 0 has no samples: the line says it all
    seconds_column="rm s",
    timeout_seconds=24 * 3600,
    pods=(Pod("rm", "Each reward-model training node's pod.", lambda spec: spec.reward.training.nproc_per_node
              if spec.reward.training else 1, "reward.training.nprocPerNode"),),  # fmt: skip
    markers=lambda layout, t, run: (layout.reward_model_metrics(),),
    trains=lambda run: run.spec.reward.training,
    enabled=lambda run: run.spec.reward.training is not None,
)


# -- Evaluate: the round's new policy (round 0: the initial one) on held-out prompts -------------
KL_ESTIMATOR = ("k1: the mean over responses of log pi(y|x) - log pi_ref(y|x), summed over the response's tokens, "
                "both read by transformers; unbiased for sampled responses, a log-ratio along the greedy response "
                "at temperature 0")  # fmt: skip


class EvaluateSummary(StageSummary):
    stage: Literal["evaluate"] = "evaluate"
    policy: str  # the policy evaluated
    prompts: int  # in the evaluation set
    prompts_left_out: int
    left_out_reasons: list[str]
    overlap: int  # prompts also in a training set (only with evaluation.allowOverlap)
    samples: int
    mean_reward: float | None  # under the run's reward model (None for a comparing kind)
    judge_reward: float | None  # under evaluation.judge (None without one, or for a comparing kind)
    win_rate: float | None  # against round 0's responses (None in round 0)
    win_rate_low: float | None
    win_rate_high: float | None
    judged_by: Literal["judge", "reward"]
    length_mean: float  # response tokens
    length_p90: float
    length_ratio: float | None  # to round 0's mean
    truncated_share: float  # stopped at maxNewTokens without an end token
    kl: float  # KL_ESTIMATOR, nats per response
    comparisons: int = 0
    seconds: float


class EvaluationFigures(Figures):
    policy: str = Field(description="The policy evaluated: the round's trained checkpoint (round 0: the initial policy).")
    prompts: int = Field(description="Prompts read from spec.evaluation.prompts: the ones answered and the promptsLeftOut.")
    prompts_left_out: int = Field(
        description="Evaluation prompts left out (malformed, longer than training.maxPromptLength, or a reward could "
        "not score them), with the first reasons in leftOutReasons."
    )
    left_out_reasons: list[str] = Field(default_factory=list, description=f"The first {LEFT_OUT_SHOWN} reasons.")
    overlap: int = Field(
        default=0, description="Evaluation prompts that are also training prompts of a round (evaluation.allowOverlap)."
    )
    samples: int = Field(description="Responses scored.")
    mean_reward: float | None = Field(
        default=None, description="Mean reward under the run's reward model (unset for kind pairwise, which scores none)."
    )
    judge_reward: float | None = Field(
        default=None, description="Mean reward under evaluation.judge (unset without a judge, or for a pairwise one)."
    )
    win_rate: float | None = Field(
        default=None,
        description="Share of prompts whose response beats the initial policy's (round 0's) to the same prompt: a "
        "pairwise judge's probability, else scored higher, ties counting half; unset in round 0.",
    )
    win_rate_low: float | None = Field(default=None, description="Lower end of the win rate's 95% Wilson interval.")
    win_rate_high: float | None = Field(default=None, description="Upper end of the win rate's 95% Wilson interval.")
    judged_by: Literal["judge", "reward"] = Field(
        description="What the win rate is judged by: evaluation.judge, or the run's reward model without one."
    )
    length_mean: float = Field(description="Mean response length in the policy's tokens.")
    length_p90: float = Field(description="90th percentile of the response length (nearest rank).")
    length_ratio: float | None = Field(default=None, description="Mean response length over round 0's.")
    truncated_share: float = Field(
        description="Share of responses that stopped at the token limit without an end token."
    )
    kl: float = Field(description="Estimated KL(policy || initial policy) in nats per response; " + KL_ESTIMATOR + ".")
    comparisons: int | None = Field(default=None, description="Comparisons a pairwise judge made (two forward passes each).")
    seconds: float = Field(description="Wall-clock seconds of the stage.")


def _evaluate_jobs(run: IterativeDPORun, iteration: int, ctx: JobContext) -> tuple[Command, ...]:
    argv = ("iterdpo", "evaluate", "--spec", ctx.spec_file, "--iteration", str(iteration), "--reward-url", ctx.reward_url)
    if ctx.judge_url is not None:
        argv += ("--judge-url", ctx.judge_url)
    return (Command("evaluate", argv),)


def _evaluation_figures(summaries: list[EvaluateSummary], seconds: float, run: IterativeDPORun) -> EvaluationFigures:
    s = _one(summaries, Stage.EVALUATE)
    r = _rounded
    return EvaluationFigures(
        policy=s.policy, prompts=s.prompts, prompts_left_out=s.prompts_left_out,
        left_out_reasons=s.left_out_reasons[:LEFT_OUT_SHOWN], overlap=s.overlap, samples=s.samples,
        mean_reward=r(s.mean_reward), judge_reward=r(s.judge_reward), win_rate=r(s.win_rate),
        win_rate_low=r(s.win_rate_low), win_rate_high=r(s.win_rate_high), judged_by=s.judged_by,
        length_mean=r(s.length_mean), length_p90=r(s.length_p90), length_ratio=r(s.length_ratio),
        truncated_share=r(s.truncated_share), kl=r(s.kl), comparisons=s.comparisons or None,
        seconds=round(seconds, 1),
    )  # fmt: skip


def _evaluation_line(f: EvaluationFigures) -> str:
    win = "" if f.win_rate is None else (f", win rate {f.win_rate:.3f} [{f.win_rate_low:.3f}, {f.win_rate_high:.3f}] "
                                         f"by the {f.judged_by}")  # fmt: skip
    ratio = "" if f.length_ratio is None else f" (x{f.length_ratio:.2f})"
    return (
        f"evaluation of {f.samples} responses to {f.prompts} prompts ({f.prompts_left_out} left out): reward "
        f"{_signed(f.mean_reward)}, judge {_signed(f.judge_reward)}{win}, length {f.length_mean:.1f} tokens{ratio}, "
        f"p90 {f.length_p90:.0f}, {f.truncated_share:.0%} truncated, KL {f.kl:.3f} in {f.seconds:.1f}s"
    )


EVALUATE = StageDef(
    stage=Stage.EVALUATE,
    when=When.BEFORE_ROUNDS | When.EVERY_ROUND,
    status_field="evaluation",
    folder="evaluate",
    description="Figures of the Evaluate stage (spec.evaluation): the round's new policy on held-out prompts.",
    summary=EvaluateSummary,
    figures=EvaluationFigures,
    jobs=_evaluate_jobs,
    figures_of=_evaluation_figures,
    line=_evaluation_line,
    columns=(
        Column("eval", _cell("evaluation", "mean_reward", "{:+.3f}")),
        Column("judge", _cell("evaluation", "judge_reward", "{:+.3f}")),
        Column("win", _cell("evaluation", "win_rate", "{:.2f}")),
        Column("len x", _cell("evaluation", "length_ratio", "{:.2f}")),
        Column("kl", _cell("evaluation", "kl", "{:.3f}")),
    ),
    seconds_column="eval s",
    timeout_seconds=6 * 3600,
    pods=(Pod("evaluate", "The evaluator's pod (vLLM on the held-out prompts, then the reward servers).",
              lambda spec: spec.generation.tensor_parallel_size, "generation.tensorParallelSize"),),  # fmt: skip
    markers=lambda layout, t, run: (layout.evaluation_report(t),),
    programs=(Program("evaluate", "iterdpo_evaluator.evaluate:main", "stage: evaluate a round's policy"),),
    servers=(REWARD, JUDGE),
    enabled=lambda run: run.spec.evaluation is not None,
)


# -- the table ------------------------------------------------------------------------------
STAGES: tuple[StageDef, ...] = (SFT, REWARD_MODEL, GENERATE, SCORE, TRAIN, EVALUATE)  # run order within a round
STAGE_TABLE: Mapping[Stage, StageDef] = table_of({d.stage: d for d in STAGES}, "iterdpo.stages.STAGES")

# -- the model servers the stages call (not stages) ---------------------------------------------
@dataclass(frozen=True)
class Server:
    """A model server some stages call: `iterdpo serve-reward` over one reward of the spec. The
    backend runs it while a stage that calls it runs (on Kubernetes a Deployment + Service named
    <run>-<key>, scaled to zero otherwise; spec.kubernetes.keepRewardWarm keeps the reward's up)."""

    key: str  # its name word, its pods' component label and its key under spec.kubernetes.resources
    pod: Pod
    port: int  # where it listens (locally: a free port instead)
    flags: tuple[str, ...]  # after serve-reward's argv: which reward of the spec it serves
    spec_field: str  # that reward's place in the spec, for messages
    serves: Callable[[object], object | None]  # the run's spec -> that RewardSpec; None: this run has none

    def startup_timeout_seconds(self, spec) -> float:
        return self.serves(spec).startup_timeout_seconds


def _judge(spec):
    return spec.evaluation.judge if spec.evaluation is not None else None


SERVERS: tuple[Server, ...] = (
    Server(REWARD, Pod("reward", "The reward server's pod.", lambda spec: 1 if spec.reward.loads_model else 0,
                       "1, or 0 when it loads no model (verifiable, length, or a composite of those)"),
           8000, (), "spec.reward", lambda spec: spec.reward),
    Server(JUDGE, Pod("judge", "The evaluation judge's server pod (spec.evaluation.judge).",
                      lambda spec: 1 if _judge(spec) is not None and _judge(spec).loads_model else 0,
                      "1 when the judge loads a model, else 0"),
           8001, ("--judge",), "spec.evaluation.judge", _judge),
)  # fmt: skip
SERVER_TABLE: Mapping[str, Server] = MappingProxyType({s.key: s for s in SERVERS})
for _d in STAGES:
    if unknown := set(_d.servers) - set(SERVER_TABLE):
        raise TypeError(f"{_d.stage}: servers {sorted(unknown)} are not in iterdpo.stages.SERVERS")
REWARD_SERVER = Program("serve-reward", "iterdpo_reward_server.cli:main", "stage: the reward-model HTTP server")


def servers_of(run: IterativeDPORun, d: StageDef) -> tuple[Server, ...]:
    """The servers stage `d` calls that this run serves (the judge only with spec.evaluation.judge)."""
    return tuple(SERVER_TABLE[k] for k in d.servers if SERVER_TABLE[k].serves(run.spec) is not None)


def run_servers(run: IterativeDPORun) -> tuple[Server, ...]:
    """Every server some enabled stage of this run calls, in SERVERS order."""
    called = {s.key for d in STAGES if d.enabled(run) for s in servers_of(run, d)}
    return tuple(s for s in SERVERS if s.key in called)


def clients(server: Server) -> tuple[Stage, ...]:
    """The stages that call `server`, in run order."""
    return tuple(d.stage for d in STAGES if server.key in d.servers)


PROGRAMS: tuple[Program, ...] = (*(p for d in STAGES for p in d.programs), REWARD_SERVER)


def stage_def(stage: str) -> StageDef:
    """The table's entry of `stage`; an unknown name is an error that names it."""
    try:
        return STAGE_TABLE[Stage(stage)]
    except ValueError:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(s.value for s in Stage)}") from None


def pods(stages: Iterable[StageDef] = STAGES) -> tuple[Pod, ...]:
    """Every kind of pod, in run order: each stage's, the reward server's before its first user."""
    out: dict[str, Pod] = {}
    for d in stages:
        for pod in tuple(SERVER_TABLE[k].pod for k in d.servers) + d.pods:
            out.setdefault(pod.key, pod)
    return tuple(out.values())


@dataclass(frozen=True)
class Headline:
    """The figure a run is judged by, round after round (the table's trend line, the CRD's
    Reward column, the operator's metric): the mean reward of the round's own samples."""

    stage: Stage
    field: str

    def of(self, iteration_status: BaseModel) -> float | None:
        return _figure(iteration_status, STAGE_TABLE[self.stage].status_field, self.field)

    @property
    def json_path(self) -> str:
        d = STAGE_TABLE[self.stage]
        return f"{d.status_field}.{d.figures.model_fields[self.field].alias or self.field}"


HEADLINE = Headline(Stage.SCORE, "mean_reward")
