"""Typed contracts: every file one stage program writes and another reads.

One pydantic model per file (or per line of a JSONL file), used by the writer and the
reader alike, so that a field renamed on one side fails loudly on the other. Reading
validates and names the file, the line and the field at fault (`ContractError`, a
`StageError`: exit 1). Writing goes through `iterdpo.atomic` (temporary name, then
rename), so a file that exists is complete. The keys on disk are what
`docs/artifacts.md` lists (the older files keep their snake_case keys).

Unknown keys are ignored on read (a newer writer may add a field); missing or
mistyped ones are errors. What a stage reports to its *backend* (the termination
message) is not here: each stage's summary is declared with the stage, in
`iterdpo/stages.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from iterdpo.atomic import write_json, write_jsonl
from iterdpo.errors import StageError

M = TypeVar("M", bound=BaseModel)
MAX_ERRORS_SHOWN = 3


class ContractError(StageError):
    """A file between stages is missing a field, has one of the wrong type, or does not add up."""


class Snake(BaseModel):
    """A contract whose keys on disk are the Python names (prompt_id, prompts_in)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Camel(BaseModel):
    """A contract whose keys on disk are camelCase (promptsIn), like the run file and status."""

    model_config = ConfigDict(extra="ignore", frozen=True, alias_generator=to_camel, populate_by_name=True)


# -- shared pieces ------------------------------------------------------------------------
class Message(Snake):
    role: str
    content: str


Conversation = Annotated[list[Message], Field(min_length=1)]


class LeftOut(Snake):
    """A prompt that ends without a pair, and why."""

    prompt_id: str
    reason: str


# -- Generate -> Score ----------------------------------------------------------------------
class GeneratedRecord(Snake):
    """One line of `iter-NN/generate/shard-I-of-N.jsonl`: a prompt and its K responses."""

    prompt_id: Annotated[str, Field(min_length=1)]
    prompt: Conversation
    responses: list[str]
    finish_reasons: list[str | None] = Field(default_factory=list)
    response_tokens: list[int] = Field(default_factory=list)
    answer: str | None = None  # the prompt's gold answer (spec.prompts.answerField), for rule rewards


class ShardMarker(Snake):
    """`shard-I-of-N.done.json`, written after its shard: the shard is complete, with these counts."""

    iteration: int
    shard: int
    shards: int
    policy: str
    prompts_in: Annotated[int, Field(ge=0)]  # the shard's range of the prompt set
    prompts_out: Annotated[int, Field(ge=0)]  # lines written
    samples: Annotated[int, Field(ge=0)]
    left_out: list[LeftOut] = Field(default_factory=list)
    seconds: float

    @model_validator(mode="after")
    def _adds_up(self) -> ShardMarker:
        if self.prompts_in != self.prompts_out + len(self.left_out):
            raise ValueError(
                f"does not add up: prompts_in={self.prompts_in} but prompts_out={self.prompts_out} "
                f"+ left_out={len(self.left_out)}"
            )
        return self


# -- Score -> Train ---------------------------------------------------------------------------
class ScoredRecord(Snake):
    """One line of `iter-NN/score/scored.jsonl`: every response of a prompt with its reward."""

    prompt_id: str
    prompt: Conversation
    responses: list[str]
    rewards: list[float]
    answer: str | None = None  # the prompt's gold answer, when the prompt set has one


class PairRecord(Snake):
    """One line of `iter-NN/score/pairs.jsonl`: what DPO trains on."""

    prompt_id: str
    prompt: Conversation
    chosen: str
    rejected: str
    chosen_reward: float
    rejected_reward: float
    margin: float  # chosen_reward - rejected_reward, as the pairing strategy saw it


