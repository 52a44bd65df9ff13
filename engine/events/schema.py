"""The event contract: what the scoring service logs, what clients send, what the joiner emits.

Times are integer milliseconds since the Unix epoch (the unit Kafka uses for record timestamps).
Features are a flat JSON-friendly mapping: field name -> str | int | float | list[str].

The bounds of the contract are written on the fields (``Annotated`` with ``msgspec.Meta``), so the
join's door decodes and checks a record in one C pass (engine/events/codec.py); static type checkers
read them as the plain types. engine/events/validation.py restates every rule field by field, with
the reason a refused record is dead-lettered for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from msgspec import Meta

SCHEMA_VERSION = 1
MAX_EVENT_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

# An int feature value is a signed 64-bit one: JSON holds bigger ones, Arrow and numpy do not.
FeatureValue = str | Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | float | list[str]
Features = dict[str, FeatureValue]
_Id = Annotated[str, Meta(min_length=1)]
# The arm is a metric label (the train stage's rolling metrics per arm): a 100 KB arm made every scrape
# of the train stage 860 KB, and kept it so through restarts (the windows are in the snapshots).
MAX_ARM_CHARS = 64
_Arm = Annotated[str, Meta(min_length=1, max_length=MAX_ARM_CHARS)]
_Time = Annotated[int, Meta(ge=0, le=MAX_EVENT_TIME_MS)]
_Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
_Version = Annotated[int, Meta(ge=0, le=2**63 - 1)]
_Major = Annotated[int, Meta(ge=SCHEMA_VERSION, le=SCHEMA_VERSION)]


@dataclass(frozen=True, slots=True)
class Impression:
    """One item shown to a user, with the prediction that ranked it and the model version that made it."""

    impression_id: _Id
    request_id: _Id
    user_id: _Id
    item_id: _Id
    features: Features
    event_time_ms: _Time
    served_prediction: _Probability
    model_version: _Version
    arm: _Arm = "default"
    schema_version: _Major = SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class Click:
    """A click (or other positive action) on an impression."""

    impression_id: _Id
    event_time_ms: _Time
    value: float | None = None
    schema_version: _Major = SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class LabeledSample:
    """An impression joined with its outcome: the unit the trainer learns from.

    ``served_prediction`` is y_last when the logged prediction is used (the default);
    ``is_correction`` marks a positive re-emitted after the sample had already gone out as a negative.
    """

    sample_id: str
    features: Features
    label: int
    served_prediction: float
    served_version: int
    event_time_ms: int
    arm: str = "default"
    weight: float = 1.0
    is_correction: bool = False
    extra: dict[str, str] = field(default_factory=dict)
