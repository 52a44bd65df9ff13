"""A loader's field list -> the models' FeatureSpec (engine/features/spec.py).

Categorical and multi-valued fields are hashed into ``buckets`` rows each (``buckets_per_field``
overrides one field); numeric fields are log-bucketed by default, the Criteo winners' transform, which
needs no statistics over the data and so suits a stream.
"""

from __future__ import annotations

from collections.abc import Mapping

from reloop.connectors.files.datasets.base import FieldInfo
from reloop.engine.features.spec import (
    CategoricalField,
    FeatureSpec,
    MultiCategoricalField,
    NumericField,
    NumericTransform,
)


def feature_spec(
    fields: tuple[FieldInfo, ...],
    buckets: int = 10_000,
    buckets_per_field: Mapping[str, int] | None = None,
    numeric_transform: NumericTransform = "log_bucket",
    multi_max_len: int = 8,
) -> FeatureSpec:
    """>>> from reloop.connectors.files.datasets.movielens import FIELDS
    >>> feature_spec(FIELDS, buckets=100).multi_fields[0].name
    'genres'
    """
    per_field = dict(buckets_per_field or {})
    unknown = sorted(set(per_field) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"buckets_per_field names unknown fields {unknown}")
    out: list = []
    for f in fields:
        n = per_field.get(f.name, buckets)
        if f.kind == "categorical":
            out.append(CategoricalField(name=f.name, buckets=n))
        elif f.kind == "multi":
            out.append(MultiCategoricalField(name=f.name, buckets=n, max_len=multi_max_len))
        else:
            out.append(NumericField(name=f.name, transform=numeric_transform, buckets=n))
    return FeatureSpec(fields=tuple(out))
