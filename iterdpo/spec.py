"""The typed `IterativeDPORun` resource: the single source of truth.

Every stage program, the local runner and the operator read the same model, so
a value (K, the chat template, the batch sizes) cannot differ between stages.
Field names are the camelCase ones a user writes in YAML; Python code uses the
snake_case attribute names. Unknown fields are rejected, not ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.alias_generators import to_camel

from iterdpo import __version__
from iterdpo.kubevalues import StringFormat, AbsolutePath, DnsLabel, DnsSubdomain, Image, LabelValue, QualifiedName, Quantity, SecretKey
from iterdpo.stages import STAGES, pods
from iterdpo.tournament import SELECTIONS
from iterdpo.yamlfile import short

API_VERSION = "iterdpo.io/v1alpha1"
KIND = "IterativeDPORun"
DEFAULT_IMAGE = f"iterdpo:{__version__}"  # the Dockerfile's runtime target, as docs/image.md tags it

PAIRING_STRATEGIES = ("max_min", "max_random", "max_max", "random", "max_min_length_penalty")
# Each reward-model kind and each DPO loss type, with what it means: the spec's enum and its
# description come from here; the reward server's scorer registry and the trainer's loss
# registry must have exactly these keys (a unit test checks).
SCORER_KINDS = {
    "bradley-terry": "a sequence classifier with one output label; the score is that logit at the last token",
    "multi-objective": "ArmoRM's checkpoint layout (LlamaForRewardModelWithGating): per-objective rewards at the "
                       "last token, mixed by a gating network read at the assistant-turn tokens; the score is the "
                       "gated sum, or with reward.objectiveWeights a weighted sum of the named objectives",
    "pairwise": "a causal-LM preference model read as the report's pair-pm code reads it ([CONTEXT] ... [RESPONSE A] "
                "... [RESPONSE B] ... as one user turn; p(A) from the A and B logits at the last position, both "
                "orders averaged); each prompt's pair comes from pairing.selection's tournament",
    "verifiable": "no model: a rule checks each response's final answer against its prompt's gold answer "
                  "(prompts.answerField) with math-verify, scored as reward.verifiable says",
    "length": "no model: the response's length in characters; a component of composite (a length penalty, "
              "with a negative weight), not a reward on its own",
    "composite": "a weighted sum of reward.components (e.g. a reward model plus a verifiable check, or plus a "
                 "length penalty); each component's mean is reported per round",
}
# The kinds that read reward.model (or the model reward.training trains); the others load none
# of their own (a rule, or composite's components), and a reward pod that loads no model asks
# for no GPU.
MODEL_KINDS = ("bradley-terry", "multi-objective", "pairwise")
TRAINABLE_KINDS = ("bradley-terry", "pairwise")  # reward.training trains a model of these kinds (rm_train.OBJECTIVES)
COMPARING_KINDS = ("pairwise",)  # judge two responses, score none: paired by pairing.selection's tournament
COMPONENT_KINDS = tuple(k for k in SCORER_KINDS if k != "composite" and k not in COMPARING_KINDS)  # a term scores one
MAX_COMPONENTS = 8
TERM_NAME = StringFormat(
    "term name",
    "a name of lowercase letters, digits and '-', starting with a letter, at most 32 characters, such as 'rm' or 'math'",
    r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
    32,
)
ANSWER_FORMATS = ("boxed", "any")
LOSS_KINDS = {
    "sigmoid": "the original DPO loss, -log sigmoid(beta x margin), with optional label smoothing: the conservative "
               "DPO (cDPO) form the report's code uses (TRL 1.16's sigmoid loss ignores label_smoothing)",
}
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("bf16", "fp16", "fp32")
PREFERENCE_FORMATS = ("auto", "implicit", "explicit")
DEFAULT_HELD_OUT_SHARE = 0.05
REFERENCE_MODES = ("initial", "previous")
TRAIN_LAUNCHERS = ("pytorchjob", "job")  # Kubeflow Trainer v2's TrainJob is the planned third
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# RFC 1035 label: what Kubernetes accepts as a Service name (the reward Service and
# Kubeflow's per-replica Services are named after the run), so it starts with a letter.
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 40  # leaves room for child suffixes such as "-i03-generate" within 63

# Upper bounds of user numbers: generous for any real recipe, and small enough that no later
# arithmetic (timeouts, back-off, seeds, token budgets) overflows. Seeds: numpy's range.
MAX_SEED = 2**32 - 1
MAX_TOKENS = 1 << 21  # context lengths: 2M tokens
MAX_SECONDS = 7 * 24 * 3600.0
MAX_RETRY_BACKOFF_SECONDS = 24 * 3600.0
MAX_ITEMS_PER_REQUEST = 4096  # the reward server's limit; reward.requestBatchSize may not exceed it
LOCAL_PREFIXES = ("/", "./", "../")


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )


def is_local(value: str) -> bool:
    """A model or dataset value names a local path (else it is a hub id): the spec's one rule."""
    return value.startswith(LOCAL_PREFIXES) or value in (".", "..")


def _model_or_hub_id(value: str) -> str:
    """A local path (/, ./, ../) or a well-formed hub id: anything else can only fail later,
    inside a stage, as an opaque download error."""
    if is_local(value):
        return value
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise ValueError(f"{short(value)} is neither a local path (those start with /, ./ or ../) nor a hub id "
                         "(name or namespace/name: letters, digits, '-', '_', '.', at most 96 characters)") from None  # fmt: skip
    return value


def _compiles(template: str | None) -> str | None:
    """A chat template must compile, as transformers compiles it, before any stage loads it."""
    if template is None:
        return None
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
                                      ).parse(template)  # fmt: skip
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the chat template does not compile: line {exc.lineno}: {short(exc.message, 120)[1:-1]}") from None
    return template


ModelRef = Annotated[str, AfterValidator(_model_or_hub_id)]
ChatTemplate = Annotated[str | None, AfterValidator(_compiles)]


