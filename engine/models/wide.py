"""A per-event Bayesian first-order ("wide") part that a torch learner adds to its backbone's logit.

Why: on a real time-ordered stream, users act in bursts (on MovieLens-100K, 81% of ratings have the
same user's previous rating within the last 8 events), so a model that learns in mini-batches scores a
whole burst before it has learned anything from it. A per-event logistic regression beats every
mini-batch deep model there (docs/backtest/ablation.md). This part brings per-event learning to every
backbone at the cost of a short Python loop per event, while the backbone keeps learning in batches.

What it is: one weight per embedding row (the same global rows the backbone's tables use) plus a bias,
with a diagonal Gaussian belief N(mean, var) per weight, updated after every event by assumed-density
filtering of the logistic likelihood (one Newton step at the current mean; the exact rank-one
Sherman-Morrison update of the posterior, keeping its diagonal), like adPredictor (Graepel et al. 2010)
with a logistic instead of a probit link. For an event with active rows ``x`` (value 1 for categorical
rows, the value or 1/len for dense and multi-valued rows), backbone logit ``d``, label ``y``:

* ``m = sum_c mean_c x_c``, ``v = sum_c var_c x_c^2``, ``z = d + m``, ``p = sigmoid(z)``;
* score before learning: ``sigmoid(z / sqrt(1 + pi v / 8))`` (the predictive probability, MacKay's
  approximation; ``moderate=False`` scores ``sigmoid(z)``);
* ``g`` = the loss's derivative at ``z`` (CE, KD or ReLoop; ``Loss.event_gradient``), ``h`` = its
  Gauss-Newton curvature (``Loss.event_curvature``: ``p (1 - p)`` for CE and KD; for ReLoop the CE part's
  ``(1 - alpha) p (1 - p)``, its one-sided term being linear), both times the sample weight;
  ``k = 1 / (1 + h v)``;
* ``mean_c -= var_c x_c g k``, ``var_c -= (var_c x_c)^2 h k``.

Each weight starts at mean 0 and variance ``prior_variance`` (the one setting; its step on a first
sighting is about ``prior_variance * g``). Unlike a fixed learning rate (Adagrad, FTRL's alpha), the
step of a row shrinks as its evidence grows, so rows whose residual is only noise (Frappe's users, whose
click rate is 1/3 by construction) settle instead of wandering. The backbone is trained jointly: its
loss sees ``d + m`` with ``m`` (after the batch's per-event updates) as a constant offset, so it learns
what the wide part does not explain.

State: ``mean`` and ``var`` (float64, ``total_rows + 1``: the last row is the bias), fixed size.
A value repeated inside one multi-valued field is applied twice (as two rows); hashing makes that rare.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from reloop.engine.features.featurizer import FeatureBatch
from reloop.engine.features.spec import FeatureSpec

_MODERATION = math.pi / 8.0


class OnlineWide:
    """Per-event Bayesian logistic regression over a spec's rows (see the module docstring)."""

    def __init__(self, spec: FeatureSpec, prior_variance: float = 1.0, moderate: bool = True) -> None:
        if not prior_variance > 0:
            raise ValueError(f"wide prior variance must be > 0, got {prior_variance}")
        self.spec = spec
        self.prior_variance = float(prior_variance)
        self.moderate = bool(moderate)
        self.size = spec.total_rows + 1
        self.bias_row = spec.total_rows
        self.mean = np.zeros(self.size, dtype=np.float64)
        self.var = np.full(self.size, self.prior_variance, dtype=np.float64)
        self._dense_rows = np.asarray(spec.dense_rows, dtype=np.int64)

    # ---------------------------------------------------------------- rows of a batch
    def _unit_rows(self, batch: FeatureBatch) -> np.ndarray:
        """[B, n_cat + 1]: the categorical rows (value 1) and the bias row."""
        b = len(batch)
        return np.concatenate([batch.cat, np.full((b, 1), self.bias_row, dtype=np.int64)], axis=1)

    def _weighted(self, batch: FeatureBatch) -> tuple[np.ndarray, np.ndarray] | None:
        """[B, K] rows and values of the dense and multi-valued fields (value 0 = absent), or None."""
        b = len(batch)
        rows, vals = [], []
        if len(self._dense_rows):
            rows.append(np.broadcast_to(self._dense_rows, (b, len(self._dense_rows))))
            vals.append(batch.num.astype(np.float64))
        if batch.multi.shape[1]:
            count = np.maximum(batch.multi_mask.sum(-1, keepdims=True), 1.0)
            rows.append(batch.multi.reshape(b, -1))
            vals.append((batch.multi_mask / count).reshape(b, -1).astype(np.float64))
        if not rows:
            return None
        return np.concatenate(rows, axis=1), np.concatenate(vals, axis=1)

    def moments(self, batch: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        """(m, v) per sample: the wide logit's mean and variance under the current belief."""
        unit = self._unit_rows(batch)
        m = self.mean[unit].sum(axis=1)
        v = self.var[unit].sum(axis=1)
        weighted = self._weighted(batch)
        if weighted is not None:
            rows, vals = weighted
            m = m + (self.mean[rows] * vals).sum(axis=1)
            v = v + (self.var[rows] * vals * vals).sum(axis=1)
        return m, v

    def score_logits(self, deep: np.ndarray, m: np.ndarray, v: np.ndarray) -> np.ndarray:
        z = np.asarray(deep, dtype=np.float64) + m
        return z / np.sqrt(1.0 + _MODERATION * v) if self.moderate else z

    def logits(self, batch: FeatureBatch, deep: np.ndarray) -> np.ndarray:
        """The scoring logits of backbone logits ``deep`` plus this part (no side effects)."""
        m, v = self.moments(batch)
        return self.score_logits(deep, m, v)

    # ---------------------------------------------------------------- learning
    def learn(
        self,
        batch: FeatureBatch,
        deep: np.ndarray,
        labels: np.ndarray,
        loss: Any,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        score_deep: np.ndarray | None = None,
    ) -> np.ndarray:
        """Score then learn each sample in order; returns each sample's scoring logit from BEFORE it was
        learned (after every earlier sample of the batch was). ``deep`` = the backbone's logits the
        update uses; ``score_deep`` (default ``deep``) = the ones the scores use (eval mode)."""
        b = len(batch)
        unit = self._unit_rows(batch)
        ku = unit.shape[1]
        unit_l = unit.reshape(-1).tolist()
        weighted = self._weighted(batch)
        if weighted is not None:
            rows, vals = weighted
            keep = vals != 0.0
            w_rows = rows[keep].tolist()
            w_vals = vals[keep].tolist()
            w_ends = [0, *np.cumsum(keep.sum(axis=1)).tolist()]
        d_l = np.asarray(deep, dtype=np.float64).reshape(-1).tolist()
        s_l = d_l if score_deep is None else np.asarray(score_deep, dtype=np.float64).reshape(-1).tolist()
        y_l = np.asarray(labels, dtype=np.float64).reshape(-1).tolist()
        yl_l = None if y_last is None else np.asarray(y_last, dtype=np.float64).reshape(-1).tolist()
        sw_l = None if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1).tolist()
        # CE's derivative inline (the hot path), unless the loss reweights each event itself (FNW).
        ce = not getattr(loss, "reweights_events", False) and (
            yl_l is None or getattr(loss, "strategy", "ce") == "ce" or float(loss.alpha) == 0.0
        )
        if yl_l is None:
            yl_l = [math.nan] * b
        event_gradient, event_curvature = loss.event_gradient, loss.event_curvature
        mean = memoryview(self.mean)
        var = memoryview(self.var)
        mget, vget = mean.__getitem__, var.__getitem__
        moderate = self.moderate
        exp, sqrt, isfinite = math.exp, math.sqrt, math.isfinite
        out = [0.0] * b
        for i in range(b):
            ru = unit_l[i * ku : (i + 1) * ku]
            m = sum(map(mget, ru))
            v = sum(map(vget, ru))
            if weighted is not None:
                a, e = w_ends[i], w_ends[i + 1]
                rw, xw = w_rows[a:e], w_vals[a:e]
                for c, x in zip(rw, xw, strict=True):
                    m += mean[c] * x
                    v += var[c] * x * x
            z = d_l[i] + m
            zs = s_l[i] + m
            out[i] = zs / sqrt(1.0 + _MODERATION * v) if moderate else zs
            if not isfinite(z):  # a backbone logit that is not finite (a value it cannot take): no update
                continue
            if z >= 0.0:
                p = 1.0 / (1.0 + exp(-z))
            else:
                ez = exp(z)
                p = ez / (1.0 + ez)
            if ce:
                g, h = p - y_l[i], p * (1.0 - p)
            else:
                g = event_gradient(p, y_l[i], yl_l[i])
                h = event_curvature(p, yl_l[i])
            if sw_l is not None:
                g *= sw_l[i]
                h *= sw_l[i]
            k = 1.0 / (1.0 + h * v)
            gk, hk = g * k, h * k
            if not (isfinite(gk) and isfinite(hk)):  # an infinite sample weight: one NaN belief for ever
                continue
            for c in ru:
                s = var[c]
                mean[c] -= s * gk
                var[c] = s - s * s * hk
            if weighted is not None:
                for c, x in zip(rw, xw, strict=True):
                    sx = var[c] * x
                    mean[c] -= sx * gk
                    var[c] -= sx * sx * hk
        return np.asarray(out, dtype=np.float64)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "mean": torch.from_numpy(self.mean.copy()),
            "var": torch.from_numpy(self.var.copy()),
            "prior_variance": self.prior_variance,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = state["mean"].numpy().astype(np.float64)
        var = state["var"].numpy().astype(np.float64)
        if mean.shape != (self.size,) or var.shape != (self.size,):
            raise ValueError(f"wide state has {mean.shape[0]} rows, this spec needs {self.size}")
        self.mean = mean.copy()
        self.var = var.copy()

    def reset(self) -> None:
        self.mean[:] = 0.0
        self.var[:] = self.prior_variance

    def copy(self) -> OnlineWide:
        clone = OnlineWide(self.spec, self.prior_variance, self.moderate)
        clone.mean = self.mean.copy()
        clone.var = self.var.copy()
        return clone
