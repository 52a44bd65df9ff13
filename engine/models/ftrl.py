"""FTRL-Proximal logistic regression (McMahan et al. 2013) as a numpy Learner.

Per-coordinate adaptive learning rates and L1-induced sparsity. The gradient with respect to the raw
score comes from the configured loss's ``raw_gradient``, so FTRL trains with CE, KD or ReLoop alike.
A mini-batch sums the per-sample gradients of each coordinate before the update, which keeps the
per-sample meaning of l1/l2 (a batch of one is the textbook algorithm).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from reloop.engine.checkpoint.registry import check_state_format
from reloop.engine.features.featurizer import FeatureBatch
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.loss.losses import Loss, LossStats, make_loss
from reloop.engine.models.config import BackboneConfig, LearnerConfig
from reloop.engine.models.finite import learns_finite_rows
from reloop.engine.models.learner import check_labels, check_same_architecture

STATE_FORMAT = 1


class FTRLConfig(BackboneConfig):
    embedding_dim: int = Field(default=1, ge=1, le=1)
    ftrl_alpha: float = Field(default=0.05, gt=0)
    ftrl_beta: float = Field(default=1.0, ge=0)
    l1: float = Field(default=0.1, ge=0)
    l2: float = Field(default=1.0, ge=0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _active(spec: FeatureSpec, batch: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
    """(rows [B, K], values [B, K]) of the coordinates each sample touches; the last is the bias."""
    b = len(batch)
    rows = [
        batch.cat,
        np.broadcast_to(np.asarray(spec.dense_rows, dtype=np.int64), (b, len(spec.dense_rows))),
    ]
    vals = [np.ones(batch.cat.shape, dtype=np.float64), batch.num.astype(np.float64)]
    if spec.multi_fields:
        count = np.maximum(batch.multi_mask.sum(-1, keepdims=True), 1.0)
        rows.append(batch.multi.reshape(b, batch.multi.shape[1] * batch.multi.shape[2]))
        vals.append((batch.multi_mask / count).reshape(b, rows[-1].shape[1]).astype(np.float64))
    rows.append(np.full((b, 1), spec.total_rows, dtype=np.int64))
    vals.append(np.ones((b, 1), dtype=np.float64))
    return np.concatenate(rows, axis=1), np.concatenate(vals, axis=1)


class FTRLLearner:
    """Learner protocol over FTRL-Proximal state (z, n per coordinate)."""

    def __init__(self, *, config: LearnerConfig, loss: Loss | None = None, frozen: bool = False) -> None:
        if not isinstance(config.model, FTRLConfig):
            raise TypeError("FTRLLearner needs an FTRLConfig")
        self.config = config
        self.cfg: FTRLConfig = config.model
        self.loss = loss if loss is not None else make_loss(config.strategy, config.alpha)
        size = config.spec.total_rows + 1  # + bias
        self.z = np.zeros(size, dtype=np.float64)
        self.n = np.zeros(size, dtype=np.float64)
        self.frozen = frozen
        self.steps = 0

    def _weights(self, rows: np.ndarray) -> np.ndarray:
        z = self.z[rows]
        n = self.n[rows]
        c = self.cfg
        w = -(z - np.sign(z) * c.l1) / ((c.ftrl_beta + np.sqrt(n)) / c.ftrl_alpha + c.l2)
        return np.where(np.abs(z) <= c.l1, 0.0, w)

    def _logits(self, batch: FeatureBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows, vals = _active(self.config.spec, batch)
        return (self._weights(rows) * vals).sum(axis=1), rows, vals

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        return _sigmoid(self._logits(batch)[0])

    @learns_finite_rows
    def learn(
        self,
        batch: FeatureBatch,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> LossStats:
        if self.frozen:
            raise RuntimeError("a frozen learner only predicts")
        logits, rows, vals = self._logits(batch)
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
        check_labels(labels)
        _, stats = self.loss(
            torch.from_numpy(logits),
            torch.from_numpy(labels),
            None if y_last is None else torch.from_numpy(np.asarray(y_last, dtype=np.float64).reshape(-1)),
            None if weights is None else torch.from_numpy(np.asarray(weights, dtype=np.float64).reshape(-1)),
        )
        g_raw = self.loss.raw_gradient(logits, labels, y_last, weights)
        flat_rows = rows.reshape(-1)
        coords, inverse = np.unique(flat_rows, return_inverse=True)
        g = np.bincount(inverse, weights=(g_raw[:, None] * vals).reshape(-1), minlength=coords.size)
        w = self._weights(coords)
        n_old = self.n[coords]
        n_new = n_old + g * g
        sigma = (np.sqrt(n_new) - np.sqrt(n_old)) / self.cfg.ftrl_alpha
        self.z[coords] += g - sigma * w
        self.n[coords] = n_new
        self.steps += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config_json": self.config.to_json(),
            "z": torch.from_numpy(self.z.copy()),
            "n": torch.from_numpy(self.n.copy()),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_format(state, STATE_FORMAT, "FTRL state")
        check_same_architecture(state, self.config)
        z = state["z"].numpy().astype(np.float64)
        if z.shape != self.z.shape:
            raise ValueError(f"FTRL state has {z.shape[0]} coordinates, this spec needs {self.z.shape[0]}")
        self.z = z.copy()
        self.n = state["n"].numpy().astype(np.float64).copy()
        self.steps = int(state["steps"])

    def clone_frozen(self) -> FTRLLearner:
        clone = FTRLLearner(config=self.config, loss=self.loss, frozen=True)
        clone.z = self.z.copy()
        clone.n = self.n.copy()
        clone.steps = self.steps
        return clone