class ObjectMeta(BaseModel):
    """The part of Kubernetes' metadata iterdpo reads; the rest is kept as given."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(description="Name of the run; names its artifacts and children.")
    namespace: DnsLabel | None = Field(default=None, description="Kubernetes namespace (ignored by the local runner).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if len(name) > MAX_NAME_LENGTH or not _NAME_RE.match(name):
            raise ValueError(
                f"must be lowercase letters, digits and '-', start with a letter and end with a letter or digit, "
                f"at most {MAX_NAME_LENGTH} characters (got {short(name)})"
            )
        return name


class PromptSource(_Model):
    """A prompt dataset: JSONL, Parquet or Arrow file (or folder), or a hub id."""

    dataset: ModelRef = Field(description="Local path (absolute, ./ or ../) or hub id.")
    split: str = Field(default="train", description="Split to read.")
    messages_field: str = Field(
        default="messages",
        description="Field holding the prompt: a list of {role, content} messages, "
        "or a string taken as one user message.",
    )
    max_prompts: Annotated[int, Field(ge=1, le=1 << 31)] | None = Field(
        default=None, description="Use only the first N rows (ids 0..N-1), rows left out included (all when unset)."
    )


class RoundPromptSource(PromptSource):
    """A prompt set rounds generate from: a prompt, and for rule rewards its gold answer."""

    answer_field: str | None = Field(
        default=None,
        description="Field holding each prompt's gold answer (a string or a number), which reward kind verifiable "
        "checks responses against; a row without one is left out with that reason.",
    )


class PromptsSpec(RoundPromptSource):
    """The prompt set of every round, or a different one per round."""

    dataset: ModelRef | None = Field(
        default=None, description="Local path (absolute, ./ or ../) or hub id; required without perIteration."
    )
    per_iteration: list[RoundPromptSource] | None = Field(
        default=None,
        description="One prompt set per round (the report uses a fresh set each round); "
        "when set, its length must equal spec.iterations.",
    )


class GenerationSpec(_Model):
    samples_per_prompt: Annotated[int, Field(ge=2, le=1024)] = Field(
        default=8, description="Responses sampled per prompt (K); pairing needs at least 2."
    )
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = Field(default=1.0, description="Sampling temperature (0: greedy).")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(default=1.0, description="Nucleus sampling mass.")
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = Field(default=2048, description="Most tokens per response.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    stop_token_ids: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(
        default_factory=list, description="Stop token ids, besides the tokenizer's eos and the special tokens the "
        "policy's chat template ends an assistant turn with (e.g. Llama-3's <|eot_id|>), which Train teaches."
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(default=42, description="Base seed; each prompt's seed derives from it.")
    shards: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=1, description="Generation shards (one process or pod each)."
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.9,
        description="vLLM's memory fraction for weights and KV cache (on a CPU build: of host memory).",
    )
    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="GPUs one vLLM engine spans (tensor parallelism)."
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip vLLM's graph compilation: faster start-up, slower decoding. "
        "Worth it for tiny models and short rounds.",
    )
    max_model_len: Annotated[int, Field(ge=16, le=MAX_TOKENS)] | None = Field(
        default=None, description="vLLM context length; default training.maxLength."
    )


class PairingSpec(_Model):
    strategy: Literal[PAIRING_STRATEGIES] = Field(  # type: ignore[valid-type]
        default="max_min",
        description="max_min: best vs worst; max_random: best vs a random other; "
        "max_max: best vs second best; random: two random; max_min_length_penalty: "
        "best vs worst of reward - lengthPenalty x characters. Ties are dropped and counted.",
    )
    length_penalty: Annotated[float, Field(ge=0.0, le=1e6)] = Field(
        default=0.0, description="Per-character penalty of max_min_length_penalty."
    )
    selection: Literal[tuple(SELECTIONS)] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="Reward kind pairwise: how each prompt's pair is picked from comparisons (bracket when unset). "
        + "; ".join(f"{k}: {v}" for k, v in SELECTIONS.items()) + ".",
    )


class LossSpec(_Model):
    type: Literal[tuple(LOSS_KINDS)] = Field(  # type: ignore[valid-type]
        default="sigmoid", description="DPO loss. " + "; ".join(f"{k}: {v}" for k, v in LOSS_KINDS.items()) + "."
    )
    beta: Annotated[float, Field(gt=0.0, le=1e4)] = Field(
        default=0.1, description="Strength of the pull toward the reference model."
    )
    label_smoothing: Annotated[float, Field(ge=0.0, lt=0.5)] = Field(
        default=0.0, description="Assumed share of flipped preferences, as conservative DPO (the report's code) "
        "reads it: (1 - e) x -log sigmoid(beta m) + e x -log sigmoid(-beta m)."
    )


class OptimizationSpec(_Model):
    """How a model is trained on DeepSpeed: what DPO training and reward-model training share."""

    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = Field(default=5e-7, description="Peak learning rate (AdamW).")
    epochs: Annotated[int, Field(ge=1, le=1000)] = Field(default=2, description="Passes over each round's pairs.")
    scheduler: Literal[SCHEDULERS] = Field(  # type: ignore[valid-type]
        default="cosine", description="Learning-rate decay after warmup."
    )
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.03, description="Share of the steps spent warming up the learning rate."
    )
    weight_decay: Annotated[float, Field(ge=0.0, le=100.0)] = Field(default=0.0, description="AdamW weight decay.")
    global_batch_size: Annotated[int, Field(ge=1, le=1 << 20)] = Field(
        default=128, description="Pairs per optimizer step, over all processes and accumulation steps."
    )
    micro_batch_size: Annotated[int, Field(ge=1, le=1 << 16)] = Field(
        default=1, description="Pairs per process per forward pass."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage.")
    precision: Literal[PRECISIONS] = Field(  # type: ignore[valid-type]
        default="bf16", description="Training precision (fp32 master weights are kept in every case)."
    )
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations to save memory.")
    nodes: Annotated[int, Field(ge=1, le=1024)] = Field(default=1, description="Training nodes.")
    nproc_per_node: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="Training processes (GPUs) per node."
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(default=42, description="Seed of the training data order.")


class TrainingSpec(OptimizationSpec):
    loss: LossSpec = Field(default_factory=LossSpec, description="The DPO loss.")
    max_length: Annotated[int, Field(ge=16, le=MAX_TOKENS)] = Field(
        default=2048, description="Most tokens of prompt + response; longer responses are cut."
    )
    max_prompt_length: Annotated[int, Field(ge=8, le=MAX_TOKENS)] = Field(
        default=1000,
        description="Most prompt tokens; longer prompts are left out at generation, with the reason counted.",
    )


class PreferenceDataSpec(_Model):
    """Preference pairs: a JSONL, Parquet or Arrow file (or folder), or a hub id."""

    dataset: ModelRef = Field(description="Local path (absolute, ./ or ../) or hub id.")
    split: str = Field(default="train", description="Split to read.")
    format: Literal[PREFERENCE_FORMATS] = Field(  # type: ignore[valid-type]
        default="auto",
        description="implicit: chosenField and rejectedField hold whole conversations that share every turn but "
        "the last (the report's format); explicit: promptField + chosenField + rejectedField, each a string "
        "or messages (TRL's preference format); auto: decided from the first row.",
    )
    chosen_field: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default="chosen", description="Field of the preferred side."
    )
    rejected_field: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default="rejected", description="Field of the other side."
    )
    prompt_field: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default="prompt", description="Field of the prompt (explicit format only)."
    )
    margin_field: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        default=None,
        description="Field of a per-pair margin (the loss becomes -log sigmoid(r_chosen - r_rejected - margin)); "
        "unset: 'margin' when the first row has it.",
    )
    max_pairs: Annotated[int, Field(ge=1, le=1 << 31)] | None = Field(
        default=None, description="Use only the first N rows (ids 0..N-1), rows left out included (all when unset)."
    )


class RewardTrainingSpec(OptimizationSpec):
    """The reward model trained before round 1 (the report's first half), as reward.kind says:
    bradley-terry, a score head on both sides of each pair; pairwise, the base taught to answer
    A or B to the pair in the report's [CONTEXT] ... [RESPONSE A] ... [RESPONSE B] prompt, the
    chosen side at a seeded random slot, loss on the label token. Its defaults are the report's
    Bradley-Terry ones (RLHF-Reward-Modeling): lr 2e-6, weight decay 0.001, cosine, warmup 0.03,
    global batch 512, 1 epoch, ZeRO-3, bf16."""

    base: ModelRef = Field(
        description="Model the reward model starts from (a causal LM gets a one-label score head): a local path "
        "(absolute, ./ or ../) or hub id."
    )
    data: PreferenceDataSpec = Field(description="The preference pairs it learns from.")
    held_out_share: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        default=None,
        description="Share of the pairs held out (a seeded draw) and evaluated each epoch for accuracy and margin; "
        "default 0.05, or 0 when heldOutSplit is set.",
    )
    held_out_split: str | None = Field(
        default=None, description="A split of the same dataset evaluated each epoch instead of a held-out share."
    )
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = Field(default=2e-6, description="Peak learning rate (AdamW).")
    epochs: Annotated[int, Field(ge=1, le=1000)] = Field(default=1, description="Passes over the pairs.")
    weight_decay: Annotated[float, Field(ge=0.0, le=100.0)] = Field(default=0.001, description="AdamW weight decay.")
    global_batch_size: Annotated[int, Field(ge=1, le=1 << 20)] = Field(
        default=512, description="Pairs per optimizer step, over all processes and accumulation steps."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=3, description="DeepSpeed ZeRO stage.")

    @property
    def held_out(self) -> float:
        """The share of the pairs held out (0 with a held-out split)."""
        if self.held_out_share is not None:
            return self.held_out_share
        return 0.0 if self.held_out_split else DEFAULT_HELD_OUT_SHARE


class SftSpec(OptimizationSpec):
    """Supervised fine-tuning of spec.policy.model first, before round 1 (the report's first step,
    Online-RLHF's sft/): next-token loss on the assistant turns of a chat dataset. Its defaults
    are the report's: 2 epochs, lr 2e-5, global batch 128, max length 8192, ZeRO-3, bf16."""

    data: PromptSource = Field(
        description="The chat dataset: each row's messagesField holds a whole conversation (its assistant turns are "
        "what the loss is on); maxPrompts limits the rows."
    )
    max_length: Annotated[int, Field(ge=16, le=MAX_TOKENS)] = Field(
        default=8192, description="Most tokens of a conversation; longer ones are cut at the end (counted)."
    )
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = Field(default=2e-5, description="Peak learning rate (AdamW).")
    epochs: Annotated[int, Field(ge=1, le=1000)] = Field(default=2, description="Passes over the conversations.")
    global_batch_size: Annotated[int, Field(ge=1, le=1 << 20)] = Field(
        default=128,
        description="Rows per optimizer step, over all processes and accumulation steps (a row: the conversations "
        "packed into maxLength tokens, or one conversation without packing).",
    )
    micro_batch_size: Annotated[int, Field(ge=1, le=1 << 16)] = Field(
        default=1, description="Rows per process per forward pass."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=3, description="DeepSpeed ZeRO stage.")
    packing: bool = Field(
        default=True,
        description="Pack conversations into rows of at most maxLength tokens (best-fit decreasing), as the report's "
        "SFT does; attention never crosses two conversations of a row (position ids restart per conversation). "
        "false: one conversation per row, right-padded.",
    )


class PolicySpec(_Model):
    """The SFT model the first round starts from (or the base model that `sft` trains first)."""

    model: ModelRef = Field(
        description="Model of round 1 (with sft: the base model it fine-tunes): a local path (absolute, or "
        "starting with ./ or ../, relative to the run file) or a hub id."
    )
    chat_template: ChatTemplate = Field(
        default=None,
        description="Jinja chat template that replaces the policy tokenizer's own, "
        "used for generation and training alike.",
    )
    sft: SftSpec | None = Field(
        default=None,
        description="Fine-tune policy.model on a chat dataset first, once, before round 1 (the SFT stage); its "
        "checkpoint is round 1's policy and the initial DPO reference.",
    )


class VerifiableSpec(_Model):
    """Reward kind verifiable: the Online-DPO-R1 scheme (+1 right, -0.5 wrong, -1 no answer)."""

    correct: Annotated[float, Field(ge=-1e6, le=1e6)] = Field(default=1.0, description="Reward of a response whose final answer equals the gold answer.")
    wrong_answer: Annotated[float, Field(ge=-1e6, le=1e6)] = Field(
        default=-0.5, description="Reward of a response with a final answer in the expected form that is not the gold one."
    )
    no_answer: Annotated[float, Field(ge=-1e6, le=1e6)] = Field(default=-1.0, description="Reward of a response with no final answer.")
    answer_format: Literal[ANSWER_FORMATS] = Field(  # type: ignore[valid-type]
        default="boxed",
        description="The final answer a response must give: boxed, its last \\boxed{...} (the report's math recipe); "
        "any, also LaTeX ($...$) or a plain number or expression, the last one found.",
    )
    check_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = Field(
        default=5.0, description="Most seconds one answer's extraction and comparison may take; past it the "
        "response counts as wrong."
    )


class RewardComponent(_Model):
    """One term of a composite reward: weight x (the score of its kind)."""

    name: TERM_NAME.annotated() = Field(  # type: ignore[valid-type]
        description="Names the term in status and stats (details.<name>: its mean per round)."
    )
    kind: Literal[COMPONENT_KINDS] = Field(description="The term's kind (any but composite).")  # type: ignore[valid-type]
    weight: Annotated[float, Field(ge=-1e6, le=1e6)] = Field(
        default=1.0, description="Its weight in the sum (negative for a penalty)."
    )
    model: ModelRef | None = Field(
        default=None, description="The reward model of a kind that reads one (" + ", ".join(MODEL_KINDS) + ")."
    )
    chat_template: ChatTemplate = Field(default=None, description="Replaces that reward model's own chat template.")
    verifiable: VerifiableSpec | None = Field(default=None, description="Kind verifiable's settings (its defaults when unset).")

    def as_reward(self, parent: RewardSpec) -> RewardSpec:
        """The term as a reward of its own (the parent's maxLength and batchTokens)."""
        return parent.model_copy(update={"kind": self.kind, "model": self.model, "chat_template": self.chat_template,
                                          "verifiable": self.verifiable, "training": None, "components": None,
                                          "objective_weights": None})  # fmt: skip


class RewardSpec(_Model):
    model: ModelRef | None = Field(
        default=None,
        description="Reward model: local path (absolute, ./ or ../) or hub id; unset when training trains it "
        "and for the kinds that read none (all but " + ", ".join(MODEL_KINDS) + ").",
    )
    kind: Literal[tuple(SCORER_KINDS)] = Field(  # type: ignore[valid-type]
        default="bradley-terry",
        description="How a response is scored. " + "; ".join(f"{k}: {v}" for k, v in SCORER_KINDS.items()) + ".",
    )
    chat_template: ChatTemplate = Field(
        default=None, description="Replaces the reward tokenizer's own chat template."
    )
    max_length: Annotated[int, Field(ge=16, le=MAX_TOKENS)] = Field(
        default=4096, description="Longer conversations are truncated from the left."
    )
    batch_tokens: Annotated[int, Field(ge=16, le=1 << 26)] = Field(
        default=16384, description="Most padded tokens in one forward pass of the reward server."
    )
    request_batch_size: Annotated[int, Field(ge=1, le=MAX_ITEMS_PER_REQUEST)] = Field(
        default=64, description="Items per scoring request sent by the annotator (the server takes at most 4096)."
    )
    concurrency: Annotated[int, Field(ge=1, le=256)] = Field(
        default=4, description="Scoring requests in flight at once."
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=MAX_SECONDS)] = Field(
        default=300.0, description="Timeout of one scoring request."
    )
    max_retries: Annotated[int, Field(ge=0, le=100)] = Field(
        default=5, description="Retries of a scoring request that failed to connect, timed out or got 429/502/503/504."
    )
    startup_timeout_seconds: Annotated[float, Field(gt=0, le=MAX_SECONDS)] = Field(
        default=900.0, description="How long to wait for the reward server's /readyz."
    )
    training: RewardTrainingSpec | None = Field(
        default=None,
        description="Train the reward model first, once, before round 1 (the RewardModel stage), then serve it "
        "every round; chatTemplate and maxLength apply to training too.",
    )
    verifiable: VerifiableSpec | None = Field(
        default=None, description="Kind verifiable's rewards and answer form (its defaults when unset)."
    )
    objective_weights: dict[str, Annotated[float, Field(ge=-1e6, le=1e6)]] | None = Field(
        default=None,
        description="Kind multi-objective: score by these objectives' rewards, weighted (e.g. "
        "{helpsteer-correctness: 1.0, helpsteer-verbosity: -0.5}), instead of the gated score.",
    )
    components: Annotated[list[RewardComponent], Field(min_length=1, max_length=MAX_COMPONENTS)] | None = Field(
        default=None, description="Kind composite's terms: the reward is the sum of weight x score."
    )

    @property
    def reads_model(self) -> bool:
        """This kind reads reward.model (or the model reward.training trains)."""
        return self.kind in MODEL_KINDS

    @property
    def loads_model(self) -> bool:
        """The reward server loads a model (and on Kubernetes asks for a GPU)."""
        return self.reads_model or any(c.kind in MODEL_KINDS for c in self.components or [])

    @property
    def compares(self) -> bool:
        """This kind judges two responses and scores none: pairs come from pairing.selection."""
        return self.kind in COMPARING_KINDS

    @property
    def checks_answers(self) -> bool:
        """Some term is verifiable: every prompt needs its gold answer."""
        return self.kind == "verifiable" or any(c.kind == "verifiable" for c in self.components or [])

    @property
    def rule(self) -> VerifiableSpec:
        """Kind verifiable's settings, defaults filled in."""
        return self.verifiable or VerifiableSpec()


EVALUATION_SELECT = {
    "last": "the last round's policy",
    "judge-reward": "the round (0 included) whose policy has the highest mean reward under evaluation.judge",
    "win-rate": "the round (0 included) whose policy has the highest win rate against round 0 (round 0 counts 0.5)",
}
GATE_OUTCOMES = ("Succeeded", "Failed")


class EvaluationGates(_Model):
    """Bounds checked after each round's evaluation; the first one crossed stops the run."""

    max_length_ratio: Annotated[float, Field(gt=0.0, le=1e6)] | None = Field(
        default=None,
        description="Stop when the mean response length (tokens) exceeds this multiple of round 0's (the report's "
        "responses nearly doubled in 3 rounds).",
    )
    min_win_rate: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        default=None, description="Stop when a round's win rate against round 0 falls below this."
    )
    max_kl: Annotated[float, Field(ge=0.0, le=1e9)] | None = Field(
        default=None, description="Stop when the estimated KL(policy || initial policy), in nats per response, "
        "exceeds this.",
    )
    judge_reward_falling_rounds: Annotated[int, Field(ge=1, le=100)] | None = Field(
        default=None,
        description="Stop when the judge's mean reward fell in each of the last R rounds (R = this value).",
    )
    on_trip: Literal[GATE_OUTCOMES] = Field(  # type: ignore[valid-type]
        default="Succeeded",
        description="How a run a gate stopped ends: Succeeded (with reason GateTripped; the final policy is "
        "evaluation.select's among the rounds evaluated) or Failed.",
    )

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.max_length_ratio, self.min_win_rate, self.max_kl,
                                           self.judge_reward_falling_rounds))  # fmt: skip