class ScoreStats(Camel):
    """`iter-NN/score/stats.json`, written last: every prompt of the round accounted for."""

    prompts_in: int
    responses_scored: int
    mean_reward: float | None  # None when nothing was scored
    min_reward: float | None
    max_reward: float | None
    pairs: int
    ties_dropped: int
    prompts_left_out: int
    left_out: list[LeftOut]
    prompts_not_k: int  # prompts with a response count other than K, paired all the same
    truncated: int  # conversations cut to reward.maxLength
    strategy: str
    seconds: float
    details: dict[str, float] = Field(default_factory=dict)  # mean of each named part of the reward (verifiable: correct, answered)
    comparisons: int = 0  # kind pairwise: the tournaments' comparisons (each one two forward sequences)
    forward_passes: int = 0  # kind pairwise: sequences the reward model read

    @model_validator(mode="after")
    def _adds_up(self) -> ScoreStats:
        accounted = self.pairs + self.ties_dropped + self.prompts_left_out
        if self.prompts_in != accounted:
            raise ValueError(
                f"prompt accounting is off: promptsIn={self.prompts_in} but pairs + tiesDropped + "
                f"promptsLeftOut = {accounted}"
            )
        if self.prompts_left_out != len(self.left_out):
            raise ValueError(f"promptsLeftOut={self.prompts_left_out} but leftOut lists {len(self.left_out)}")
        return self


