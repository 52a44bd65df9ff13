"""The feature spec that fits the simulated world's features (reloop.engine.simulate.world)."""

from __future__ import annotations

from typing import Any


def world_spec_dict(*, id_buckets: int = 4096) -> dict[str, Any]:
    """FeatureSpec as data (what configs and snapshots store). Ids are hashed into ``id_buckets``."""
    return {
        "fields": [
            {"kind": "categorical", "name": "user_id", "buckets": id_buckets},
            {"kind": "categorical", "name": "user_segment", "buckets": 64},
            {"kind": "categorical", "name": "device", "buckets": 8},
            {"kind": "categorical", "name": "hour", "buckets": 32},
            {"kind": "categorical", "name": "item_id", "buckets": id_buckets},
            {"kind": "categorical", "name": "item_category", "buckets": 64},
        ]
    }
