"""Feature spec (fields as data) and the featurizer that turns raw feature dicts into embedding rows."""

from reloop.engine.features.featurizer import FeatureBatch, FeatureError, Featurizer, TorchFeatureBatch
from reloop.engine.features.spec import (
    CategoricalField,
    FeatureSpec,
    MultiCategoricalField,
    NumericField,
    criteo_spec,
)

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
