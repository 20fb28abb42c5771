"""Wire schemas of the reward server, requests apart from responses.

Requests forbid unknown fields: a misspelt `respones` must be a 422 naming the
field, not a silently empty response that gets scored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from iterdpo_reward_server.settings import MAX_ITEMS_PER_REQUEST


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ScoreItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: Annotated[list[Message], Field(min_length=1)] = Field(
        description="The prompt conversation; the response is appended as the assistant's turn."
    )
    response: str


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Annotated[list[ScoreItem], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)]


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
    detail: str