# -- Train ------------------------------------------------------------------------------------
class StepMetrics(BaseModel):
    """One optimizer step's figures, under TRL's metric names."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    loss: float
    rewards_chosen: float = Field(alias="rewards/chosen")
    rewards_rejected: float = Field(alias="rewards/rejected")
    rewards_accuracies: float = Field(alias="rewards/accuracies")
    rewards_margins: float = Field(alias="rewards/margins")
    step: int
    epoch: float
    learning_rate: float


class PhaseSeconds(Camel):
    reference_pass: float
    training_loop: float
    checkpoint_save: float


class TrainMetrics(Camel):
    """`iter-NN/train/metrics.json`, written after the checkpoint: the round is trained."""

    final: StepMetrics  # loss and rewards averaged over the last epoch; step, epoch, lr of the last step
    steps: list[StepMetrics]
    pairs: int
    pairs_truncated: int
    pairs_repeated_to_fill_last_step: int
    seconds: float
    phase_seconds: PhaseSeconds
    pairs_ended_with_eos: int = 0  # the template's assistant turn could not be cut out: response + EOS
    checkpoint: str
    reference: str
    policy: str
    world_size: int


# -- SFT -> Generate (round 1's policy) ------------------------------------------------------
class SftStepMetrics(Camel):
    step: int
    epoch: float
    loss: float  # mean next-token loss over the step's assistant tokens, all ranks
    learning_rate: float


class SftMetrics(Camel):
    """`iter-00/sft/metrics.json`, written after the checkpoint: the policy is fine-tuned."""

    conversations: int
    conversations_left_out: int  # each in left-out.jsonl (a LeftOutPair line: row, split, reason)
    left_out_reasons: list[str] = Field(default_factory=list)  # the first few
    conversations_truncated: int
    rows: int  # training rows per epoch (packed: several conversations each)
    tokens_trained: int  # assistant tokens the loss is on, per epoch
    rows_repeated_to_fill_last_step: int
    steps: list[SftStepMetrics]
    final_loss: float  # mean over the last epoch's steps
    seconds: float
    checkpoint: str
    base: str
    world_size: int


# -- RewardModel -> Score (the served model) ------------------------------------------------
class LeftOutPair(Camel):
    """One line of a round-0 stage's `left-out.jsonl` (`iter-00/reward_model/`, `iter-00/sft/`):
    a row of its dataset that it could not train on."""

    row: int  # 0-based row id in its split
    split: str
    reason: str  # starts with where: "line 18: ..." (JSONL) or "row 17: ..."


class RMStepMetrics(Camel):
    step: int
    epoch: float
    loss: float  # mean BT loss over the step's pairs, all ranks
    accuracy: float  # share of the step's pairs with r_chosen > r_rejected
    margin: float  # mean r_chosen - r_rejected (the data's margin not subtracted)
    learning_rate: float


class HeldOutMetrics(Camel):
    epoch: int  # 1-based: evaluated at the end of this epoch
    pairs: int
    accuracy: float
    margin: float


class RewardModelMetrics(Camel):
    """`iter-00/reward_model/metrics.json`, written after the checkpoint: the reward model is trained."""

    objective: str = Field(default="bradley-terry", description="what it was trained as: spec.reward.kind")
    pairs: int = Field(description="training pairs used")
    pairs_left_out: int = Field(description="rows read but unusable, each in left-out.jsonl")
    left_out_reasons: list[str] = Field(default_factory=list, description="the first few of them")
    pairs_truncated: int = Field(description="training pairs with a side cut from the left to maxLength")
    pairs_repeated_to_fill_last_step: int
    held_out_pairs: int
    held_out_pairs_truncated: int
    steps: list[RMStepMetrics]
    final_loss: float = Field(description="mean loss over the last epoch's steps")
    held_out: list[HeldOutMetrics] = Field(description="one evaluation per epoch (empty without held-out pairs)")
    held_out_accuracy: float | None = Field(description="the last epoch's held-out accuracy")
    held_out_margin: float | None
    seconds: float
    checkpoint: str
    base: str
    world_size: int


# -- Evaluate (a later round's Evaluate reads round 0's, the baseline) -------------------------
class EvalRecord(Snake):
    """One line of `iter-NN/evaluate/responses.jsonl`: a held-out prompt, the policy's
    responses, their scores and log-probabilities."""

    prompt_id: Annotated[str, Field(min_length=1)]
    digest: str  # iterdpo.evaluation.prompt_digest: the same prompt in any round
    prompt: Conversation
    answer: str | None = None
    responses: list[str]
    response_tokens: list[int]
    finish_reasons: list[str | None]
    rewards: list[float] | None = None  # under the run's reward model (None: a comparing kind)
    judge: list[float] | None = None  # under spec.evaluation.judge (None: none, or a comparing kind)
    win: float | None = None  # this prompt's outcome against round 0's responses (None in round 0)
    policy_logps: list[float]  # each response's summed log-probability under the policy
    reference_logps: list[float]  # ... under the initial policy


class EvaluationReport(Camel):
    """`iter-NN/evaluate/report.json`, written last (the marker): the stage's summary, which
    `iterdpo.stages.EvaluateSummary` reads, and every prompt left out with its reason."""

    summary: dict
    left_out: list[LeftOut]


# -- the run folder ---------------------------------------------------------------------------
class RecipeMarker(Camel):
    """`<root>/<name>/recipe.json`: which recipe owns the run folder."""

    name: str
    spec_hash: str


# -- reading and writing ----------------------------------------------------------------------
def read_model(path: Path, model: type[M], *, what: str | None = None) -> M:
    """The validated contents of `path`; ContractError names the file and the field."""
    where = what or str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ContractError(f"{where} not found") from None
    except OSError as exc:
        raise ContractError(f"{where}: cannot read it: {exc.strerror}") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise ContractError(f"{where} is not a valid {model.__name__}: {describe(exc)}") from None


def read_lines(path: Path, model: type[M]) -> list[M]:
    """Every non-blank line of a JSONL file, validated; ContractError names file:line and field."""
    out: list[M] = []
    try:
        fh = open(path)
    except FileNotFoundError:
        raise ContractError(f"{path} not found") from None
    with fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                out.append(model.model_validate_json(line))
            except ValidationError as exc:
                raise ContractError(f"{path}:{number} is not a valid {model.__name__}: {describe(exc)}") from None
    return out


def write_model(path: Path, value: BaseModel) -> None:
    write_json(path, value.model_dump(mode="json", by_alias=True))


def write_lines(path: Path, values: list[BaseModel]) -> int:
    return write_jsonl(path, (v.model_dump(mode="json", by_alias=True) for v in values))


def describe(exc: ValidationError) -> str:
    """'field.path: message' for the first few errors (never the whole input)."""
    parts = []
    for err in exc.errors()[:MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in err["loc"]) or "(the whole document)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if err["type"] != "json_invalid" else f"not JSON ({msg})")
    more = len(exc.errors()) - MAX_ERRORS_SHOWN
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
