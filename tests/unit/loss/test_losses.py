"""CE, KD and ReLoop against hand-computed values and gradients (docs/method.md)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from reloop.engine.loss import STRATEGIES, VARIANTS, LossStats, make_loss

LN2 = math.log(2.0)


def _run(strategy, alpha, z, y, y_last=None, w=None):
    logits = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    loss, stats = make_loss(strategy, alpha)(
        logits,
        torch.tensor(y, dtype=torch.float64),
        None if y_last is None else torch.tensor(y_last, dtype=torch.float64),
        None if w is None else torch.tensor(w, dtype=torch.float64),
    )
    loss.backward()
    return float(loss.detach()), logits.grad.numpy(), stats


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_ce_matches_the_log_loss_formula_and_its_gradient():
    z, y = [0.3, -1.2, 2.0], [1.0, 0.0, 0.0]
    value, grad, stats = _run("ce", 0.0, z, y)
    p = [_sig(v) for v in z]
    expected = -np.mean(
        [yi * math.log(pi) + (1 - yi) * math.log(1 - pi) for yi, pi in zip(y, p, strict=True)]
    )
    assert value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, (np.array(p) - np.array(y)) / 3, rtol=1e-12)
    assert stats.ce == pytest.approx(expected) and stats.aux == 0.0 and stats.sc_active_fraction == 0.0


def test_reloop_when_new_prediction_equals_last_has_no_sc_term_and_no_sc_gradient():
    # p = sigmoid(0) = 0.5 = y_last: the new model is exactly as good as the last one.
    value, grad, stats = _run("reloop", 0.4, [0.0, 0.0], [1.0, 0.0], [0.5, 0.5])
    assert stats.sc == 0.0 and stats.sc_active_fraction == 0.0
    assert value == pytest.approx(0.6 * LN2)
    np.testing.assert_allclose(grad, 0.6 * np.array([-0.5, 0.5]) / 2)


def test_reloop_hand_computed_positive_and_negative_sample():
    # positive, p = 0.5 < y_last = 0.8: SC = 0.3; negative, p = 0.5 > y_last = 0.1: SC = 0.4.
    alpha = 0.25
    value, grad, stats = _run("reloop", alpha, [0.0, 0.0], [1.0, 0.0], [0.8, 0.1])
    sc = (0.3 + 0.4) / 2
    assert stats.sc == pytest.approx(sc)
    assert value == pytest.approx(alpha * sc + (1 - alpha) * LN2)
    assert stats.sc_active_fraction == 1.0
    # d SC / d z = -/+ p(1-p) = -/+ 0.25 ; d CE / d z = p - y.
    expected = np.array([alpha * -0.25 + (1 - alpha) * -0.5, alpha * 0.25 + (1 - alpha) * 0.5]) / 2
    np.testing.assert_allclose(grad, expected)


def test_reloop_is_inactive_where_the_new_model_is_already_better():
    # positive with p = 0.5 > y_last = 0.2 and negative with p = 0.5 < y_last = 0.9: both better.
    value, grad, stats = _run("reloop", 0.5, [0.0, 0.0], [1.0, 0.0], [0.2, 0.9])
    assert stats.sc == 0.0 and stats.sc_active_fraction == 0.0
    assert value == pytest.approx(0.5 * LN2)
    np.testing.assert_allclose(grad, 0.5 * np.array([-0.5, 0.5]) / 2)


def test_saturated_predictions_stay_finite_and_sc_gradient_vanishes():
    # confidently wrong: z = +60 on a negative, z = -60 on a positive.
    value, grad, stats = _run("reloop", 1.0, [60.0, -60.0], [0.0, 1.0], [0.3, 0.6])
    assert math.isfinite(value) and np.all(np.isfinite(grad))
    assert stats.sc == pytest.approx((0.7 + 0.6) / 2, abs=1e-12)  # probability-space penalty is bounded
    np.testing.assert_allclose(grad, 0.0, atol=1e-20)  # sigmoid'(60) ~ 1e-26: SC alone cannot pull it back
    value_ce, grad_ce, stats_ce = _run("reloop", 0.0, [60.0, -60.0], [0.0, 1.0], [0.3, 0.6])
    assert value_ce == pytest.approx(60.0, rel=1e-6)  # CE from logits: no log(0)
    np.testing.assert_allclose(grad_ce, [0.5, -0.5], rtol=1e-12)


@pytest.mark.parametrize("strategy", ["kd", "reloop"])
def test_alpha_zero_is_exactly_ce(strategy):
    rng = np.random.default_rng(0)
    z, y, yl = rng.normal(size=8), rng.integers(0, 2, 8).astype(float), rng.random(8)
    v1, g1, _ = _run(strategy, 0.0, z, y, yl)
    v2, g2, _ = _run("ce", 0.0, z, y)
    assert v1 == v2
    np.testing.assert_array_equal(g1, g2)


def test_alpha_one_reloop_is_pure_sc():
    value, grad, stats = _run("reloop", 1.0, [math.log(3.0)], [0.0], [0.5])  # p = 0.75
    assert value == pytest.approx(0.25)
    np.testing.assert_allclose(grad, [0.75 * 0.25])
    assert stats.ce == pytest.approx(-math.log(0.25))


def test_kd_hand_computed():
    # z = 0: p = 0.5; KD = -0.8 log 0.5 - 0.2 log 0.5 = ln 2; d KD / dz = p - y_last = -0.3.
    value, grad, stats = _run("kd", 0.5, [0.0], [0.0], [0.8])
    assert stats.kd == pytest.approx(LN2) and stats.sc == 0.0
    assert value == pytest.approx(LN2)
    np.testing.assert_allclose(grad, [0.5 * -0.3 + 0.5 * 0.5])


def test_weights_scale_each_sample_and_the_batch_mean_divides_by_n():
    value, grad, stats = _run("reloop", 0.5, [0.0, 0.0], [1.0, 0.0], [0.8, 0.1], w=[2.0, 0.0])
    per_sample_0 = 0.5 * 0.3 + 0.5 * LN2
    assert value == pytest.approx(2.0 * per_sample_0 / 2)
    assert grad[1] == 0.0
    assert stats.total == pytest.approx(value)


def test_unknown_y_last_trains_that_sample_with_full_ce():
    value, grad, stats = _run("reloop", 0.7, [0.0, 0.0], [1.0, 1.0], [float("nan"), 0.9])
    assert stats.n_with_last == 1
    assert value == pytest.approx((LN2 + 0.7 * 0.4 + 0.3 * LN2) / 2)
    assert grad[0] == pytest.approx(-0.5 / 2)
    none_value, _, none_stats = _run("reloop", 0.7, [0.0], [1.0], None)
    assert none_value == pytest.approx(LN2) and none_stats.n_with_last == 0


def test_y_last_outside_unit_interval_is_clamped():
    v_clamped, _, _ = _run("reloop", 1.0, [0.0], [1.0], [1.7])
    assert v_clamped == pytest.approx(0.5)


def test_sc_active_fraction_counts_worse_samples_among_those_with_y_last():
    _, _, stats = _run("reloop", 0.5, [0.0] * 4, [1.0, 1.0, 0.0, 0.0], [0.9, 0.1, 0.9, float("nan")])
    assert stats.sc_active_fraction == pytest.approx(1 / 3)
    assert isinstance(stats, LossStats) and stats.to_dict()["n"] == 4


@pytest.mark.parametrize("strategy", [*STRATEGIES, *VARIANTS])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_numpy_raw_gradient_matches_autograd(strategy, alpha):
    rng = np.random.default_rng(1)
    n = 64
    z = rng.normal(scale=3.0, size=n)
    y = rng.integers(0, 2, n).astype(float)
    yl = rng.random(n)
    yl[::7] = np.nan
    w = rng.random(n) * 2
    _, grad, _ = _run(strategy, alpha, z, y, yl, w)
    raw = make_loss(strategy, alpha).raw_gradient(z, y, yl, w)
    np.testing.assert_allclose(raw, grad * n, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", [*STRATEGIES, *VARIANTS])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_scalar_event_gradient_is_autograd_of_the_one_definition(strategy, alpha):
    """The per-event path (river, the per-event wide part) is the only hand-written derivative: it must
    equal autograd of the torch loss on each sample alone (a batch of one)."""
    rng = np.random.default_rng(5)
    loss = make_loss(strategy, alpha)
    for _ in range(200):
        z, y = float(rng.normal(scale=3.0)), float(rng.integers(0, 2))
        yl = float(rng.choice([math.nan, rng.uniform(-0.2, 1.2)], p=[0.1, 0.9]))  # unknown, out of [0, 1]
        _, grad, _ = _run(strategy, alpha, [z], [y], [yl])
        assert loss.event_gradient(_sig(z), y, yl) == pytest.approx(grad[0], rel=1e-9, abs=1e-12)


def test_logit_variant_is_a_margin_in_logit_space_with_unit_gradient():
    # z = 0 on a positive whose last prediction was 0.8: margin logit(0.8) - 0 = ln 4.
    value, grad, stats = _run("reloop_logit", 1.0, [0.0, 60.0], [1.0, 0.0], [0.8, 0.5])
    assert stats.sc == pytest.approx((math.log(4.0) + 60.0) / 2)
    np.testing.assert_allclose(grad, [-1 / 2, 1 / 2])  # does not vanish at z = 60, unlike probability SC
    assert stats.sc_active_fraction == 1.0


def test_normalised_variant_averages_sc_over_active_samples_only():
    # 4 samples with y_last, only the first is worse than the last model (SC = 0.3).
    z, y, yl = [0.0] * 4, [1.0, 1.0, 0.0, 0.0], [0.8, 0.2, 0.9, 0.7]
    _, grad, stats = _run("reloop_norm", 1.0, z, y, yl)
    _, grad_plain, plain = _run("reloop", 1.0, z, y, yl)
    assert plain.sc == pytest.approx(0.3 / 4) and stats.sc == pytest.approx(0.3)
    np.testing.assert_allclose(grad, grad_plain * 4)
    # Samples without y_last do not count as inactive ones.
    _, _, with_nan = _run("reloop_norm", 1.0, z + [0.0], y + [1.0], yl + [float("nan")])
    assert with_nan.sc == pytest.approx(0.3 * 4 / 5)


def test_bad_strategy_and_alpha_fail_naming_them():
    with pytest.raises(ValueError, match="unknown loss strategy 'focal'"):
        make_loss("focal", 0.1)
    with pytest.raises(ValueError, match="alpha"):
        make_loss("reloop", 1.5)
    with pytest.raises(ValueError, match="empty"):
        make_loss("ce")(torch.zeros(0), torch.zeros(0))


def test_one_sided_kl_pulls_only_where_the_new_model_is_worse_with_kd_gradient():
    # z = 0 (p = 0.5). Positive, y_last 0.8: worse; negative, y_last 0.1: worse; positive, y_last 0.2: not.
    alpha = 0.5
    value, grad, stats = _run("reloop_kl", alpha, [0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.8, 0.1, 0.2])
    kl_pos = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    kl_neg = 0.1 * math.log(0.1 / 0.5) + 0.9 * math.log(0.9 / 0.5)
    assert stats.sc == pytest.approx((kl_pos + kl_neg) / 3)
    assert value == pytest.approx(alpha * (kl_pos + kl_neg) / 3 + (1 - alpha) * LN2)
    assert stats.sc_active_fraction == pytest.approx(2 / 3)
    # d KL / d z = p - y_last where active (-0.3, +0.4); CE's p - y = -0.5, +0.5, -0.5.
    expected = [alpha * -0.3 + (1 - alpha) * -0.5, alpha * 0.4 + (1 - alpha) * 0.5, (1 - alpha) * -0.5]
    np.testing.assert_allclose(grad, np.array(expected) / 3, rtol=1e-12)
    # It does not vanish when the prediction saturates: z = -30 on a positive whose last prediction was 0.9.
    _, saturated, _ = _run("reloop_kl", 1.0, [-30.0], [1.0], [0.9])
    _, plain, _ = _run("reloop", 1.0, [-30.0], [1.0], [0.9])
    assert saturated[0] == pytest.approx(-0.9, rel=1e-6) and abs(plain[0]) < 1e-12


def test_sc_plus_kd_is_the_mean_of_both_terms():
    alpha = 0.4
    value, grad, stats = _run("reloop_kd", alpha, [0.0, 0.0], [1.0, 1.0], [0.8, 0.2])
    sc = [0.3, 0.0]
    kd = [LN2, LN2]  # soft-target log loss of p = 0.5 is ln 2 for any target
    aux = [(s + k) / 2 for s, k in zip(sc, kd, strict=True)]
    assert stats.sc == pytest.approx(sum(aux) / 2)
    assert value == pytest.approx(alpha * sum(aux) / 2 + (1 - alpha) * LN2)
    assert stats.sc_active_fraction == pytest.approx(1 / 2)  # where L_sc > 0, not where KD is
    # d/dz: SC -p(1-p) = -0.25 where active; KD p - y_last = -0.3, +0.3; CE -0.5.
    expected = [alpha * (-0.25 - 0.3) / 2 - (1 - alpha) * 0.5, alpha * 0.3 / 2 - (1 - alpha) * 0.5]
    np.testing.assert_allclose(grad, np.array(expected) / 2, rtol=1e-12)


def test_gated_reloop_is_reloop_where_the_last_model_predicts_the_batch_better_and_ce_elsewhere():
    # Last model better on the batch (0.8 for a positive, 0.2 for a negative against p = 0.5): ReLoop.
    z, y = [0.0, 0.0], [1.0, 0.0]
    gated = _run("reloop_gated", 0.5, z, y, [0.8, 0.2])
    plain = _run("reloop", 0.5, z, y, [0.8, 0.2])
    assert gated[0] == pytest.approx(plain[0]) and gated[2].sc == pytest.approx(plain[2].sc)
    np.testing.assert_allclose(gated[1], plain[1], rtol=1e-12)
    # Last model worse on the batch overall (log loss -ln 0.6 - ln 0.3 > 2 ln 2), though better on the
    # first sample: plain CE at full weight, no SC gradient.
    value, grad, _ = _run("reloop_gated", 0.5, z, y, [0.6, 0.7])
    ce_value, ce_grad, _ = _run("ce", 0.0, z, y)
    assert value == pytest.approx(ce_value)
    np.testing.assert_allclose(grad, ce_grad, rtol=1e-12)


@pytest.mark.parametrize("strategy", ["kd", "reloop"])
@pytest.mark.parametrize("which", ["y_last", "weights"])
def test_a_y_last_or_weight_that_is_not_one_per_sample_is_refused_not_broadcast(strategy, which):
    # One value for a batch of four broadcast over the batch: as y_last it also counted as one sample
    # with a y_last, and sc_active_fraction came out above 1.
    loss = make_loss(strategy, 0.5)
    z, y = torch.zeros(4, dtype=torch.float64), torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    one = torch.tensor([0.9], dtype=torch.float64)
    kwargs = {which: one}
    with pytest.raises(ValueError, match=f"{which} has 1 values for a batch of 4"):
        loss(z, y, **kwargs)
    with pytest.raises(ValueError, match=f"{which} has 1 values for a batch of 4"):
        loss.raw_gradient(z.numpy(), y.numpy(), **{which: one.numpy()})
    # One per sample is what it takes: the same values spelled out are accepted.
    loss(z, y, **{which: one.expand(4)})


@pytest.mark.parametrize("strategy", STRATEGIES + VARIANTS)
def test_a_served_prediction_of_exactly_0_or_1_keeps_every_path_finite(strategy):
    """y_last is logged as served: 0 or 1 exactly where serving saturated. No path takes log(y_last)
    (KD's soft-target term is BCE with logits; the gate's log loss of y_last is clamped by torch)."""
    loss = make_loss(strategy, 0.5)
    z = torch.tensor([-1e4, -50.0, -20.0, 0.0, 20.0, 50.0, 1e4])
    for y_last, label in itertools.product([0.0, 1.0], [0.0, 1.0]):
        logits = z.clone().requires_grad_()
        value, stats = loss(logits, torch.full_like(z, label), torch.full_like(z, y_last))
        value.backward()
        raw = loss.raw_gradient(z.double().numpy(), np.full(7, label), np.full(7, y_last))
        events = [loss.event_gradient(p, label, y_last) for p in (0.0, 0.5, 1.0)]
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
        assert np.isfinite(raw).all() and np.isfinite(events).all()
        assert np.isfinite([stats.total, stats.ce, stats.aux]).all()
