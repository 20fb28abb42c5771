"""Wire schemas of the reward server, requests apart from responses.

Requests forbid unknown fields: a misspelt `respones` must be a 422 naming the
field, not a silently empty response that gets scored. The request's limits (items
per request, characters per text) are the server's settings, so the request model is
built per limits (`score_request_model`) and the OpenAPI schema shows the ones served.
No `from __future__ import annotations` here: the models are built inside a function,
and their annotations must be the objects themselves, not names to look up later.
"""

import functools
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from iterdpo_reward_server.settings import MAX_ITEM_CHARS, MAX_ITEMS_PER_REQUEST


def valid_unicode(text: str) -> str:
    """JSON allows a lone surrogate ("\\ud800"); Python then holds a str no tokenizer can encode.

    pydantic refuses it already when it counts characters for `max_length` (same type,
    string_unicode); this check does not rely on that.
    """
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PydanticCustomError("string_unicode", "not valid Unicode (a lone surrogate)") from None
    return text


def text_type(max_item_chars: int):
    return Annotated[str, Field(max_length=max_item_chars), AfterValidator(valid_unicode)]


@functools.cache
def message_model(max_item_chars: int) -> type[BaseModel]:
    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")

        role: Literal["system", "user", "assistant"]
        content: text_type(max_item_chars)  # type: ignore[valid-type]

    return Message


@functools.cache
def score_request_model(max_items: int, max_item_chars: int) -> type[BaseModel]:
    """The ScoreRequest model for these limits (one class per pair of limits)."""
    Text = text_type(max_item_chars)
    Message = message_model(max_item_chars)

    class ScoreItem(BaseModel):
        model_config = ConfigDict(extra="forbid")

        messages: Annotated[list[Message], Field(min_length=1)] = Field(
            description="The prompt conversation; the response is appended as the assistant's turn."
        )
        response: Text
        answer: Text | None = Field(
            default=None, description="The prompt's gold answer: required by kind verifiable, ignored by the others."
        )

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        items: Annotated[list[ScoreItem], Field(min_length=1, max_length=max_items)]

    return ScoreRequest


@functools.cache
def compare_request_model(max_items: int, max_item_chars: int) -> type[BaseModel]:
    """The CompareRequest model (`POST /v1/compare`) for these limits."""
    Text = text_type(max_item_chars)
    Message = message_model(max_item_chars)

    class CompareItem(BaseModel):
        model_config = ConfigDict(extra="forbid")

        messages: Annotated[list[Message], Field(min_length=1)] = Field(description="The prompt conversation.")
        a: Text = Field(description="One response.")
        b: Text = Field(description="The other.")
        answer: Text | None = Field(default=None, description="The prompt's gold answer (kind verifiable).")

    class CompareRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        items: Annotated[list[CompareItem], Field(min_length=1, max_length=max_items)]

    return CompareRequest


@functools.cache
def get_reward_request_model(max_items: int, max_item_chars: int) -> type[BaseModel]:
    """OpenRLHF's remote reward request (`POST /get_reward`) for these limits."""
    Text = text_type(max_item_chars)
    Texts = Annotated[list[Text], Field(min_length=1, max_length=max_items)]

    class GetRewardRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        query: Texts = Field(description="Whole conversations, already formatted (prompt + response), as OpenRLHF sends them.")
        prompts: Texts | None = Field(
            default=None, description="The formatted prompt of each query: what precedes its response (verifiable "
            "checks only the response)."
        )
        labels: list[Text | None] | None = Field(
            default=None, description="The gold answer of each query: required by kind verifiable."
        )

        @model_validator(mode="after")
        def _same_lengths(self):
            for name in ("prompts", "labels"):
                values = getattr(self, name)
                if values is not None and len(values) != len(self.query):
                    raise PydanticCustomError("length_mismatch", f"{name} must have one entry per query")
            return self

    return GetRewardRequest


# The request at the default limits: what the annotator's client checks before sending.
ScoreRequest = score_request_model(MAX_ITEMS_PER_REQUEST, MAX_ITEM_CHARS)


class Unscored(BaseModel):
    index: int = Field(description="The item's position in the request.")
    reason: str = Field(description="Why it has no score (e.g. its gold answer cannot be parsed).")


class ScoreResponse(BaseModel):
    scores: list[float | None] = Field(description="One score per item, in request order; null for an item in `unscored`.")
    model: str | None = Field(description="The reward model served; null for a kind that loads none (verifiable).")
    kind: str = Field(default="bradley-terry", description="The reward kind (spec.reward.kind).")
    truncated: int = Field(description="Items truncated from the left to --max-length.")
    unscored: list[Unscored] = Field(default_factory=list, description="Items without a score, and why.")
    details: dict[str, list[float | None]] = Field(
        default_factory=dict,
        description="Named parts of each score, one value per item (verifiable: correct and answered, 1 or 0).",
    )


class CompareResponse(BaseModel):
    probabilities: list[float | None] = Field(
        description="Per item, the probability that `a` is the better response (kind pairwise: both orders averaged; "
        "other kinds: sigmoid(score(a) - score(b))); null for an item in `unscored`."
    )
    model: str | None
    kind: str
    forward_passes: int = Field(description="Sequences the model read for this request (pairwise: 2 per item).")
    truncated: int = Field(description="Sequences truncated from the left to --max-length.")
    unscored: list[Unscored] = Field(default_factory=list, description="Items without a probability, and why.")


class GetRewardResponse(BaseModel):
    """OpenRLHF's remote reward answer; `rewards` and `scores` hold the same values."""

    rewards: list[float | None] = Field(description="One reward per query, in order; null for a query in `unscored`.")
    scores: list[float | None] = Field(description="The same values (OpenRLHF filters on scores, learns from rewards).")
    extra_logs: dict[str, list[float | None]] = Field(
        default_factory=dict, description="Named parts of each reward (verifiable: correct and answered)."
    )
    unscored: list[Unscored] = Field(default_factory=list, description="Queries without a reward, and why.")


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    model: str | None = Field(description="The reward model served; null for a kind that loads none (verifiable).")
    kind: str


class Problem(BaseModel):
    detail: str = Field(description="What was wrong, in a sentence; never the request's own content.")


class FieldProblem(BaseModel):
    loc: list[str | int] = Field(description='Where: ["body", "items", 2, "response"].')
    msg: str = Field(description="What is wrong there (at most 200 characters, never the value itself).")
    type: str


class ValidationProblem(BaseModel):
    """FastAPI's 422 shape without `input`, `ctx` or `url`: the request's content is never echoed."""

    detail: list[FieldProblem] = Field(description="The first problems found (at most 10).")
    omitted: int = Field(default=0, description="How many more problems there were.")
