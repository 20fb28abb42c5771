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

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
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


@functools.cache
def score_request_model(max_items: int, max_item_chars: int) -> type[BaseModel]:
    """The ScoreRequest model for these limits (one class per pair of limits)."""
    Text = Annotated[str, Field(max_length=max_item_chars), AfterValidator(valid_unicode)]

    class Message(BaseModel):
        model_config = ConfigDict(extra="forbid")

        role: Literal["system", "user", "assistant"]
        content: Text

    class ScoreItem(BaseModel):
        model_config = ConfigDict(extra="forbid")

        messages: Annotated[list[Message], Field(min_length=1)] = Field(
            description="The prompt conversation; the response is appended as the assistant's turn."
        )
        response: Text

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        items: Annotated[list[ScoreItem], Field(min_length=1, max_length=max_items)]

    return ScoreRequest


# The request at the default limits: what the annotator's client checks before sending.
ScoreRequest = score_request_model(MAX_ITEMS_PER_REQUEST, MAX_ITEM_CHARS)


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="One score per item, in request order.")
    model: str
    truncated: int = Field(description="Items truncated from the left to --max-length.")


class Liveness(BaseModel):
    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
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
