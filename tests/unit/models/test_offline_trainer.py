"""The offline trainer: early stopping with best-state restore, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer
from reloop.engine.models.registry import build_learner
from reloop.engine.train.offline import ArrayDataset, OfflineConfig, OfflineTrainer, evaluate

SPEC = FeatureSpec(fields=(CategoricalField(name="u", buckets=40), CategoricalField(name="i", buckets=40)))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, 10, n), rng.integers(0, 10, n)
    p = 1 / (1 + np.exp(-(np.where((u + i) % 3 == 0, 2.0, -1.0))))
    y = (rng.random(n) < p).astype(np.float32)
    rows = [{"u": str(a), "i": str(b)} for a, b in zip(u, i, strict=True)]
    return ArrayDataset(Featurizer(SPEC).transform(rows), y)


def test_fit_is_deterministic_for_a_seed():
    train, valid = _data(1000, 0), _data(300, 1)

    def run():
        learner = build_learner("fm", SPEC, "ce", 0.0, seed=3, optimizer={"lr": 0.02})
        r = OfflineTrainer(OfflineConfig(epochs=2, batch_size=100, seed=9, single_thread=True)).fit(
            learner, train, valid
        )
        return [e.train_loss for e in r.epochs], learner.predict_proba(valid.batch)

    (l1, p1), (l2, p2) = run(), run()
    assert l1 == l2
    np.testing.assert_array_equal(p1, p2)


def test_early_stopping_restores_the_best_epoch():
    # lr so large the model overfits/oscillates after the first epochs: validation AUC must stop improving.
    train, valid = _data(400, 2), _data(400, 3)
    learner = build_learner("dcn", SPEC, "ce", 0.0, seed=0, optimizer={"lr": 0.05}, hidden_units=(64, 64))
    seen = []
    result = OfflineTrainer(OfflineConfig(epochs=30, batch_size=32, patience=2, single_thread=True)).fit(
        learner, train, valid, on_epoch=seen.append
    )
    assert len(result.epochs) < 30 and len(seen) == len(result.epochs)
    best = max(result.epochs, key=lambda e: e.valid.auc)
    assert result.best_epoch == best.epoch
    assert result.epochs[-1].epoch == result.best_epoch + 2  # stopped after `patience` worse epochs
    assert evaluate(learner, valid).auc == pytest.approx(best.valid.auc, abs=1e-12)


def test_a_validation_set_of_one_class_picks_the_best_epoch_by_logloss():
    # With AUC NaN no epoch was ever the best: best_epoch stayed None and the last state was kept.
    train, valid = _data(400, 2), _data(400, 3)
    one_class = ArrayDataset(valid.batch, np.zeros_like(valid.labels))
    learner = build_learner("dcn", SPEC, "ce", 0.0, seed=0, optimizer={"lr": 0.05}, hidden_units=(64, 64))
    result = OfflineTrainer(OfflineConfig(epochs=6, batch_size=32, patience=2, single_thread=True)).fit(
        learner, train, one_class
    )
    best = min(result.epochs, key=lambda e: e.valid.logloss)
    assert result.best_epoch == best.epoch
    assert evaluate(learner, one_class).logloss == pytest.approx(best.valid.logloss, abs=1e-9)


def test_dataset_from_labeled_samples_uses_served_prediction_as_y_last():
    samples = [
        LabeledSample(f"s{k}", {"u": "a", "i": str(k)}, k % 2, 0.25 * k, 1, 1000 + k, weight=1.0 + k)
        for k in range(4)
    ]
    data = ArrayDataset.from_samples(samples, Featurizer(SPEC))
    np.testing.assert_allclose(data.y_last, [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(data.weights, [1, 2, 3, 4])
    assert data.labels.tolist() == [0, 1, 0, 1]
    assert ArrayDataset.from_samples(samples, Featurizer(SPEC), use_served_prediction=False).y_last is None
    with pytest.raises(ValueError, match="labels has 3 rows"):
        ArrayDataset(data.batch, data.labels[:3])
