"""The wire format of ``POST /score``: validated with pydantic so bad input gets a clear 422."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from reloop.engine.events.schema import MAX_EVENT_TIME_MS


def _within_int64(value: Any) -> Any:
    # The impression log's event contract takes int64 (engine/serve/wire.py says why); without this
    # the union would turn a larger integer into a float.
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value <= 2**63 - 1:
        raise ValueError("an integer feature value must fit in int64")
    return value


FeatureValue = Annotated[str | int | float | list[str], BeforeValidator(_within_int64)]

MAX_CANDIDATES = 2000


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=256)
    features: dict[str, FeatureValue] = Field(default_factory=dict)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=256)
    user_id: str = Field(min_length=1, max_length=256)
    context: dict[str, FeatureValue] = Field(default_factory=dict)
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    top_k: int | None = Field(
        default=None, ge=1, le=MAX_CANDIDATES, description="default: the service's top_k"
    )
    # The event contract's bound: with serve.limits.max_future_ms null a later time was served, then its
    # impression was refused by the joiner (or could not be encoded at all).
    event_time_ms: int | None = Field(
        default=None, ge=0, le=MAX_EVENT_TIME_MS, description="default: the time the service scores it"
    )

    @model_validator(mode="after")
    def _unique_items(self) -> ScoreRequest:
        seen: set[str] = set()
        dupes = sorted({c.item_id for c in self.candidates if c.item_id in seen or seen.add(c.item_id)})
        if dupes:
            raise ValueError(f"candidates: duplicate item_id {dupes[:5]}")
        return self


class ScoredItem(BaseModel):
    item_id: str
    score: float


class RankedItem(BaseModel):
    item_id: str
    score: float
    position: int
    impression_id: str


class ScoreResponse(BaseModel):
    request_id: str
    arm: str
    model_version: int
    scores: list[ScoredItem] = Field(description="every candidate, in request order")
    ranking: list[RankedItem] = Field(description="the top-k shown, best first; each one was logged")
