"""FNW (fake negative weighting): weights, loss values and gradients against hand-computed numbers, the
fixed point it restores, the joiner's emit-at-once policy and the config that pairs the two."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reloop.engine.join.joiner import Joiner, JoinerConfig
from reloop.engine.loss.delayed import FakeNegativeWeighted, fnw_weights, with_delayed_feedback
from reloop.engine.loss.losses import make_loss


def test_weights_hand_computed() -> None:
    p = np.array([0.5, 0.5, 0.2, 0.2])
    y = np.array([1.0, 0.0, 1.0, 0.0])
    # 1 + p for positives, (1 - p)(1 + p) for negatives
    assert fnw_weights(p, y) == pytest.approx([1.5, 0.75, 1.2, 0.96])


def test_ce_loss_and_gradient_hand_computed() -> None:
    loss = FakeNegativeWeighted(make_loss("ce"))
    z = torch.zeros(2, requires_grad=True)  # p = 0.5 for both
    total, stats = loss(z, torch.tensor([1.0, 0.0]))
    # (1.5 * ln 2 + 0.75 * ln 2) / 2
    assert float(total.detach()) == pytest.approx(1.125 * np.log(2), abs=1e-6)
    total.backward()
    # d/dz of w * CE with w held constant: w * (p - y) / n
    assert z.grad.tolist() == pytest.approx([1.5 * -0.5 / 2, 0.75 * 0.5 / 2])
    assert stats.strategy == "ce" and loss.alpha == 0.0


def test_wraps_reloop_and_multiplies_sample_weights() -> None:
    inner = make_loss("reloop", 0.5)
    loss = FakeNegativeWeighted(inner)
    z, y, yl = torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.75])
    total, _ = loss(z, y, yl, torch.tensor([2.0]))
    # ReLoop at p = 0.5, y_last 0.75: 0.5 * 0.25 + 0.5 * ln 2, times FNW 1.5, times 2
    assert float(total) == pytest.approx(3.0 * (0.125 + 0.5 * np.log(2)), abs=1e-6)
    g = loss.raw_gradient(np.array([0.0]), np.array([1.0]), np.array([0.75]), np.array([2.0]))
    # ReLoop's d/dz: 0.5 * -(0.25) + 0.5 * (0.5 - 1) = -0.375; times 1.5 * 2
    assert g == pytest.approx([-0.375 * 3.0])
    assert loss.event_gradient(0.5, 1.0, 0.75) == pytest.approx(-0.375 * 1.5)


def test_weighted_stream_is_unbiased_where_the_plain_one_is_not() -> None:
    # An FNW stream of impressions with click rate q: each one a negative, clicked ones once more positive.
    q = 0.3

    def expected_grad(loss, p: float) -> float:
        z = np.array([np.log(p / (1 - p))] * 2)
        g = loss.raw_gradient(z, np.array([0.0, 1.0]))
        return float(g[0] + q * g[1])

    assert expected_grad(FakeNegativeWeighted(make_loss("ce")), q) == pytest.approx(0.0, abs=1e-12)
    # unweighted, the zero is at q / (1 + q): the bias FNW removes
    assert expected_grad(make_loss("ce"), q / (1 + q)) == pytest.approx(0.0, abs=1e-12)
    assert expected_grad(make_loss("ce"), q) > 0


def test_policy_names() -> None:
    ce = make_loss("ce")
    assert with_delayed_feedback(ce, "none") is ce
    assert isinstance(with_delayed_feedback(ce, "fnw"), FakeNegativeWeighted)
    with pytest.raises(ValueError):
        with_delayed_feedback(ce, "esdfm")


def _fnw(**kw) -> Joiner:
    return Joiner(
        JoinerConfig(window_ms=100, allowed_lateness_ms=0, emit_policy="fnw", **kw), clock=lambda: 0
    )


def test_fnw_joiner_emits_negatives_at_once_and_each_click_as_one_positive() -> None:
    j = _fnw()
    out = j.on_impression("a", 1000, b"a")
    assert [(x.impression_id, x.label, x.is_correction) for x in out] == [("a", 0, False)]
    assert [(x.label, x.is_correction) for x in j.on_click("a", 1010)] == [(1, True)]
    assert j.on_click("a", 1020) == []  # a second click: still one positive
    assert j.on_impression("a", 1000, b"a") == []  # duplicate impression
    # a click that arrived before its impression: the negative, then its positive
    assert j.on_click("b", 1030) == []
    out = j.on_impression("b", 1025, b"b")
    assert [(x.label, x.is_correction) for x in out] == [(0, False), (1, True)]
    assert j.pending_count == 0


def test_fnw_needs_the_correct_policy() -> None:
    with pytest.raises(ValueError, match="late_click_policy"):
        JoinerConfig(emit_policy="fnw", late_click_policy="drop")


@pytest.mark.parametrize("backbone", ["river_lr", "river_fm"])
def test_fnw_reaches_the_gradients_of_the_river_learners(backbone: str) -> None:
    # build_trainer wraps learner.loss; river's models took their gradients from a loss of their own, so
    # FNW weights were silently left out (the predictions equal to plain CE's).
    from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer
    from reloop.engine.models.registry import build_learner

    spec = FeatureSpec(fields=tuple(CategoricalField(name=n, buckets=16) for n in ("u", "i")))
    rng = np.random.default_rng(0)
    rows = [{"u": f"u{rng.integers(8)}", "i": f"i{rng.integers(8)}"} for _ in range(200)]
    batch = Featurizer(spec).transform(rows)
    labels = (rng.random(200) < 0.3).astype(np.float32)
    plain = build_learner(backbone, spec, "ce", 0.0, seed=0)
    fnw = build_learner(backbone, spec, "ce", 0.0, seed=0)
    fnw.loss = with_delayed_feedback(fnw.loss, "fnw")
    # One event's gradient: the FNW weight times CE's, through the loss river calls.
    z, y = 0.4, 0.0
    p = 1.0 / (1.0 + np.exp(-z))
    expected = fnw_weights(np.array([p]), np.array([y]))[0] * (p - y)
    assert fnw.river_loss.gradient(y, z) == pytest.approx(expected)
    assert plain.river_loss.gradient(y, z) == pytest.approx(p - y)
    for s in range(0, 200, 50):
        plain.learn(batch.take(slice(s, s + 50)), labels[s : s + 50])
        fnw.learn(batch.take(slice(s, s + 50)), labels[s : s + 50])
    assert np.abs(plain.predict_proba(batch) - fnw.predict_proba(batch)).max() > 1e-3
