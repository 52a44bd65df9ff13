from __future__ import annotations

import math

import numpy as np
import pytest
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import build_learner
from reloop.engine.runtime.synthetic import SPEC
from reloop.engine.train.period import PeriodTrigger
from reloop.engine.train.stream import StreamTrainer, StreamTrainerConfig


class Recorder:
    """Wraps a learner and records what learn() was given."""

    def __init__(self, learner):
        self.inner = learner
        self.calls = []

    def predict_proba(self, batch):
        return self.inner.predict_proba(batch)

    def learn(self, batch, labels, y_last=None, weights=None):
        self.calls.append((labels.copy(), None if y_last is None else y_last.copy()))
        return self.inner.learn(batch, labels, y_last, weights)

    def clone_frozen(self):
        return self.inner.clone_frozen()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _trainer(**cfg):
    spec = FeatureSpec.model_validate(SPEC)
    learner = Recorder(build_learner("lr", spec, "reloop", 0.5, seed=0))
    return StreamTrainer(learner=learner, featurizer=Featurizer(spec), config=StreamTrainerConfig(**cfg))


def _samples(n, version=0, pred=0.25, seed=0):
    rng = np.random.default_rng(seed)
    return [
        LabeledSample(
            sample_id=f"s{i}",
            features={"user": f"u{rng.integers(50)}", "item": "a", "ctx": 1},
            label=int(i % 3 == 0),
            served_prediction=pred,
            served_version=version,
            event_time_ms=1000 + i,
            is_correction=(i == 1),
        )
        for i in range(n)
    ]


def test_predict_then_learn_scores_before_the_update():
    t = _trainer(batch_size=8)
    batch = _samples(8)
    before = t.learner.predict_proba(t.featurizer.transform([s.features for s in batch]))
    res = t.train_batch(batch)
    np.testing.assert_allclose(res.scores, before)
    after = t.learner.predict_proba(t.featurizer.transform([s.features for s in batch]))
    assert not np.allclose(after, before)
    assert len(t.progressive) == 7  # the correction sample is trained on but not scored twice
    assert t.counters.corrections == 1 and t.counters.samples == 8


def test_logged_y_last_is_the_served_prediction():
    t = _trainer(batch_size=4)
    t.train_batch(_samples(4, pred=0.4))
    np.testing.assert_allclose(t.learner.calls[-1][1], 0.4)


@pytest.mark.parametrize("policy", ["use_logged", "recompute", "skip_sc"])
def test_version_mismatch_policies(policy):
    t = _trainer(batch_size=4, version_mismatch=policy)
    t.train_batch(_samples(4, version=0))
    t.on_snapshot(7)
    frozen = t.prev_model
    mixed = _samples(4, version=7, pred=0.4)[:2] + _samples(4, version=3, pred=0.4)[2:]
    result = t.train_batch(mixed)
    y_last = t.learner.calls[-1][1]
    np.testing.assert_allclose(y_last[:2], 0.4)
    assert t.counters.version_mismatches == 2
    # Exported (reloop_train_version_mismatches_total): a service logging versions of its own numbering
    # had every sample's y_last decided by the policy, seen nowhere.
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.train_metrics import TrainerMetrics

    stats = EngineStats()
    TrainerMetrics(stats, wall_period_s=None).trained(result)
    assert result.version_mismatches == 2 and stats.train_version_mismatches.get() == 2
    if policy == "use_logged":
        np.testing.assert_allclose(y_last[2:], 0.4)
    elif policy == "skip_sc":
        assert all(math.isnan(x) for x in y_last[2:])
    else:
        expect = frozen.predict_proba(t.featurizer.transform([s.features for s in mixed]))[2:]
        np.testing.assert_allclose(y_last[2:], expect, rtol=1e-6)


def test_snapshot_mode_recomputes_with_the_previous_model_only():
    t = _trainer(batch_size=4, y_last="snapshot")
    t.train_batch(_samples(4))
    assert all(math.isnan(x) for x in t.learner.calls[-1][1])  # no previous snapshot yet
    t.on_snapshot(1)
    frozen_scores = t.prev_model.predict_proba(t.featurizer.transform([s.features for s in _samples(4)]))
    t.train_batch(_samples(4))
    t.train_batch(_samples(4))  # the previous model stays the snapshot's, not the moving one
    np.testing.assert_allclose(t.learner.calls[-1][1], frozen_scores, rtol=1e-6)


def test_state_roundtrip():
    t = _trainer(batch_size=4)
    t.train_batch(_samples(4))
    state = t.state_dict()
    u = _trainer(batch_size=4)
    u.load_state_dict(state)
    u.on_snapshot(3)
    assert u.counters == t.counters and u.prev_version == 3
    assert u.progressive.window() == t.progressive.window()


