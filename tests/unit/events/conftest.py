"""Valid event factories shared by the events tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def _impression_dict(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "impression_id": "imp-1",
        "request_id": "req-1",
        "user_id": "u1",
        "item_id": "i1",
        "features": {"I1": 3, "I2": 0.5, "C1": "68fd1e64", "tags": ["a", "b"]},
        "event_time_ms": 1_700_000_000_000,
        "served_prediction": 0.25,
        "model_version": 3,
        "arm": "reloop",
        "schema_version": 1,
    }
    event.update(overrides)
    return event


def _click_dict(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"impression_id": "imp-1", "event_time_ms": 1_700_000_001_000, "value": None}
    event.update(overrides)
    return event


def _sample_dict(**overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "sample_id": "imp-1",
        "features": {"I1": 3, "C1": "68fd1e64"},
        "label": 1,
        "served_prediction": 0.25,
        "served_version": 3,
        "event_time_ms": 1_700_000_000_000,
        "arm": "reloop",
        "weight": 1.0,
        "is_correction": False,
        "extra": {},
        "schema_version": 1,
    }
    event.update(overrides)
    return event


@pytest.fixture
def impression_dict() -> Callable[..., dict[str, Any]]:
    return _impression_dict


@pytest.fixture
def click_dict() -> Callable[..., dict[str, Any]]:
    return _click_dict


@pytest.fixture
def sample_dict() -> Callable[..., dict[str, Any]]:
    return _sample_dict
