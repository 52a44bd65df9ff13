"""The one offline AUC and LogLoss against definitions written out pair by pair and sample by sample."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from reloop.engine.metrics.offline import EPS, auc, logloss
from reloop.engine.metrics.online import ExactAUC


def _pairwise_auc(y: list[int], s: list[float]) -> float:
    """Every (positive, negative) pair: 1 when the positive scores higher, 1/2 on a tie."""
    pos = [v for v, t in zip(s, y, strict=True) if t]
    neg = [v for v, t in zip(s, y, strict=True) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def _per_sample_logloss(y: list[int], p: list[float]) -> float:
    clipped = [min(max(q, EPS), 1.0 - EPS) for q in p]
    return -sum(math.log(q) if t else math.log(1.0 - q) for t, q in zip(y, clipped, strict=True)) / len(y)


@pytest.mark.parametrize("seed", range(20))
def test_auc_is_the_pairwise_count_with_ties_one_half(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes
    s = np.round(rng.random(n) + 0.3 * y, int(rng.integers(0, 3)))  # 0-2 decimals: from all tied to few ties
    assert auc(y, s) == pytest.approx(_pairwise_auc(y.tolist(), s.tolist()), abs=1e-12)
    assert auc(y, s) == pytest.approx(ExactAUC.from_samples(y, s).get(), abs=1e-12)  # the streaming one


def test_auc_edge_cases() -> None:
    assert auc([0, 1], [0.3, 0.3]) == 0.5
    assert auc([0, 1], [0.2, 0.9]) == 1.0 and auc([1, 0], [0.2, 0.9]) == 0.0
    assert auc(np.array([[0], [1]]), np.array([[0.1], [0.2]])) == 1.0  # column vectors
    assert auc([0.0, 1.0], np.array([0.1, 0.2], dtype=np.float32)) == 1.0
    assert math.isnan(auc(np.ones(5), np.arange(5))) and math.isnan(auc(np.zeros(3), np.arange(3)))
    with pytest.raises(ValueError, match="3 labels, 2 scores"):
        auc([0, 1, 0], [0.1, 0.2])


def test_auc_of_a_nan_score_is_nan_not_a_ranking() -> None:
    # A learner scores a row it cannot score NaN (engine/models/finite.py); argsort put it last, so
    # the AUC counted it as the highest score (0.75 here) and LogLoss alone said NaN.
    assert math.isnan(auc([0, 1, 0, 1], [math.nan] * 4))
    assert math.isnan(auc([0, 1, 0, 1], [0.1, math.nan, 0.2, 0.3]))
    assert auc([0, 1], [0.2, math.inf]) == 1.0  # infinite scores still rank


@pytest.mark.parametrize("seed", range(5))
def test_logloss_is_the_per_sample_mean(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 30)
    p = rng.random(30)
    p[:3] = (0.0, 1.0, 1e-20)  # clipped, never log(0)
    assert logloss(y, p) == pytest.approx(_per_sample_logloss(y.tolist(), p.tolist()), rel=1e-12)


def test_logloss_clipping_and_edge_cases() -> None:
    assert logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert logloss([1], [0.0]) == pytest.approx(-math.log(EPS))  # a confident miss costs log(1/EPS)
    assert logloss([0], [1.0]) == pytest.approx(-math.log(EPS), rel=1e-3)  # 1 - EPS rounds in float64
    assert math.isnan(logloss([], []))
    with pytest.raises(ValueError, match="2 labels, 1 predictions"):
        logloss([0, 1], [0.5])


def test_the_streaming_logloss_clips_with_the_same_eps() -> None:
    from reloop.engine.metrics import online, rolling_batch

    assert online._EPS is rolling_batch._EPS is EPS
