"""Feature spec (fields as data) and the featurizer that turns raw feature dicts into embedding rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reloop.engine.features.spec import (
    CategoricalField,
    FeatureSpec,
    MultiCategoricalField,
    NumericField,
    criteo_spec,
)

if TYPE_CHECKING:
    from reloop.engine.features.featurizer import FeatureBatch, FeatureError, Featurizer, TorchFeatureBatch

__all__ = [
    "CategoricalField",
    "FeatureBatch",
    "FeatureError",
    "FeatureSpec",
    "Featurizer",
    "MultiCategoricalField",
    "NumericField",
    "TorchFeatureBatch",
    "criteo_spec",
]
_FEATURIZER = ("FeatureBatch", "FeatureError", "Featurizer", "TorchFeatureBatch")


def __getattr__(name: str) -> Any:
    # The featurizer on first use: it brings torch in, and the config (which reads the spec and the
    # counters' settings) is loaded by processes that need no torch (`reloop run`'s supervising parent).
    if name in _FEATURIZER:
        from reloop.engine.features import featurizer

        return getattr(featurizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