class EvaluationSpec(_Model):
    """The Evaluate stage: every round's new policy (and the initial one, as round 0) answers a
    held-out prompt set, scored by the run's reward model and by an optional judge."""

    prompts: RoundPromptSource = Field(
        description="The held-out prompt set; no prompt may also be a training prompt of any round (compared by "
        "content), unless allowOverlap."
    )
    allow_overlap: bool = Field(
        default=False, description="Report prompts shared with the training sets instead of refusing the run."
    )
    samples_per_prompt: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1, description="Responses per prompt (1 with greedy decoding)."
    )
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = Field(default=0.0, description="Sampling temperature (0: greedy).")
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = Field(default=1.0, description="Nucleus sampling mass.")
    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = Field(
        default=None, description="Most tokens per response (unset: generation.maxNewTokens)."
    )
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(default=1234, description="Base seed of the sampling.")
    judge: RewardSpec | None = Field(
        default=None,
        description="A second, independent reward (any kind: a stronger or gold reward model, a pairwise model, a "
        "verifiable check), so that proxy gains that do not transfer show; win rates are the judge's when set, "
        "else the run's reward model's.",
    )
    gates: EvaluationGates = Field(default_factory=EvaluationGates, description="When to stop the loop.")
    select: Literal[tuple(EVALUATION_SELECT)] = Field(  # type: ignore[valid-type]
        default="last",
        description="Which round's policy becomes status.finalPolicy. " + "; ".join(f"{k}: {v}" for k, v in
                                                                                   EVALUATION_SELECT.items()) + ".",
    )
    rollback: bool = Field(
        default=False,
        description="Start each round from the best round so far by select (round 0: the initial policy), not "
        "from the last round's checkpoint, so a round that made the policy worse is not built on (with reference "
        "previous, that policy is also the round's reference). Needs select judge-reward or win-rate.",
    )


