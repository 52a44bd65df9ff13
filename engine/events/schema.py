"""The event contract: what the scoring service logs, what clients send, what the joiner emits.

Times are integer milliseconds since the Unix epoch (the unit Kafka uses for record timestamps).
Features are a flat JSON-friendly mapping: field name -> str | int | float | list[str].
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 1

FeatureValue = str | int | float | list[str]
Features = dict[str, FeatureValue]


@dataclass(frozen=True, slots=True)
class Impression:
    """One item shown to a user, with the prediction that ranked it and the model version that made it."""

    impression_id: str
    request_id: str
    user_id: str
    item_id: str
    features: Features
    event_time_ms: int
    served_prediction: float
    model_version: int
    arm: str = "default"
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True, slots=True)
class Click:
    """A click (or other positive action) on an impression."""

    impression_id: str
    event_time_ms: int
    value: float | None = None
    schema_version: int = SCHEMA_VERSION


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
