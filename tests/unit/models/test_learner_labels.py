"""Labels a learner is given must be probabilities, for every kind of learner."""

from __future__ import annotations

import numpy as np
import pytest
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer
from reloop.engine.models.registry import build_learner

SPEC = FeatureSpec(fields=(CategoricalField(name="u", buckets=16),))


@pytest.mark.parametrize("backbone", ["lr", "dcn", "ftrl", "river_lr", "river_fm_np"])
@pytest.mark.parametrize("labels", [[-1.0, 1.0], [0.0, 2.0], [0.0, np.nan]])
def test_labels_outside_zero_one_are_refused_naming_them(backbone: str, labels: list[float]) -> None:
    # -1/1 and 0/2 labels trained without a word (the loss went negative); a NaN label was left out with
    # a message about "a numeric value too large ... or an infinite sample weight".
    learner = build_learner(backbone, SPEC, "ce", 0.0)
    batch = Featurizer(SPEC).transform([{"u": "a"}, {"u": "b"}])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        learner.learn(batch, np.asarray(labels))
    learner.learn(batch, np.asarray([0.0, 1.0]))  # and a soft label is a probability too
    learner.learn(batch, np.asarray([0.25, 1.0]))
