"""bench/table_rate_probes.py: each probe's patch reaches the table optimizer through the learner's own
steps, and the learner is itself again after the probe."""

from __future__ import annotations

import numpy as np
import pytest
from reloop.bench import table_rate_probes as probes
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer
from reloop.engine.models.learner import TorchLearner
from reloop.engine.models.registry import build_learner

SPEC = FeatureSpec(fields=(CategoricalField(name="u", buckets=40), CategoricalField(name="i", buckets=40)))


def _learn(learner: TorchLearner, n: int = 300) -> None:
    rng = np.random.default_rng(0)
    rows = [{"u": f"u{rng.integers(30)}", "i": f"i{rng.integers(30)}"} for _ in range(n)]
    learner.learn(Featurizer(SPEC).transform(rows), (rng.random(n) < 0.4).astype(np.float32))


def _deepfm() -> TorchLearner:
    return build_learner("deepfm", SPEC, "ce", 0.0, seed=0, embedding_dim=4, hidden_units=[8])


def test_split_rates_step_the_first_order_table_and_the_embeddings_at_their_own_rates() -> None:
    make, set_rates = TorchLearner._make_optimizers, TorchLearner._set_rates
    with probes.split_rates(0.5, 0.01):
        learner = _deepfm()
        first = learner.model.linear.weights.table.weight
        before = first.detach().clone()
        _learn(learner)  # the learner sets its rates at each step: the probe's must survive that
        rate_of = {id(p): g["lr"] for g in learner.optimizers["embedding"].param_groups for p in g["params"]}
    assert rate_of[id(first)] == 0.5
    assert rate_of[id(learner.model.embedding.table.weight)] == 0.01
    assert not np.array_equal(first.detach().numpy(), before.numpy())
    assert (TorchLearner._make_optimizers, TorchLearner._set_rates) == (make, set_rates)
    assert {g["lr"] for g in _deepfm().optimizers["embedding"].param_groups} == {0.03}  # DeepFM's own


def test_initial_accumulator_starts_every_row_of_the_tables_at_the_value() -> None:
    with probes.initial_accumulator(0.1):
        learner = _deepfm()
    tables = learner.optimizers["embedding"]
    assert tables.param_groups[0]["initial_accumulator_value"] == 0.1
    sums = [tables.state[p]["sum"] for g in tables.param_groups for p in g["params"]]
    assert sums and all(float(s.min()) == float(s.max()) == pytest.approx(0.1) for s in sums)
    assert _deepfm().optimizers["embedding"].param_groups[0]["initial_accumulator_value"] == 0.0
