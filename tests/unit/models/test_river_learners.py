"""river learners: they learn, the numpy FM follows river's own update exactly, state round-trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from reloop.engine.features.featurizer import FeatureBatch, Featurizer
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.loss import LossStats
from reloop.engine.models.registry import available_backbones, backbone_entry, learner_from_state
from reloop.engine.models.river_learners import (
    RIVER_BACKBONES,
    NumpyFM,
    ScoreGradientLoss,
    build_river_learner,
)
from river import facto, linear_model, optim

SPEC = FeatureSpec(fields=(
    CategoricalField(name="user", buckets=97),
    CategoricalField(name="item", buckets=97),
    CategoricalField(name="ctx", buckets=11),
))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    order = np.argsort(p, kind="stable")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def _task(n: int, seed: int) -> tuple[FeatureBatch, np.ndarray]:
    """Clicks driven by a user bias, an item bias and a user x item affinity (what an FM can fit)."""
    rng = np.random.default_rng(seed)
    world = np.random.default_rng(0)
    bias_u, bias_i = world.normal(0, 1, 40), world.normal(0, 1, 40)
    lat_u, lat_i = world.normal(0, 1, (40, 3)), world.normal(0, 1, (40, 3))
    u, i, c = rng.integers(0, 40, n), rng.integers(0, 40, n), rng.integers(0, 5, n)
    logit = bias_u[u] + bias_i[i] + (lat_u[u] * lat_i[i]).sum(1) - 0.5
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    rows = [{"user": f"u{a}", "item": f"i{b}", "ctx": f"c{d}"} for a, b, d in zip(u, i, c, strict=True)]
    return Featurizer(SPEC).transform(rows), y


def _train(learner, batch: FeatureBatch, y: np.ndarray, size: int, epochs: int = 1) -> list[LossStats]:
    stats = []
    for _ in range(epochs):
        for a in range(0, len(y), size):
            stats.append(learner.learn(batch.take(slice(a, a + size)), y[a:a + size]))
    return stats


CONFIGS = {
    "river_lr": {"lr": 0.05, "intercept_lr": 0.05},
    "river_fm": {"lr": 0.05, "intercept_lr": 0.05},
    "river_fm_np": {"lr": 0.05, "intercept_lr": 0.05},
    "river_fm_np/minibatch": {"lr": 2.0, "intercept_lr": 2.0, "mode": "minibatch"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("strategy", ["ce", "reloop"])
def test_learners_learn_a_generated_task(name: str, strategy: str) -> None:
    train, y_train = _task(6000, seed=1)
    test, y_test = _task(2000, seed=2)
    backbone = name.split("/")[0]
    learner = build_river_learner(backbone, SPEC, strategy=strategy, alpha=0.5, seed=3, **CONFIGS[name])
    before = _auc(y_test, learner.predict_proba(test) + np.linspace(0, 1e-9, len(y_test)))
    y_last = np.full(len(y_train), 0.4)  # a constant "last model": ReLoop must still learn the task
    for a in range(0, len(y_train), 100):
        sl = slice(a, a + 100)
        learner.learn(train.take(sl), y_train[sl], y_last=y_last[sl] if strategy == "reloop" else None)
    after = _auc(y_test, learner.predict_proba(test))
    assert after > 0.7, f"{name}/{strategy}: test AUC {after:.3f}"
    assert after > before + 0.1


def test_learn_returns_loss_stats_of_the_scores_it_learned_from() -> None:
    batch, y = _task(300, seed=4)
    learner = build_river_learner("river_fm_np", SPEC, strategy="reloop", alpha=0.5, seed=0)
    y_last = np.linspace(0.05, 0.95, 300)
    p0 = learner.predict_proba(batch.take(slice(0, 1)))[0]
    stats = learner.learn(batch, y, y_last=y_last)
    assert isinstance(stats, LossStats)
    assert stats.n == 300 and stats.n_with_last == 300 and stats.strategy == "reloop"
    assert 0.0 < stats.sc_active_fraction < 1.0
    # the first sample's score is the one before any update
    first = learner.loss(torch.tensor([np.log(p0 / (1 - p0))]), torch.tensor([y[0]]))[1]
    assert first.ce > 0


def _river_fm_like(learner: NumpyFM, rows: np.ndarray, lr: float,
                   loss: ScoreGradientLoss) -> facto.FMClassifier:
    model = facto.FMClassifier(
        n_factors=learner.v.shape[1], weight_optimizer=optim.SGD(lr), latent_optimizer=optim.SGD(lr),
        loss=loss, intercept_lr=lr, seed=0,
    )
    for r in rows:
        model.latents[int(r)] = learner.v[int(r)].copy()
    return model


def test_numpy_fm_sequential_equals_river_fm_classifier() -> None:
    """Same initial parameters -> the same scores and parameters after a ReLoop stream, to float precision."""
    batch, y = _task(500, seed=5)
    y_last = np.random.default_rng(5).uniform(0, 1, 500)
    lr = 0.05
    ours = build_river_learner("river_fm_np", SPEC, strategy="reloop", alpha=0.5, seed=1,
                               lr=lr, intercept_lr=lr)
    river_loss = ScoreGradientLoss("reloop", 0.5)
    theirs = _river_fm_like(ours, np.unique(batch.cat), lr, river_loss)
    dicts = ours.layout.dicts(batch)

    for a in range(0, 500, 50):
        sl = slice(a, a + 50)
        ours.learn(batch.take(sl), y[sl], y_last=y_last[sl])
        for i in range(a, min(a + 50, 500)):
            river_loss.y_last = y_last[i]
            theirs.learn_one(dicts[i], bool(y[i]))
    river_p = np.array([theirs.predict_proba_one(x)[True] for x in dicts])
    np.testing.assert_allclose(ours.predict_proba(batch), river_p, rtol=1e-10, atol=1e-12)
    assert ours.w0 == pytest.approx(theirs.intercept, abs=1e-12)
    for r in np.unique(batch.cat):
        np.testing.assert_allclose(ours.v[r], theirs.latents[int(r)], atol=1e-12)
        assert ours.w[r] == pytest.approx(theirs.weights[int(r)], abs=1e-12)


def test_numpy_fm_without_factors_equals_river_logistic_regression() -> None:
    batch, y = _task(400, seed=6)
    y_last = np.random.default_rng(6).uniform(0, 1, 400)
    ours = build_river_learner("river_fm_np", SPEC, strategy="kd", alpha=0.3, embedding_dim=0,
                               lr=0.1, intercept_lr=0.1)
    theirs = build_river_learner("river_lr", SPEC, strategy="kd", alpha=0.3, lr=0.1, intercept_lr=0.1)
    for a in range(0, 400, 64):
        sl = slice(a, a + 64)
        s1 = ours.learn(batch.take(sl), y[sl], y_last=y_last[sl])
        s2 = theirs.learn(batch.take(sl), y[sl], y_last=y_last[sl])
        assert s1.total == pytest.approx(s2.total, rel=1e-10)
    np.testing.assert_allclose(ours.predict_proba(batch), theirs.predict_proba(batch), rtol=1e-10)


def test_minibatch_of_one_equals_sequential() -> None:
    batch, y = _task(60, seed=8)
    seq = build_river_learner("river_fm_np", SPEC, strategy="reloop", alpha=0.7, seed=2, lr=0.1)
    mini = build_river_learner("river_fm_np", SPEC, strategy="reloop", alpha=0.7, seed=2, lr=0.1,
                               mode="minibatch")
    y_last = np.random.default_rng(8).uniform(0, 1, 60)
    for i in range(60):
        seq.learn(batch.take(slice(i, i + 1)), y[i:i + 1], y_last=y_last[i:i + 1])
        mini.learn(batch.take(slice(i, i + 1)), y[i:i + 1], y_last=y_last[i:i + 1])
    np.testing.assert_allclose(mini.v, seq.v, atol=1e-12)
    np.testing.assert_allclose(mini.predict_proba(batch), seq.predict_proba(batch), atol=1e-12)


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backbone", RIVER_BACKBONES)
def test_state_round_trip_continues_like_an_uninterrupted_run(backbone: str) -> None:
    first, y1 = _task(300, seed=9)
    # the second stream has ids the first never had, so river_fm's lazy initialiser must resume too
    rows = [{"user": f"new{k}", "item": f"i{k % 7}", "ctx": "c1"} for k in range(100)]
    second, y2 = Featurizer(SPEC).transform(rows), np.arange(100) % 2
    original = build_river_learner(backbone, SPEC, strategy="reloop", alpha=0.5, seed=4, lr=0.05)
    _train(original, first, y1, 50)

    # rebuilt from the state alone, as a snapshot restore does
    restored = learner_from_state(_roundtrip(original.state_dict()))
    assert type(restored) is type(original) and restored.config == original.config
    np.testing.assert_array_equal(restored.predict_proba(first), original.predict_proba(first))

    y_last = np.linspace(0.1, 0.9, 100)
    original.learn(second, y2, y_last=y_last)
    restored.learn(second, y2, y_last=y_last)
    np.testing.assert_array_equal(restored.predict_proba(second), original.predict_proba(second))


def test_river_backbones_are_in_the_registry() -> None:
    assert set(RIVER_BACKBONES) <= set(available_backbones())
    assert {backbone_entry(name).kind for name in RIVER_BACKBONES} == {"river"}


def test_state_of_another_backbone_is_refused() -> None:
    lr = build_river_learner("river_lr", SPEC)
    fm = build_river_learner("river_fm_np", SPEC)
    with pytest.raises(ValueError, match="different backbone"):
        fm.load_state_dict(lr.state_dict())
    other = build_river_learner("river_fm_np", SPEC, embedding_dim=4)
    with pytest.raises(ValueError, match="different model"):
        other.load_state_dict(fm.state_dict())
    with pytest.raises(ValueError, match="unknown river_fm_np state format 'x'"):
        fm.load_state_dict({**fm.state_dict(), "format": "x"})
    from reloop.engine.checkpoint.registry import NewerFormat

    with pytest.raises(NewerFormat, match="format 99, written by a newer reloop"):
        fm.load_state_dict({**fm.state_dict(), "format": 99})


@pytest.mark.parametrize("backbone", RIVER_BACKBONES)
def test_frozen_clone_predicts_like_the_source_and_never_learns(backbone: str) -> None:
    batch, y = _task(200, seed=10)
    learner = build_river_learner(backbone, SPEC, lr=0.05)
    _train(learner, batch, y, 50)
    frozen = learner.clone_frozen()
    before = frozen.predict_proba(batch)
    np.testing.assert_array_equal(before, learner.predict_proba(batch))
    _train(learner, batch, y, 50)
    np.testing.assert_array_equal(frozen.predict_proba(batch), before)
    assert not np.array_equal(learner.predict_proba(batch), before)
    with pytest.raises(RuntimeError, match="frozen"):
        frozen.learn(batch, y)


def test_bad_inputs_fail_with_clear_errors() -> None:
    batch, y = _task(10, seed=11)
    learner = build_river_learner("river_fm_np", SPEC)
    with pytest.raises(ValueError, match="labels has 9"):
        learner.learn(batch, y[:9])
    with pytest.raises(ValueError, match="y_last has 3"):
        learner.learn(batch, y, y_last=np.zeros(3))
    with pytest.raises(ValueError, match="unknown river backbone"):
        build_river_learner("river_xgb", SPEC)
    with pytest.raises(ValueError, match="learning_rate: Extra inputs"):
        build_river_learner("river_lr", SPEC, learning_rate=0.1)
    with pytest.raises(ValueError, match="mode"):
        build_river_learner("river_fm_np", SPEC, mode="async")


def test_missing_values_are_skipped_like_river_skips_absent_keys() -> None:
    learner = build_river_learner("river_lr", SPEC, lr=0.5)
    batch = Featurizer(SPEC).transform([{"user": "a", "item": None, "ctx": ""}])
    learner.learn(batch, np.array([1.0]))
    touched = set(learner.model.weights)
    assert touched == {int(batch.cat[0, 0])}
    # river's own LR given the same dict learns the same weight
    ref = linear_model.LogisticRegression(optimizer=optim.SGD(0.5), loss=ScoreGradientLoss("ce", 0.0))
    ref.learn_one({int(batch.cat[0, 0]): 1.0}, True)
    assert learner.model.weights == ref.weights


def test_minibatch_step_is_sgd_on_the_batch_mean_loss() -> None:
    """One minibatch step = params - lr * autograd gradient of the mean engine loss (repeated ids too)."""
    batch, y = _task(64, seed=12)  # 40 users/items in 64 rows: rows repeat inside the batch
    y_last = np.random.default_rng(12).uniform(0, 1, 64)
    lr = 0.5
    learner = build_river_learner("river_fm_np", SPEC, strategy="reloop", alpha=0.5, seed=6, lr=lr,
                                  intercept_lr=lr, mode="minibatch", embedding_dim=4)
    learner.w[:] = np.random.default_rng(1).normal(0, 0.1, learner.w.shape)
    w0 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    learner.w0 = 0.2
    w = torch.tensor(learner.w, requires_grad=True)
    v = torch.tensor(learner.v, requires_grad=True)
    ids = torch.from_numpy(batch.cat)
    e = v[ids]
    s = e.sum(1)
    raw = w0 + w[ids].sum(1) + 0.5 * ((s * s).sum(1) - (e * e).sum((1, 2)))
    loss, _ = learner.loss(raw, torch.from_numpy(y), y_last=torch.from_numpy(y_last))
    loss.backward()

    learner.learn(batch, y, y_last=y_last)
    assert learner.w0 == pytest.approx(0.2 - lr * float(w0.grad), abs=1e-12)
    np.testing.assert_allclose(learner.w, (w - lr * w.grad).detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(learner.v, (v - lr * v.grad).detach().numpy(), atol=1e-12)


@pytest.mark.parametrize("backbone", RIVER_BACKBONES)
def test_a_row_with_a_dense_input_that_is_not_finite_is_left_out(backbone: str) -> None:
    # An infinite dense input (1e39 in float32; the featurizer refuses that value, a hand-built batch
    # can still hold it): before, river's FM turned every weight it touched NaN.
    from reloop.engine.features.spec import NumericField

    spec = FeatureSpec(fields=(CategoricalField(name="user", buckets=97), NumericField(name="x")))
    rows = [{"user": f"u{k % 9}", "x": 0.5} for k in range(40)]
    featurizer = Featurizer(spec)
    good = featurizer.transform(rows)
    bad = featurizer.transform([*rows[:3], {"user": "u1", "x": 0.5}, *rows[4:]])
    bad.num[3, 0] = np.inf
    learner = build_river_learner(backbone, spec, strategy="ce", alpha=0.0, seed=0, lr=0.05)
    before = learner.predict_proba(good)
    learner.learn(bad, np.arange(40) % 2)
    after = learner.predict_proba(good)
    assert learner.skipped_samples == 1 and learner.left_out.tolist() == [3]
    assert np.isfinite(after).all() and not np.array_equal(before, after)
    learner.learn(good, np.arange(40) % 2)
    assert learner.left_out is None