class StorageSpec(_Model):
    root: str | None = Field(
        default=None,
        description="Root folder of the run's artifacts (<root>/<name>/iter-N/...). "
        "Local runner: defaults to --workdir; relative paths start with ./ or ../.",
    )


class Resources(_Model):
    """What one pod of a stage asks the scheduler for."""

    gpus: Annotated[int, Field(ge=0, le=1024)] | None = Field(
        default=None,
        description="nvidia.com/gpu per pod. Unset: the pod's default (each pod's field says which). "
        "0 runs the stage on CPUs.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit, e.g. '8' or '500m'.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit, e.g. '64Gi'.")


# One field per kind of pod, as the stage table declares them (generate, reward, annotate, train).
StageResources = create_model(
    "StageResources",
    __base__=_Model,
    __module__=__name__,
    **{
        pod.key: (Resources, Field(default_factory=Resources, description=f"{pod.description} GPUs when unset: {pod.gpus_doc}."))
        for pod in pods()
    },
)


# One deadline per stage, as the stage table declares them (generate, score, train).
StageTimeouts = create_model(
    "StageTimeouts",
    __base__=_Model,
    __module__=__name__,
    **{
        d.folder: (Annotated[int, Field(ge=1, le=int(MAX_SECONDS))], Field(
            default=d.timeout_seconds,
            description=f"Seconds one attempt of the {d.stage} stage may run (pending pods included) before it "
            "fails and is retried.",
        ))
        for d in STAGES
    },
)


class VolumeSpec(_Model):
    claim_name: DnsSubdomain | None = Field(
        default=None,
        description="ReadWriteMany PersistentVolumeClaim every pod mounts: models, prompts and "
        "the run's artifacts live on it. Required on Kubernetes.",
    )
    mount_path: AbsolutePath = Field(
        default="/iterdpo",
        description="Where pods mount the claim. Local model and prompt paths, and storage.root "
        "(default <mountPath>/runs), must be under it.",
    )


class SecretKeyRef(_Model):
    name: DnsSubdomain = Field(description="Secret name, in the run's namespace.")
    key: SecretKey = Field(default="token", description="Key in the Secret.")


class Toleration(_Model):
    key: QualifiedName | None = Field(default=None, description="Taint key (unset with Exists: all taints).")
    operator: Literal[TOLERATION_OPERATORS] = Field(default="Equal", description="How value is matched.")  # type: ignore[valid-type]
    value: LabelValue | None = Field(default=None, description="Taint value, for Equal.")
    effect: Literal[TAINT_EFFECTS] | None = Field(default=None, description="Taint effect (unset: all).")  # type: ignore[valid-type]


