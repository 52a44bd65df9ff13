"""The gradient river receives (the loss's scalar path) equals torch autograd of the engine's CE / KD /
ReLoop loss; the loss values that river and the numpy learners report are the engine loss's own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reloop.engine.loss import make_loss
from reloop.engine.models.river_learners import ScoreGradientLoss, loss_stats
from river import linear_model, optim


def score_gradient(strategy: str, alpha: float, y: float, z: float, y_last: float) -> float:
    """What river gets from ``ScoreGradientLoss.gradient`` for one sample."""
    loss = ScoreGradientLoss(strategy, alpha)
    loss.y_last = y_last
    return loss.gradient(y_true=bool(y), y_pred=z)


def _autograd_per_sample(strategy: str, alpha: float, z: np.ndarray, y: np.ndarray, y_last: np.ndarray):
    """d(sum_i L_i)/d z_i via torch autograd = per-sample d L_i / d z_i (the loss is a batch mean)."""
    logits = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    loss, _ = make_loss(strategy, alpha)(logits, torch.tensor(y), y_last=torch.tensor(y_last))
    (loss * len(z)).backward()
    return logits.grad.numpy()


@pytest.mark.parametrize("strategy", ["ce", "kd", "reloop"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_river_gradient_matches_torch_autograd(strategy: str, alpha: float) -> None:
    rng = np.random.default_rng(7)
    n = 400
    z = rng.normal(0.0, 3.0, n)
    y = rng.integers(0, 2, n).astype(np.float64)
    y_last = rng.uniform(0.0, 1.0, n)
    y_last[::17] = np.nan  # unknown last prediction -> plain CE for that sample
    expected = _autograd_per_sample(strategy, alpha, z, y, y_last)

    river_loss = ScoreGradientLoss(strategy, alpha)
    got = np.empty(n)
    for i in range(n):
        river_loss.y_last = y_last[i]
        got[i] = river_loss.gradient(y_true=bool(y[i]), y_pred=z[i])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    # and the engine's vectorised gradient agrees with the scalar one
    vectorised = make_loss(strategy, alpha).raw_gradient(z, y, y_last)
    np.testing.assert_allclose(vectorised, got, rtol=1e-9, atol=1e-12)


def test_reloop_gradient_is_zero_where_the_new_model_already_wins() -> None:
    # y = 1, p = sigmoid(2) ~ 0.88 > y_last = 0.5: L_sc inactive, only (1 - alpha) * CE pushes.
    alpha = 0.6
    g = score_gradient("reloop", alpha, 1.0, 2.0, 0.5)
    p = 1.0 / (1.0 + math.exp(-2.0))
    assert g == pytest.approx((1 - alpha) * (p - 1.0))
    # y = 1, p ~ 0.12 < y_last = 0.5: L_sc active, adds -alpha * p (1 - p)
    g2 = score_gradient("reloop", alpha, 1.0, -2.0, 0.5)
    p2 = 1.0 - p
    assert g2 == pytest.approx(alpha * -p2 * (1 - p2) + (1 - alpha) * (p2 - 1.0))


def test_river_model_update_uses_the_per_sample_y_last() -> None:
    """The y_last set before learn_one changes river's step by exactly the ReLoop gradient."""
    steps = {}
    for y_last in (0.9, 0.1):
        loss = ScoreGradientLoss("reloop", 0.5)
        model = linear_model.LogisticRegression(optimizer=optim.SGD(0.1), loss=loss, intercept_lr=0.1)
        loss.y_last = y_last
        model.learn_one({1: 1.0}, True)
        steps[y_last] = model.weights[1]
    # From zero weights p = 0.5: with y_last 0.9 the new model is worse (active), with 0.1 it is not.
    assert steps[0.9] == pytest.approx(-0.1 * score_gradient("reloop", 0.5, 1.0, 0.0, 0.9))
    assert steps[0.1] == pytest.approx(-0.1 * score_gradient("reloop", 0.5, 1.0, 0.0, 0.1))
    assert steps[0.9] > steps[0.1] > 0


def test_unknown_strategy_and_bad_alpha_fail_fast() -> None:
    with pytest.raises(ValueError, match="strategy"):
        ScoreGradientLoss("focal", 0.5)
    with pytest.raises(ValueError, match="alpha"):
        ScoreGradientLoss("reloop", 1.5)


def test_river_loss_value_matches_engine_loss() -> None:
    loss = ScoreGradientLoss("kd", 0.4)
    loss.y_last = 0.3
    expected, _ = make_loss("kd", 0.4)(torch.tensor([0.7]), torch.tensor([1.0]), y_last=torch.tensor([0.3]))
    assert loss(True, 0.7) == pytest.approx(float(expected))


@pytest.mark.parametrize("strategy", ["ce", "kd", "reloop"])
@pytest.mark.parametrize("with_last", [True, False])
def test_numpy_loss_stats_equal_the_engine_loss_stats(strategy: str, with_last: bool) -> None:
    rng = np.random.default_rng(11)
    n = 300
    z = rng.normal(0.0, 4.0, n)
    y = rng.integers(0, 2, n).astype(np.float64)
    y_last = rng.uniform(-0.1, 1.1, n)  # out-of-range values are clamped by both
    y_last[::13] = np.nan
    w = rng.uniform(0.5, 2.0, n)
    loss = make_loss(strategy, 0.4)
    _, expected = loss(torch.tensor(z), torch.tensor(y), y_last=torch.tensor(y_last) if with_last else None,
                       weights=torch.tensor(w))
    got = loss_stats(loss, z, y, y_last if with_last else None, w)
    for field in ("total", "ce", "aux", "sc_active_fraction"):
        assert getattr(got, field) == pytest.approx(getattr(expected, field), rel=1e-10, abs=1e-12), field
    assert (got.n, got.n_with_last, got.strategy, got.alpha) == (
        expected.n, expected.n_with_last, expected.strategy, expected.alpha)
