"""The learner defaults (optimizer groups) and the opt-in per-event Bayesian wide part, its state."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from reloop.engine.features import (
    CategoricalField,
    FeatureSpec,
    Featurizer,
    MultiCategoricalField,
    NumericField,
)
from reloop.engine.loss.delayed import with_delayed_feedback
from reloop.engine.loss.losses import make_loss
from reloop.engine.models.config import ADAGRAD_EMBEDDING_LR, OptimizerConfig
from reloop.engine.models.registry import build_learner, learner_from_state
from reloop.engine.models.wide import OnlineWide

SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="u", buckets=30),
        CategoricalField(name="i", buckets=30),
        NumericField(name="x", transform="identity"),
        MultiCategoricalField(name="tags", buckets=20, max_len=3),
    )
)


WIDE = OptimizerConfig.per_event()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [
        {
            "u": f"u{rng.integers(6)}",
            "i": f"i{rng.integers(9)}",
            "x": float(rng.uniform(0, 5)),
            "tags": [f"t{k}" for k in rng.choice(6, size=int(rng.integers(0, 4)), replace=False)],
        }
        for _ in range(n)
    ]
    return Featurizer(SPEC).transform(rows), (rng.random(n) < 0.5).astype(np.float32), rng


def _reference(wide: OnlineWide, batch, deep, labels, loss, y_last=None, weights=None) -> np.ndarray:
    """The textbook filter, one event at a time, in numpy (rows with their values, bias last)."""
    from reloop.engine.models.ftrl import _active

    rows, vals = _active(SPEC, batch)
    out = np.empty(len(labels))
    for i in range(len(labels)):
        keep = vals[i] != 0
        r, x = rows[i][keep], vals[i][keep]
        m = float(wide.mean[r] @ x)
        v = float(wide.var[r] @ (x * x))
        z = deep[i] + m
        out[i] = z / math.sqrt(1 + math.pi / 8 * v)
        p = 1 / (1 + math.exp(-z))
        yl = np.nan if y_last is None else float(y_last[i])
        g = loss.event_gradient(p, float(labels[i]), yl)
        h = loss.event_curvature(p, yl)
        if weights is not None:
            g, h = g * weights[i], h * weights[i]
        k = 1 / (1 + h * v)
        s = wide.var[r].copy()
        wide.mean[r] -= s * x * g * k
        wide.var[r] -= (s * x) ** 2 * h * k
    return out


@pytest.mark.parametrize("delayed", ["none", "fnw"])
@pytest.mark.parametrize("strategy", ["ce", "kd", "reloop"])
def test_wide_part_is_the_per_event_filter(strategy, delayed):
    batch, y, rng = _data(80)
    deep = rng.normal(size=80)
    y_last = rng.uniform(0.1, 0.9, 80)
    y_last[::7] = np.nan
    weights = rng.uniform(0.5, 2.0, 80)
    # FNW's importance weights reach the per-event part too (a CE shortcut once skipped them).
    loss = with_delayed_feedback(make_loss(strategy, 0.5), delayed)
    a, b = OnlineWide(SPEC), OnlineWide(SPEC)
    got = a.learn(batch, deep, y, loss, y_last, weights)
    want = _reference(b, batch, deep, y, loss, y_last, weights)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.var, b.var, rtol=1e-10, atol=1e-12)
    # Each event's score came BEFORE it was learned and AFTER the earlier ones were: the first event
    # sees the prior, and scoring the batch again now differs.
    m0, v0 = OnlineWide(SPEC).moments(batch.take(slice(0, 1)))
    assert m0[0] == 0 and got[0] == pytest.approx(deep[0] / math.sqrt(1 + math.pi / 8 * v0[0]))
    assert not np.allclose(a.logits(batch, deep), got)


def test_event_gradient_matches_raw_gradient_for_every_strategy():
    rng = np.random.default_rng(3)
    z = rng.normal(size=50) * 2
    y = (rng.random(50) < 0.5).astype(np.float64)
    yl = rng.uniform(0, 1, 50)
    yl[::5] = np.nan
    for strategy in ("ce", "kd", "reloop", "reloop_logit"):
        loss = make_loss(strategy, 0.3)
        want = loss.raw_gradient(z, y, yl)
        p = 1 / (1 + np.exp(-z))
        got = [loss.event_gradient(float(p[i]), float(y[i]), float(yl[i])) for i in range(50)]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_event_curvature_is_the_gauss_newton_curvature_of_each_loss():
    p, h = 0.3, 0.3 * 0.7
    assert make_loss("ce", 0.5).event_curvature(p, 0.9) == pytest.approx(h)
    assert make_loss("kd", 0.5).event_curvature(p, 0.9) == pytest.approx(h)  # both terms are log losses
    # ReLoop's one-sided term is linear in p: only the CE part (weight 1 - alpha) has curvature, so a
    # per-event Newton step on an inactive sample moves as far as plain CE would.
    assert make_loss("reloop", 0.5).event_curvature(p, 0.9) == pytest.approx(0.5 * h)
    assert make_loss("reloop", 0.5).event_curvature(p, float("nan")) == pytest.approx(h)  # no teacher: CE


def test_a_burst_is_learned_within_the_batch_and_noise_settles():
    spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=10),))
    fz = Featurizer(spec)
    loss = make_loss("ce")
    wide = OnlineWide(spec)
    # One new user who always clicks: each event is scored higher than the one before.
    burst = fz.transform([{"u": "new"}] * 20)
    scores = wide.learn(burst, np.zeros(20), np.ones(20), loss)
    assert np.all(np.diff(scores) > 0)
    # A user whose clicks are coin flips: the steps shrink with the evidence (no fixed learning rate).
    coin = fz.transform([{"u": "coin"}] * 400)
    labels = np.tile([1.0, 0.0], 200)
    wide.learn(coin, np.zeros(400), labels, loss)
    row = int(coin.cat[0, 0])
    assert wide.var[row] < 0.02 and abs(wide.mean[row]) < 0.05


def test_default_optimizer_groups():
    opt = OptimizerConfig()
    assert (opt.effective_lr("wide_deep"), opt.embedding_optimizer, opt.effective_embedding_lr("dcn")) == (
        1e-3,
        "adagrad",
        ADAGRAD_EMBEDDING_LR,
    )
    assert (opt.wide, opt.wide_prior_variance, opt.wide_moderate) == ("off", 1.0, True)
    assert OptimizerConfig.per_event().wide == "bayes"
    learner = build_learner("deepfm", SPEC, "ce", 0.0, seed=0, hidden_units=(8,))
    assert learner.wide is None
    dense, emb = learner.optimizers["dense"], learner.optimizers["embedding"]
    assert isinstance(dense, torch.optim.Adam) and isinstance(emb, torch.optim.Adagrad)
    assert [g["lr"] for g in dense.param_groups] == [4e-3] and emb.param_groups[0]["lr"] == 0.03
    tables = {id(m.weight) for m in learner.model.modules() if isinstance(m, torch.nn.Embedding)}
    assert {id(p) for p in emb.param_groups[0]["params"]} == tables  # the FM's and the linear part's
    dense_ids = {id(p) for g in dense.param_groups for p in g["params"]}
    assert not dense_ids & tables
    assert dense_ids | tables == {id(p) for p in learner.model.parameters()}
    per_event = build_learner(
        "deepfm", SPEC, "ce", 0.0, optimizer=OptimizerConfig.per_event(), hidden_units=(8,)
    )
    assert per_event.wide is not None and per_event.wide.prior_variance == 1.0
    # The previous defaults (for comparisons) and explicit settings.
    old = build_learner(
        "deepfm", SPEC, "ce", 0.0, optimizer=OptimizerConfig.previous_defaults(), hidden_units=(8,)
    )
    assert isinstance(old.optimizers["embedding"], torch.optim.SparseAdam) and old.wide is None
    assert old.optimizers["embedding"].param_groups[0]["lr"] == 1e-3
    custom = build_learner("fm", SPEC, "ce", 0.0, optimizer={"embedding_lr": 0.1})
    assert custom.optimizers["embedding"].param_groups[0]["lr"] == 0.1 and custom.wide is None
    with pytest.raises(ValueError, match="wide"):
        build_learner("fm", SPEC, "ce", 0.0, optimizer={"wide": "ftrl"})


def _round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_wide_state_round_trips_and_frozen_copies_predict_alike():
    batch, y, _ = _data(96)
    learner = build_learner("dcn", SPEC, "reloop", 0.5, seed=1, hidden_units=(8,), optimizer=WIDE)
    for k in range(3):
        learner.learn(batch.take(slice(32 * k, 32 * k + 32)), y[32 * k : 32 * k + 32])
    state = _round_trip(learner.state_dict())
    assert state["wide"]["mean"].dtype == torch.float64
    restored = learner_from_state(state)
    np.testing.assert_array_equal(restored.predict_proba(batch), learner.predict_proba(batch))
    np.testing.assert_array_equal(restored.wide.var, learner.wide.var)
    frozen = learner.clone_frozen()
    np.testing.assert_array_equal(frozen.predict_proba(batch), learner.predict_proba(batch))
    learner.learn(batch, y)
    assert not np.array_equal(frozen.predict_proba(batch), learner.predict_proba(batch))
    # A state with a wide part cannot go into a learner without one; an older state without it starts
    # the wide part from its prior.
    off = build_learner("dcn", SPEC, "reloop", 0.5, seed=1, hidden_units=(8,))
    with pytest.raises(ValueError, match="wide part"):
        off.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "wide"}
    restored.load_state_dict(older)
    assert np.all(restored.wide.mean == 0) and np.all(restored.wide.var == 1.0)


@pytest.mark.parametrize("name", ["dcn", "deepfm", "fm", "lr", "afn"])
def test_learn_scored_trains_like_learn_and_scores_before_each_event(name):
    batch, y, _ = _data(64)
    size = {"hidden_units": (8,)} if name in ("dcn", "deepfm") else {}
    a = build_learner(name, SPEC, "kd", 0.3, seed=4, optimizer=WIDE, **size)
    b = build_learner(name, SPEC, "kd", 0.3, seed=4, optimizer=WIDE, **size)
    y_last = np.full(64, 0.4)
    before = a.predict_proba(batch)
    scores, stats = a.learn_scored(batch, y, y_last)
    b.learn(batch, y, y_last)
    assert stats.n == 64
    # The first sample is scored by the model as it was; later ones after learning the earlier ones.
    assert scores[0] == pytest.approx(before[0], rel=1e-6)
    assert not np.allclose(scores[1:], before[1:])
    np.testing.assert_array_equal(a.predict_proba(batch), b.predict_proba(batch))
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("scored", [False, True])
def test_with_batch_norm_the_wide_part_learns_against_the_logits_it_scores_with(monkeypatch, scored):
    # AFN+'s batch norm makes its training forward's logits differ from the eval-mode ones it is scored
    # and served with; a wide part fitted to the former was miscalibrated by the difference (MovieLens's
    # selection weeks: LogLoss 2.78 against 0.59).
    learner = build_learner("afn", SPEC, "ce", 0.0, seed=0, optimizer=WIDE)
    assert not learner._train_forward_is_eval_forward()
    for k in range(3):  # batch norm's running statistics move away from their start
        learner.learn(*_data(64, seed=k)[:2])
    batch, y, _ = _data(64, seed=9)
    eval_logits = learner.logits_tensors(batch.to_torch(learner.device)).double().numpy()
    twin = copy.deepcopy(learner.model).train()  # a training forward moves the running statistics
    with torch.no_grad():
        train_logits = twin(batch.to_torch(learner.device))["logit"].double().numpy()
    assert not np.allclose(train_logits, eval_logits, atol=1e-3)  # else this test could not fail
    seen = []
    real = OnlineWide.learn

    def spy(self, batch, deep, labels, loss, y_last=None, weights=None, score_deep=None):
        seen.append((np.array(deep), None if score_deep is None else np.array(score_deep)))
        return real(self, batch, deep, labels, loss, y_last, weights, score_deep=score_deep)

    monkeypatch.setattr(OnlineWide, "learn", spy)
    if scored:
        scores, _ = learner.learn_scored(batch, y)
        assert scores.shape == (64,) and np.isfinite(scores).all()
    else:
        learner.learn(batch, y)
    ((deep, score_deep),) = seen
    np.testing.assert_allclose(deep, eval_logits, rtol=1e-6)
    np.testing.assert_allclose(score_deep, eval_logits, rtol=1e-6)


def test_without_the_wide_part_learn_scored_is_predict_then_learn():
    batch, y, _ = _data(64)
    a = build_learner("dcn", SPEC, "ce", 0.0, seed=4, hidden_units=(8,))
    before = a.predict_proba(batch)
    scores, _ = a.learn_scored(batch, y)
    np.testing.assert_allclose(scores, before, rtol=1e-6)


def test_replayed_samples_train_the_backbone_only():
    batch, y, _ = _data(64)
    a = build_learner("dcn", SPEC, "ce", 0.0, seed=4, hidden_units=(8,), optimizer=WIDE)
    a.learn(batch, y)
    mean, var = a.wide.mean.copy(), a.wide.var.copy()
    table = a.model.embedding.table.weight.detach().clone()
    a.learn_replay(batch, y)
    np.testing.assert_array_equal(a.wide.mean, mean)
    np.testing.assert_array_equal(a.wide.var, var)
    assert not torch.equal(a.model.embedding.table.weight.detach(), table)


def test_a_backbone_logit_that_is_not_finite_does_not_reach_the_wide_part():
    # 1e30 under an identity transform: the backbone's logit for that row is NaN. The step leaves the
    # row out before the wide part learns (engine/models/learner.py), and the wide part itself skips
    # any row whose backbone logit is not finite (learn_replay and learn_tensors do not leave it out).
    spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=30), NumericField(name="x")))
    rows = [{"u": f"u{k % 9}", "x": 0.5} for k in range(32)]
    featurizer = Featurizer(spec)
    good = featurizer.transform(rows)
    bad = featurizer.transform([*rows[:3], {"u": "u1", "x": 1e30}, *rows[4:]])
    learner = build_learner("dcn", spec, "ce", 0.0, seed=0, optimizer=OptimizerConfig.per_event())
    labels = (np.arange(32) % 2).astype(np.float32)
    learner.learn(good, labels)
    wide_before = learner.wide.state_dict()
    learner.learn(bad, labels)
    assert (learner.skipped_steps, learner.skipped_samples) == (0, 1)
    assert np.isfinite(learner.predict_proba(good)).all()
    wide = learner.wide.state_dict()
    assert np.isfinite(wide["mean"].numpy()).all() and np.isfinite(wide["var"].numpy()).all()
    assert not torch.equal(wide["mean"], wide_before["mean"])  # the other rows were learnt per event


def test_an_infinite_sample_weight_does_not_reach_the_wide_part():
    # Its update would be inf * 0: one NaN belief, then every later logit of that row's ids NaN, and
    # every later step of the backbone skipped for a gradient that is not finite.
    spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=30),))
    good = Featurizer(spec).transform([{"u": f"u{k % 9}"} for k in range(32)])
    learner = build_learner("dcn", spec, "ce", 0.0, seed=0, optimizer=OptimizerConfig.per_event())
    labels = (np.arange(32) % 2).astype(np.float32)
    weights = np.ones(32, dtype=np.float32)
    weights[3] = np.inf
    learner.wide.learn(good, np.zeros(32), labels, learner.loss, weights=weights)
    assert np.isfinite(learner.wide.mean).all() and np.isfinite(learner.wide.var).all()
    learner.learn(good, labels)
    assert learner.skipped_steps == 0 and np.isfinite(learner.predict_proba(good)).all()
