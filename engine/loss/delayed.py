"""Fake negative weighting (FNW, Ktena et al. 2019): the loss of a stream whose negatives come at once.

With ``join.emit_policy: fnw`` every impression is trained at once as a negative and, if clicked, once
more as a positive (engine/join/joiner.py). Per impression with click probability p the stream then
holds 1 + p samples, so its label distribution is b(1|x) = p / (1 + p), b(0|x) = 1 / (1 + p): trained
as is, a model converges to p / (1 + p), under-predicting. Importance weights p(y|x) / b(y|x) restore
the true distribution:

    positive: w = 1 + p          negative: w = (1 - p) (1 + p)

p is unknown; FNW uses the model's own prediction, held constant in the gradient (a stop-gradient, as
the reference implementations of FNW and ES-DFM do). Any base loss can be wrapped (CE, KD, ReLoop):
importance weights reweight the whole per-sample risk, so the self-correction term is corrected the
same way. Weights already on the samples multiply in.

Why FNW and not ES-DFM: ES-DFM's weights need a second model of P(click comes after the wait | x)
trained beside the CTR model; FNW needs nothing but the model itself and its stream has no window at
all (the freshest labels possible). The price: every positive is first trained once as a negative.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from reloop.engine.loss.losses import Loss, LossStats

DELAYED_FEEDBACK = ("none", "fnw")


def fnw_weights(p: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
    """``1 + p`` for a positive, ``(1 - p)(1 + p)`` for a negative (numpy or torch, no gradient)."""
    return (1.0 + p) * (labels + (1.0 - labels) * (1.0 - p))


@dataclass(frozen=True, slots=True)
class FakeNegativeWeighted:
    """``inner`` with every sample's weight multiplied by its FNW importance weight."""

    inner: Loss
    reweights_events: ClassVar[bool] = True  # per-event learners must call event_gradient (wide.py)

    @property
    def strategy(self) -> str:
        return self.inner.strategy

    @property
    def alpha(self) -> float:
        return self.inner.alpha

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        y_last: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LossStats]:
        with torch.no_grad():
            p = torch.sigmoid(logits.reshape(-1))
            w = fnw_weights(p, labels.reshape(-1).to(p.dtype))
            if weights is not None:
                w = w * weights.reshape(-1).to(w.dtype)
        return self.inner(logits, labels, y_last, w)

    def raw_gradient(
        self,
        raw: np.ndarray,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> np.ndarray:
        z = np.asarray(raw, dtype=np.float64).reshape(-1)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        w = fnw_weights(0.5 * (1.0 + np.tanh(0.5 * z)), y)
        if weights is not None:
            w = w * np.asarray(weights, dtype=np.float64).reshape(-1)
        return self.inner.raw_gradient(raw, labels, y_last, w)

    def event_gradient(self, p: float, label: float, y_last: float) -> float:
        return float(fnw_weights(p, label)) * self.inner.event_gradient(p, label, y_last)  # type: ignore[attr-defined]

    def event_curvature(self, p: float, y_last: float) -> float:
        # The weight depends on the label, which the curvature does not see: the larger (positive) one
        # bounds it, so a per-event Newton step is never longer than without the weights.
        return (1.0 + p) * self.inner.event_curvature(p, y_last)  # type: ignore[attr-defined]


def with_delayed_feedback(loss: Loss, policy: str) -> Loss:
    """``loss`` as the trainer should use it under ``train.delayed_feedback``."""
    if policy == "none":
        return loss
    if policy == "fnw":
        return FakeNegativeWeighted(loss)
    raise ValueError(f"unknown delayed_feedback {policy!r}; choose one of {DELAYED_FEEDBACK}")
