"""The offline AUC and LogLoss: whole arrays at once (evaluation sets, backtest periods, bench results).

The one definition of each for every offline caller; the streaming structures (online.py, rolling_batch.py)
keep their own incremental state but clip with the same ``EPS``.

>>> auc([0, 1, 0, 1], [0.1, 0.4, 0.4, 0.9])   # 3 pairs ordered, 1 tied (counted 1/2), of 4
0.875
>>> round(logloss([1, 0], [0.5, 0.5]), 6)
0.693147
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

#: Predictions are clipped to [EPS, 1 - EPS] so that a confident miss costs log(1/EPS) ~ 34.5, not inf.
EPS = 1e-15


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Exact ROC AUC (Mann-Whitney: the fraction of (positive, negative) pairs ordered right, a tie
    counted 1/2); NaN when a class is absent or a score is NaN. A label > 0.5 is a positive."""
    y = np.asarray(labels).reshape(-1) > 0.5
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.size != s.size:
        raise ValueError(f"auc: {y.size} labels, {s.size} scores")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    # A NaN score (a row the learner could not score) would sort last and count as the highest: a
    # finite, order-dependent AUC. NaN, as LogLoss gives, tells the caller instead.
    if n_pos == 0 or n_neg == 0 or np.isnan(s).any():
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Each run of equal scores gets the average of its 1-based ranks (that is what counts a tie 1/2).
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean binary cross-entropy of probabilities clipped to [EPS, 1 - EPS]; NaN for no samples."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), EPS, 1.0 - EPS)
    if y.size != p.size:
        raise ValueError(f"logloss: {y.size} labels, {p.size} predictions")
    if y.size == 0:
        return math.nan
    return float(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)).mean())
