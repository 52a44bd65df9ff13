"""What every dataset loader hands out: time-ordered rows plus a description of their fields.

A loader knows its file format and how to put rows in time order; it knows nothing about click delays
or served predictions. ``reloop.connectors.files.datasets.events`` turns rows into Impression/Click events.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from reloop.engine.events.schema import Features

FieldKind = Literal["categorical", "numeric", "multi"]
TimeKind = Literal["event", "pseudo"]


class DatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One feature field: ``categorical`` (str), ``numeric`` (float) or ``multi`` (list[str])."""

    name: str
    kind: FieldKind


@dataclass(frozen=True, slots=True)
class DatasetRow:
    """One displayed item with its outcome.

    ``click_time_ms`` is set only when the dataset records when the click happened; otherwise the
    click-delay model decides. ``served_prediction``/``model_version`` are set only by logs that
    recorded what was served (the generic impression log).
    """

    row_id: str
    request_id: str
    user_id: str
    item_id: str
    event_time_ms: int
    features: Features
    label: int
    click_time_ms: int | None = None
    served_prediction: float | None = None
    model_version: int | None = None


class Dataset(Protocol):
    name: str
    #: "event" when times come from the data, "pseudo" when they are made up from file order.
    time_kind: TimeKind

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        """The feature fields every row's ``features`` draws from (a row may omit a missing value)."""
        ...

    @property
    def counters(self) -> tuple[str, ...]:
        """The click counters a backtest of this data counts by default (``reloop backtest --counters
        auto``): its user's and item's categorical fields, and crosses of them, as chosen on the data's
        selection periods (docs/backtest/ablation.md); empty where the data names no user or item."""
        ...

    def rows(self) -> Iterator[DatasetRow]:
        """All rows in non-decreasing ``event_time_ms``."""
        ...


def user_and_item_counters(fields: tuple[FieldInfo, ...], user: str, item: str) -> tuple[str, ...]:
    """Counters of the user's and the item's field, those of the two that are categorical fields (a
    numeric or absent one cannot be counted)."""
    categorical = set(field_names(fields, "categorical"))
    return tuple(name for name in (user, item) if name in categorical)


def field_names(fields: tuple[FieldInfo, ...], kind: FieldKind) -> list[str]:
    return [f.name for f in fields if f.kind == kind]


#: 2001-09-09T01:46:40Z: a fixed, obviously synthetic origin for datasets without timestamps.
PSEUDO_TIME_ORIGIN_MS = 1_000_000_000_000