def test_period_triggers():
    p = PeriodTrigger(every_samples=100)
    assert not p.due(samples=99, event_time_ms=None, now_ms=0)
    assert p.due(samples=100, event_time_ms=None, now_ms=0)
    p.mark(samples=100, event_time_ms=None, now_ms=0)
    assert not p.due(samples=150, event_time_ms=None, now_ms=0)
    w = PeriodTrigger(every_wall_s=2)
    assert not w.due(samples=0, event_time_ms=None, now_ms=1000)
    assert not w.due(samples=5, event_time_ms=None, now_ms=2999)
    assert w.due(samples=5, event_time_ms=None, now_ms=3000)
    with pytest.raises(ValueError, match="exactly one"):
        PeriodTrigger(every_samples=1, every_wall_s=1)


@pytest.mark.parametrize("kind", ["every_wall_s", "every_event_ms"])
def test_a_boundary_with_nothing_trained_since_the_last_is_passed_not_published(kind):
    """The next boundary then comes a whole period after the one passed, not at the next sample."""
    p = PeriodTrigger(**{kind: 1 if kind == "every_wall_s" else 1000})
    heard: list[int] = []
    p.on_idle = lambda: heard.append(p.idle_boundaries)

    def due(samples: int, t: int) -> bool:
        return p.due(samples=samples, event_time_ms=t, now_ms=t)

    assert not due(10, 0)  # the first period starts
    assert due(10, 1000)
    p.mark(samples=10, event_time_ms=1000, now_ms=1000)
    assert not due(10, 2000) and heard == [1]  # quiet: passed
    assert not due(10, 2500) and heard == [1]  # within the next period: nothing more to pass
    assert not due(11, 2999)  # a sample trained, within the period that started at 2000
    assert due(11, 3000)
    assert p.idle_boundaries == 1


@pytest.mark.parametrize("wide", [False, True])
def test_samples_a_model_cannot_take_are_counted_and_reported(wide):
    from reloop.engine.features.spec import CategoricalField, NumericField
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.models.config import OptimizerConfig
    from reloop.engine.runtime.train_metrics import TrainerMetrics

    spec = FeatureSpec(fields=(CategoricalField(name="user", buckets=50), NumericField(name="x")))
    optimizer = {"optimizer": OptimizerConfig.per_event()} if wide else {}
    t = StreamTrainer(
        learner=build_learner("dcn", spec, "ce", 0.0, seed=0, **optimizer),
        featurizer=Featurizer(spec),
        config=StreamTrainerConfig(batch_size=8),
    )
    stats = EngineStats()
    metrics = TrainerMetrics(stats, wall_period_s=None)
    good = [LabeledSample(f"g{i}", {"user": f"u{i}", "x": 0.5}, i % 2, 0.5, 0, 1000 + i) for i in range(8)]

    def with_x(x: float, weight: float = 1.0) -> list[LabeledSample]:
        return [*good[:7], LabeledSample("b", {"user": "u", "x": x}, 1, 0.5, 0, 2000, weight=weight)]

    # 1e30: finite in float32 but the row's logit is NaN, so it is left out (and scored NaN). An
    # infinite weight: finite logits but gradients that are not; the learner finds the row and learns
    # the other 7, except with the per-event wide part, which learnt the batch before the backbone's
    # gradients exist: the step is skipped (8 not learnt).
    results = [
        t.train_batch(good),
        t.train_batch(with_x(1e30)),
        t.train_batch(with_x(0.5, weight=float("inf"))),
        t.train_batch(good),
    ]
    for r in results:
        metrics.trained(r)
    step_lost = [0, 0, 8, 0] if wide else [0, 0, 1, 0]
    assert [r.skipped for r in results] == [False, False, wide, False]
    assert [r.skipped_samples for r in results] == [0, 1, step_lost[2], 0]
    assert np.isnan(results[1].scores[7]) and np.isfinite(results[1].scores[:7]).all()
    # Which rows of each batch were not learnt, for the ledger and the dead letters:
    assert [None if r.unlearnt is None else np.flatnonzero(r.unlearnt).tolist() for r in results] == [
        None,
        [7],
        list(range(8)) if wide else [7],
        None,
    ]
    assert "cannot take" in results[1].unlearnt_why
    assert ("skipped" if wide else "cannot take") in results[2].unlearnt_why
    assert np.isfinite(t.learner.predict_proba(t.featurizer.transform([s.features for s in good]))).all()
    lost = 1 + step_lost[2]
    assert (t.counters.skipped_steps, t.counters.skipped_samples, t.counters.steps) == (int(wide), lost, 4)
    assert (stats.train_skipped_steps.get(), stats.train_skipped_samples.get()) == (int(wide), lost)