class KubernetesSpec(_Model):
    """How the operator runs the stages, and what it creates for them."""

    image: Image | None = Field(
        default=None,
        description="Container image of every stage (the Dockerfile's runtime target). Unset: the "
        f"operator's default (Helm value stageDefaults.image), else {DEFAULT_IMAGE}.",
    )
    image_pull_policy: Literal[PULL_POLICIES] = Field(  # type: ignore[valid-type]
        default="IfNotPresent", description="Image pull policy of every container."
    )
    service_account_name: DnsSubdomain | None = Field(default=None, description="ServiceAccount of the stage pods.")
    volume: VolumeSpec = Field(default_factory=VolumeSpec, description="The shared volume of the run.")
    hub_token_secret: SecretKeyRef | None = Field(
        default=None, description="Secret holding a Hugging Face token, passed to pods as HF_TOKEN (never inline)."
    )
    node_selector: Annotated[dict[QualifiedName, LabelValue], Field(max_length=64)] = Field(
        default_factory=dict, description="Node labels every stage pod requires."
    )
    tolerations: Annotated[list[Toleration], Field(max_length=64)] = Field(
        default_factory=list, description="Taints every stage pod tolerates."
    )
    resources: StageResources = Field(default_factory=StageResources, description="Per-stage pod resources.")
    launcher: Literal[TRAIN_LAUNCHERS] = Field(  # type: ignore[valid-type]
        default="pytorchjob",
        description="How training runs: pytorchjob (Kubeflow PyTorchJob, Master + Workers) or "
        "job (one batch Job, single node, for clusters without Kubeflow).",
    )
    reward_token_secret: SecretKeyRef | None = Field(
        default=None,
        description="Secret holding the reward server's bearer token. Unset: the operator creates "
        "<name>-reward-token with a random token, owned by the run.",
    )
    reward_network_policy: bool = Field(
        default=False,
        description="Create a NetworkPolicy that lets only the run's annotate pods reach its reward server "
        "(enforced where the cluster's network plugin supports NetworkPolicy).",
    )
    keep_reward_warm: bool = Field(
        default=False,
        description="Keep the reward server running between scoring stages. Default: scaled to zero "
        "outside scoring, so its GPUs are free while generating and training.",
    )
    stage_timeout_seconds: StageTimeouts = Field(
        default_factory=StageTimeouts,
        description="Deadline of each stage attempt (activeDeadlineSeconds of its Job or PyTorchJob): an "
        "unschedulable pod, a wrong image or a hung rendezvous fails the attempt instead of running forever.",
    )
    stage_retries: Annotated[int, Field(ge=0, le=10)] = Field(
        default=2, description="New attempts of a failed stage before the run fails."
    )
    retry_backoff_seconds: Annotated[float, Field(ge=0, le=3600.0)] = Field(
        default=30.0, description="Wait before attempt n+1 of a stage: this x 2^(n-1) seconds, at most a day."
    )
    shard_retries: Annotated[int, Field(ge=0, le=10)] = Field(
        default=1, description="Retries of one failed generation shard, alone (the Job's backoffLimitPerIndex)."
    )


class IterativeDPORunSpec(_Model):
    suspend: bool = Field(
        default=False,
        description="Kubernetes: stop between stages and suspend running children; set back to false to resume.",
    )
    iterations: Annotated[int, Field(ge=1, le=100)] = Field(default=3, description="Rounds.")
    policy: PolicySpec = Field(description="The SFT policy the first round starts from.")
    reference: Literal[REFERENCE_MODES] = Field(  # type: ignore[valid-type]
        default="initial",
        description="DPO reference of each round: the initial SFT policy, or the policy "
        "that generated the round (the previous round's checkpoint).",
    )
    prompts: PromptsSpec = Field(description="The prompts each round answers.")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Sampling K responses per prompt with vLLM."
    )
    reward: RewardSpec = Field(description="The reward model and how the annotator calls its server.")
    evaluation: EvaluationSpec | None = Field(
        default=None,
        description="Evaluate every round's new policy (and the initial one, as round 0) on held-out prompts, stop "
        "the loop on gates, and pick the final policy (the Evaluate stage).",
    )
    pairing: PairingSpec = Field(
        default_factory=PairingSpec, description="How each prompt's K responses become one DPO pair."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="DPO training on DeepSpeed.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Where artifacts go.")
    kubernetes: KubernetesSpec = Field(
        default_factory=KubernetesSpec, description="Pods, volume and launcher on Kubernetes (ignored by iterdpo run)."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> IterativeDPORunSpec:
        for rule in RULES:
            obj = rule.target(self)
            if obj is not None and not rule.holds(obj):  # an optional section left out has nothing to check
                raise CrossFieldError(rule.blames, rule.explain(obj))
        return self

    def prompts_for(self, iteration: int) -> RoundPromptSource:
        """The prompt set of round `iteration` (1-based)."""
        if self.prompts.per_iteration:
            return self.prompts.per_iteration[iteration - 1]
        return self.prompts

    @property
    def generation_max_model_len(self) -> int:
        return self.generation.max_model_len or self.training.max_length

    def path_fields(self) -> list[tuple[str, str, str]]:
        """(field, kind, value) of every set path-or-hub-id field; kind is model, dataset or root.
        The one list the local checks (iterdpo/localpaths.py) and the cluster's volume check read."""
        fields = [("spec.policy.model", "model", self.policy.model)]
        if self.policy.sft:
            fields.append(("spec.policy.sft.data.dataset", "dataset", self.policy.sft.data.dataset))
        if self.reward.model:
            fields.append(("spec.reward.model", "model", self.reward.model))
        fields += [(f"spec.reward.components[{i}].model", "model", c.model)
                   for i, c in enumerate(self.reward.components or []) if c.model]  # fmt: skip
        if self.reward.training:
            fields += [("spec.reward.training.base", "model", self.reward.training.base),
                       ("spec.reward.training.data.dataset", "dataset", self.reward.training.data.dataset)]  # fmt: skip
        if self.prompts.dataset:
            fields.append(("spec.prompts.dataset", "dataset", self.prompts.dataset))
        fields += [(f"spec.prompts.perIteration[{i}].dataset", "dataset", p.dataset)
                   for i, p in enumerate(self.prompts.per_iteration or [])]  # fmt: skip
        if self.evaluation:
            fields.append(("spec.evaluation.prompts.dataset", "dataset", self.evaluation.prompts.dataset))
            judge = self.evaluation.judge
            if judge and judge.model:
                fields.append(("spec.evaluation.judge.model", "model", judge.model))
            fields += [(f"spec.evaluation.judge.components[{i}].model", "model", c.model)
                       for i, c in enumerate(judge.components or []) if c.model] if judge else []  # fmt: skip
        if self.storage.root:
            fields.append(("spec.storage.root", "root", self.storage.root))
        return fields


# spec.kubernetes fields that may change while a run is in progress.
MUTABLE_KUBERNETES_FIELDS = {"image", "image_pull_policy", "service_account_name", "hub_token_secret", "node_selector",
                             "tolerations", "resources", "keep_reward_warm", "stage_timeout_seconds", "stage_retries", "retry_backoff_seconds",
                             "shard_retries"}  # fmt: skip


class IterativeDPORun(BaseModel):
    """The whole resource, as a user writes it for `kubectl apply` or `iterdpo run`."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    api_version: Literal[API_VERSION] = Field(alias="apiVersion")  # type: ignore[valid-type]
    kind: Literal[KIND]  # type: ignore[valid-type]
    metadata: ObjectMeta
    spec: IterativeDPORunSpec
    status: dict | None = Field(default=None, description="Written by iterdpo; ignored on input.")

    @property
    def name(self) -> str:
        return self.metadata.name

    def spec_hash(self, rounds: int | None = None) -> str:
        """Stable digest of the recipe: a resumed run must be the run that was started.
        `suspend` and most of the `kubernetes` section (image, resources, scheduling,
        retries) may change mid-run: they change how stages run, not what they compute.
        The volume and the launcher may not: artifacts and children are found through them.
        `rounds`: the digest this recipe has when cut to its first `rounds` rounds
        (spec.iterations and prompts.perIteration cut), which `extended_from` compares."""
        recipe = self.spec.model_dump(mode="json", by_alias=True, exclude={"suspend": True, "kubernetes": MUTABLE_KUBERNETES_FIELDS})
        if rounds is not None:
            recipe["iterations"] = rounds
            if recipe["prompts"].get("perIteration") is not None:
                recipe["prompts"]["perIteration"] = recipe["prompts"]["perIteration"][:rounds]
        blob = json.dumps(recipe, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def extended_from(self, old_hash: str) -> int | None:
        """The rounds of the recipe `old_hash` digests, if this recipe is that one with rounds
        added (spec.iterations raised, a prompt set per added round): a finished or running run
        may grow. None when it is another recipe (then resuming would mix two)."""
        return next((k for k in range(1, self.spec.iterations) if self.spec_hash(k) == old_hash), None)

    def to_manifest(self) -> dict:
        """The resource as YAML/JSON-ready data, without status."""
        return self.model_dump(mode="json", by_alias=True, exclude={"status"}, exclude_none=True)


class CrossFieldError(ValueError):
    """A rule that spans fields; carries the path of the field to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Rule:
    """A rule that spans fields, declared once: checked by the model (`holds`, with the
    values in `explain`), by the API server (`cel`, in the CRD generated by iterdpo/crd.py)
    and listed in docs/run-file.md (`message`).

    It sits on the lowest object holding all its fields (`at`, a spec path; "" is spec),
    so the API server has filled that object's defaults before it runs."""

    at: str
    field: str  # the field it blames, relative to `at`
    holds: Callable[[Any], bool]  # on the object at `at`
    explain: Callable[[Any], str]  # what is wrong, with the values
    cel: str  # the same check in CEL, on `self` = the object at `at`
    message: str  # the API server's message (static: see crd.py) and the docs' wording
    message_expression: str | None = None
    reason: str = "FieldValueInvalid"

    @property
    def blames(self) -> str:
        return ".".join(p for p in (self.at, self.field) if p)

    def target(self, spec: IterativeDPORunSpec) -> Any:
        obj: Any = spec
        for part in filter(None, self.at.split(".")):
            obj = getattr(obj, next(n for n, f in type(obj).model_fields.items() if (f.alias or n) == part))
            if obj is None:  # an optional section that is not set (the API server skips its rules too)
                return None
        return obj


def _toleration_problems(tolerations: list[Toleration]) -> list[str]:
    """Kubernetes' own rules for a toleration, in its words."""
    problems = []
    for i, t in enumerate(tolerations):
        if t.operator == "Exists" and t.value is not None:
            problems.append(f"[{i}]: operator Exists matches any value: drop the value")
        if t.key is None and t.operator != "Exists":
            problems.append(f"[{i}]: without a key it matches every taint, so the operator must be Exists")
    return problems


def _per_step(t: TrainingSpec) -> int:
    return t.micro_batch_size * t.nproc_per_node * t.nodes


def _optimization_rules(at: str) -> tuple[Rule, ...]:
    """The rules of an OptimizationSpec, at each place one sits (DPO and reward-model training)."""
    return (
        Rule(
            at, "globalBatchSize",
            lambda t: t.global_batch_size % _per_step(t) == 0,
            lambda t: f"must be a multiple of microBatchSize x nprocPerNode x nodes = {t.micro_batch_size} x "
            f"{t.nproc_per_node} x {t.nodes} = {_per_step(t)} (got {t.global_batch_size})",
            "self.globalBatchSize % (self.microBatchSize * self.nprocPerNode * self.nodes) == 0",
            "must be a multiple of microBatchSize x nprocPerNode x nodes",
        ),
        Rule(
            at, "zeroStage",
            lambda t: t.zero_stage != 0 or t.precision == "fp32",
            lambda t: f"0 keeps no readable fp32 master weights under precision {t.precision!r}: "
            "use zeroStage 1, 2 or 3, or precision fp32",
            "self.zeroStage != 0 || self.precision == 'fp32'",
            "0 keeps no readable fp32 master weights under precision bf16 or fp16: use zeroStage 1, 2 or 3, or precision fp32",
            "\"0 keeps no readable fp32 master weights under precision '\" + self.precision + "
            "\"': use zeroStage 1, 2 or 3, or precision fp32\"",
        ),
    )


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _component_problems(components: list[RewardComponent]) -> list[str]:
    problems = []
    names = [c.name for c in components]
    for i, c in enumerate(components):
        if c.kind in MODEL_KINDS and c.model is None:
            problems.append(f"[{i}] ({c.name}): kind {c.kind} needs its model")
        if c.kind not in MODEL_KINDS and c.model is not None:
            problems.append(f"[{i}] ({c.name}): kind {c.kind} reads no model: remove model")
        if c.verifiable is not None and c.kind != "verifiable":
            problems.append(f"[{i}] ({c.name}): verifiable is only used by kind verifiable")
        if names.count(c.name) > 1 and names.index(c.name) == i:
            problems.append(f"[{i}]: the name {c.name!r} is used twice")
    return problems


def _kind_option(field: str, attr: str, kind: str, at: str = "reward") -> Rule:
    """<at>.<field> (spec.reward, evaluation.judge), an option of one reward kind: set only with that kind."""
    return Rule(
        at, field,
        lambda r: getattr(r, attr) is None or r.kind == kind,
        lambda r: f"is only used by kind {kind} (kind is {r.kind!r})",
        f"!has(self.{field}) || self.kind == '{kind}'",
        f"is only used by kind {kind}",
        f"\"is only used by kind {kind} (kind is '\" + self.kind + \"')\"",
    )  # fmt: skip


def _round_sources(s: IterativeDPORunSpec) -> list[RoundPromptSource]:
    return list(s.prompts.per_iteration) if s.prompts.per_iteration else [s.prompts]


def _distinct_fields(d: PreferenceDataSpec) -> bool:
    names = [d.chosen_field, d.rejected_field, d.prompt_field] + ([d.margin_field] if d.margin_field else [])
    return len(set(names)) == len(names)


def _batch_tokens_rule(at: str) -> Rule:
    length = f"{at.rsplit('.', 1)[-1]}.maxLength"
    return Rule(
        at, "batchTokens",
        lambda r: r.batch_tokens >= r.max_length,
        lambda r: f"must be at least {length} ({r.max_length}) so that the longest conversation fits in "
        f"one forward pass (got {r.batch_tokens})",
        "self.batchTokens >= self.maxLength",
        f"must be at least {length} so that the longest conversation fits in one forward pass",
    )  # fmt: skip


def _components_rule(at: str) -> Rule:
    """Kind composite's terms, at each place a reward sits (spec.reward, evaluation.judge)."""
    return Rule(
        at, "components",
        lambda r: (r.components is not None) == (r.kind == "composite") and not _component_problems(r.components or []),
        lambda r: ("is required by kind composite (its weighted terms)" if r.components is None
                   else f"is only used by kind composite (kind is {r.kind!r})" if r.kind != "composite"
                   else "; ".join(_component_problems(r.components))),  # fmt: skip
        "has(self.components) == (self.kind == 'composite') && (!has(self.components) || self.components.all(c, "
        f"(has(c.model) == (c.kind in {_cel_list(MODEL_KINDS)})) && (!has(c.verifiable) || c.kind == 'verifiable') "
        "&& self.components.exists_one(d, d.name == c.name)))",
        "is required by kind composite and only used by it; each component names a model exactly when its kind "
        f"reads one ({', '.join(MODEL_KINDS)}), sets verifiable only with kind verifiable, and has a name of its own",
    )  # fmt: skip


def _judge_scores(e: EvaluationSpec) -> bool:
    return e.judge is not None and not e.judge.compares


_SCALAR_JUDGE_CEL = f"has(self.judge) && !(self.judge.kind in {_cel_list(COMPARING_KINDS)})"


def _judge_rules() -> tuple[Rule, ...]:
    """spec.evaluation.judge: a reward of any kind, given (not trained), checked as spec.reward is."""
    at = "evaluation.judge"
    return (
        _batch_tokens_rule(at),
        _components_rule(at),
        _kind_option("objectiveWeights", "objective_weights", "multi-objective", at),
        _kind_option("verifiable", "verifiable", "verifiable", at),
        Rule(
            at, "model",
            lambda r: r.model is not None or not r.reads_model,
            lambda r: f"is required by judge kind {r.kind}, which reads a model (a judge is given, not trained)",
            f"has(self.model) || !(self.kind in {_cel_list(MODEL_KINDS)})",
            f"is required by the judge kinds that read a model ({', '.join(MODEL_KINDS)}); a judge is given, "
            "not trained",
            reason="FieldValueRequired",
        ),
        Rule(
            at, "training",
            lambda r: r.training is None,
            lambda r: "a judge is given, not trained: name its model in evaluation.judge.model",
            "!has(self.training)",
            "a judge is given, not trained: name its model in evaluation.judge.model",
        ),
        Rule(
            at, "kind",
            lambda r: r.kind != "length" and (r.reads_model or r.model is None),
            lambda r: "length is a term of a composite reward, not a judge on its own" if r.kind == "length"
            else f"{r.kind} reads no model: remove evaluation.judge.model",
            f"self.kind != 'length' && (self.kind in {_cel_list(MODEL_KINDS)} || !has(self.model))",
            "length is only a term of a composite reward, and only the kinds that load a model "
            f"({', '.join(MODEL_KINDS)}) read a model",
        ),
        Rule(
            "evaluation", "select",
            lambda e: e.select != "judge-reward" or _judge_scores(e),
            lambda e: "judge-reward needs a judge that scores responses: set evaluation.judge (of a kind other than "
            f"{', '.join(COMPARING_KINDS)}), or select win-rate or last",
            f"self.select != 'judge-reward' || ({_SCALAR_JUDGE_CEL})",
            "judge-reward needs a judge that scores responses (evaluation.judge, not pairwise): or select win-rate or last",
        ),
        Rule(
            "evaluation", "rollback",
            lambda e: not e.rollback or e.select != "last",
            lambda e: "rollback needs a best round to go back to: set evaluation.select to judge-reward or win-rate",
            "!self.rollback || self.select != 'last'",
            "rollback needs a best round to go back to: set evaluation.select to judge-reward or win-rate",
        ),
        Rule(
            "evaluation", "gates.judgeRewardFallingRounds",
            lambda e: e.gates.judge_reward_falling_rounds is None or _judge_scores(e),
            lambda e: "needs a judge that scores responses: set evaluation.judge (of a kind other than "
            f"{', '.join(COMPARING_KINDS)})",
            f"!has(self.gates.judgeRewardFallingRounds) || ({_SCALAR_JUDGE_CEL})",
            "needs a judge that scores responses (evaluation.judge, not pairwise)",
        ),
        Rule(
            "", "evaluation.prompts.answerField",
            lambda s: s.evaluation is None or s.evaluation.prompts.answer_field is not None
            or not (s.reward.checks_answers or (s.evaluation.judge is not None and s.evaluation.judge.checks_answers)),
            lambda s: "is required: a verifiable reward (spec.reward or evaluation.judge) checks each evaluation "
            "response against its prompt's gold answer",
            "!has(self.evaluation) || has(self.evaluation.prompts.answerField) || !("
            + _CHECKS_ANSWERS_CEL.format(r="self.reward") + " || (has(self.evaluation.judge) && ("
            + _CHECKS_ANSWERS_CEL.format(r="self.evaluation.judge") + ")))",
            "is required when spec.reward or evaluation.judge is verifiable (or has a verifiable component)",
            reason="FieldValueRequired",
        ),
    )  # fmt: skip


_CHECKS_ANSWERS_CEL = ("{r}.kind == 'verifiable' || (has({r}.components) && {r}.components.exists(c, "
                       "c.kind == 'verifiable'))")  # fmt: skip


RULES: tuple[Rule, ...] = (
    *_optimization_rules("training"),
    *_optimization_rules("reward.training"),
    *_optimization_rules("policy.sft"),
    Rule(
        "training", "maxPromptLength",
        lambda t: t.max_prompt_length < t.max_length,
        lambda t: f"must be less than training.maxLength ({t.max_length}) to leave room for the response "
        f"(got {t.max_prompt_length})",
        "self.maxPromptLength < self.maxLength",
        "must be less than training.maxLength to leave room for the response",
    ),
    _batch_tokens_rule("reward"),
    Rule(
        "prompts", "dataset",
        lambda p: p.dataset is not None or p.per_iteration is not None,
        lambda p: "is required unless prompts.perIteration lists the prompt sets",
        "has(self.dataset) || has(self.perIteration)",
        "is required unless prompts.perIteration lists the prompt sets",
        reason="FieldValueRequired",
    ),
    Rule(
        "", "prompts.perIteration",
        lambda s: s.prompts.per_iteration is None or len(s.prompts.per_iteration) == s.iterations,
        lambda s: f"must list one prompt set per round: {s.iterations} (spec.iterations), "
        f"got {len(s.prompts.per_iteration)}",
        "!has(self.prompts.perIteration) || size(self.prompts.perIteration) == self.iterations",
        "must list one prompt set per round: as many as spec.iterations",
    ),
    Rule(
        "", "kubernetes.launcher",
        lambda s: s.kubernetes.launcher != "job" or s.training.nodes == 1,
        lambda s: "job runs training on one node: set training.nodes to 1 or use pytorchjob "
        f"(training.nodes is {s.training.nodes})",
        "self.kubernetes.launcher != 'job' || self.training.nodes == 1",
        "job runs training on one node: set training.nodes to 1 or use pytorchjob",
    ),
    Rule(
        "", "generation.maxModelLen",
        lambda s: s.generation.max_model_len is None or s.generation.max_model_len > s.training.max_prompt_length,
        lambda s: f"must be more than training.maxPromptLength ({s.training.max_prompt_length}): vLLM refuses a "
        f"prompt that fills the context (got {s.generation.max_model_len})",
        "!has(self.generation.maxModelLen) || self.generation.maxModelLen > self.training.maxPromptLength",
        "must be more than training.maxPromptLength: vLLM refuses a prompt that fills the context",
    ),
    Rule(
        "kubernetes", "tolerations",
        lambda k: not _toleration_problems(k.tolerations),
        lambda k: "; ".join(_toleration_problems(k.tolerations)),
        "!has(self.tolerations) || self.tolerations.all(t, (t.operator == 'Equal' || !has(t.value)) && (has(t.key) || t.operator == 'Exists'))",
        "operator Exists takes no value, and a toleration without a key must use operator Exists",
    ),
    Rule(
        "reward", "model",
        lambda r: r.model is not None or r.training is not None or not r.reads_model,
        lambda r: "is required unless reward.training trains the reward model (or the kind reads none: "
        f"{', '.join(k for k in SCORER_KINDS if k not in MODEL_KINDS)})",
        f"has(self.model) || has(self.training) || !(self.kind in {_cel_list(MODEL_KINDS)})",
        "is required unless reward.training trains the reward model (or the kind reads none: "
        f"{', '.join(k for k in SCORER_KINDS if k not in MODEL_KINDS)})",
        reason="FieldValueRequired",
    ),
    Rule(
        "reward", "kind",
        lambda r: r.kind != "length" and (r.reads_model or (r.model is None and r.training is None)),
        lambda r: "length is a term of a composite reward (a length penalty), not a reward on its own: use kind "
        "composite with a length component" if r.kind == "length" else f"{r.kind} reads no reward.model "
        + ("(its components name their models)" if r.kind == "composite" else "(it scores by rule)")
        + ": remove " + ("reward.model" if r.model is not None else "reward.training"),
        f"self.kind != 'length' && (self.kind in {_cel_list(MODEL_KINDS)} || (!has(self.model) && !has(self.training)))",
        "length is only a term of a composite reward, and only the kinds that load a model "
        f"({', '.join(MODEL_KINDS)}) read reward.model and reward.training",
    ),
    _components_rule("reward"),
    _kind_option("objectiveWeights", "objective_weights", "multi-objective"),
    _kind_option("verifiable", "verifiable", "verifiable"),
    Rule(
        "", "prompts.answerField",
        lambda s: not s.reward.checks_answers or all(p.answer_field for p in _round_sources(s)),
        lambda s: "is required by reward kind verifiable, which checks each response against its prompt's gold "
        "answer" + (" (every prompts.perIteration entry needs one)" if s.prompts.per_iteration else ""),
        "!(self.reward.kind == 'verifiable' || (has(self.reward.components) && self.reward.components.exists(c, "
        "c.kind == 'verifiable'))) || (has(self.prompts.perIteration) ? "
        "self.prompts.perIteration.all(p, has(p.answerField)) : has(self.prompts.answerField))",
        "is required by reward kind verifiable, which checks each response against its prompt's gold answer "
        "(in every prompts.perIteration entry when that is set)",
        reason="FieldValueRequired",
    ),
    Rule(
        "reward", "training",
        lambda r: r.training is None or (r.model is None and (r.kind in TRAINABLE_KINDS or not r.reads_model)),
        lambda r: f"trains a {' or '.join(TRAINABLE_KINDS)} model, not a {r.kind} one: use one of those kinds, "
        f"or name the {r.kind} model in reward.model" if r.model is None
        else f"trains the reward model every round scores with, so reward.model ({short(r.model)}) would "
        "not be used: remove reward.model (the base to train from is reward.training.base)",
        f"!has(self.training) || (!has(self.model) && !(self.kind in {_cel_list(tuple(k for k in MODEL_KINDS if k not in TRAINABLE_KINDS))}))",
        "trains the reward model every round scores with (kind "
        f"{' or '.join(TRAINABLE_KINDS)}): remove reward.model (the base to train from is reward.training.base)",
    ),
    Rule(
        "reward", "training.data.marginField",
        lambda r: r.training is None or r.kind != "pairwise" or r.training.data.margin_field is None,
        lambda r: "is a Bradley-Terry margin; kind pairwise trains on which side won, not by how much: remove it",
        "!has(self.training) || self.kind != 'pairwise' || !has(self.training.data.marginField)",
        "is a Bradley-Terry margin; kind pairwise trains on which side won, not by how much: remove it",
    ),
    Rule(
        "reward.training", "heldOutSplit",
        lambda t: t.held_out_share is None or t.held_out_split is None,
        lambda t: f"names the held-out pairs, so heldOutShare ({t.held_out_share}) would not be used: set one of them",
        "!has(self.heldOutShare) || !has(self.heldOutSplit)",
        "names the held-out pairs, so heldOutShare would not be used: set one of them",
    ),
    Rule(
        "reward.training.data", "rejectedField",
        _distinct_fields,
        lambda d: "chosenField, rejectedField, promptField and marginField must name different fields (got "
        f"{d.chosen_field!r}, {d.rejected_field!r}, {d.prompt_field!r}, {d.margin_field!r})",
        "self.chosenField != self.rejectedField && self.promptField != self.chosenField && "
        "self.promptField != self.rejectedField && (!has(self.marginField) || (self.marginField != self.chosenField "
        "&& self.marginField != self.rejectedField && self.marginField != self.promptField))",
        "chosenField, rejectedField, promptField and marginField must name different fields",
    ),
    Rule(
        "", "reward.training.nodes",
        lambda s: s.kubernetes.launcher != "job" or s.reward.training is None or s.reward.training.nodes == 1,
        lambda s: "launcher job trains on one node: set reward.training.nodes to 1 or use pytorchjob "
        f"(reward.training.nodes is {s.reward.training.nodes})",
        "self.kubernetes.launcher != 'job' || !has(self.reward.training) || self.reward.training.nodes == 1",
        "launcher job trains on one node: set reward.training.nodes to 1 or use pytorchjob",
    ),
    Rule(
        "", "policy.sft.nodes",
        lambda s: s.kubernetes.launcher != "job" or s.policy.sft is None or s.policy.sft.nodes == 1,
        lambda s: "launcher job trains on one node: set policy.sft.nodes to 1 or use pytorchjob "
        f"(policy.sft.nodes is {s.policy.sft.nodes})",
        "self.kubernetes.launcher != 'job' || !has(self.policy.sft) || self.policy.sft.nodes == 1",
        "launcher job trains on one node: set policy.sft.nodes to 1 or use pytorchjob",
    ),
    Rule(
        "", "pairing.selection",
        lambda s: (s.pairing.selection is None or s.reward.compares)
        and (not s.reward.compares or s.pairing.strategy == "max_min"),
        lambda s: f"is only used by reward kind pairwise (kind is {s.reward.kind!r})" if not s.reward.compares
        else f"kind pairwise picks each pair by pairing.selection, so pairing.strategy ({s.pairing.strategy!r}) "
        "would not be used: remove it",
        "(!has(self.pairing.selection) || self.reward.kind == 'pairwise') && "
        "(self.reward.kind != 'pairwise' || self.pairing.strategy == 'max_min')",
        "is only used by reward kind pairwise, which picks pairs by it (not by pairing.strategy)",
    ),
    Rule(
        "pairing", "lengthPenalty",
        lambda p: p.strategy == "max_min_length_penalty" or p.length_penalty == 0,
        lambda p: f"is only used by strategy max_min_length_penalty (strategy is {p.strategy!r})",
        "self.strategy == 'max_min_length_penalty' || self.lengthPenalty == 0.0",
        "is only used by strategy max_min_length_penalty",
        "\"is only used by strategy max_min_length_penalty (strategy is '\" + self.strategy + \"')\"",
    ),
    *_judge_rules(),
)


def nested_model(annotation: object) -> type[BaseModel] | None:
    """The spec model inside a field's type (`X`, `X | None`, `list[X]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = nested_model(arg)
        if found is not None:
            return found
    return None
