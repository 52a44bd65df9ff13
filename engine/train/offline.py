"""Offline training: epochs over a fixed, pre-featurised dataset with early stopping on validation AUC.

The learner does the steps; this module only batches, shuffles, evaluates and keeps the best state
(the BARS protocol: train until validation AUC stops improving, then restore the best epoch).

>>> from reloop.engine.features.spec import CategoricalField, FeatureSpec
>>> from reloop.engine.features.featurizer import Featurizer
>>> from reloop.engine.models.registry import build_learner
>>> spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=16),))
>>> rows = [{"u": str(i % 4)} for i in range(400)]
>>> data = ArrayDataset(Featurizer(spec).transform(rows), np.array([i % 4 == 0 for i in range(400)]))
>>> learner = build_learner("lr", spec, "ce", 0.0, seed=0, optimizer={"lr": 0.05})
>>> result = OfflineTrainer(OfflineConfig(epochs=5, batch_size=64)).fit(learner, data, valid=data)
>>> result.best.auc
1.0
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.featurizer import FeatureBatch, Featurizer
from reloop.engine.loss.losses import LossStats
from reloop.engine.metrics.offline import auc, logloss
from reloop.engine.models.finite import DIVERGED_HINT, TrainingDiverged, learner_not_finite
from reloop.engine.models.learner import Learner


class OfflineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=4096, ge=1)
    eval_batch_size: int = Field(default=16384, ge=1)
    shuffle: bool = True
    seed: int = 0
    patience: int = Field(
        default=1, ge=1, description="epochs without a better validation AUC before stopping"
    )
    restore_best: bool = True
    single_thread: bool = Field(
        default=False, description="torch.set_num_threads(1) during fit (reproducibility)"
    )


@dataclass(frozen=True)
class ArrayDataset:
    """Featurised samples with labels and optional y_last / weights (NaN y_last = unknown)."""

    batch: FeatureBatch
    labels: np.ndarray
    y_last: np.ndarray | None = None
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.batch)
        for name in ("labels", "y_last", "weights"):
            a = getattr(self, name)
            if a is not None and len(a) != n:
                raise ValueError(f"ArrayDataset: {name} has {len(a)} rows, features have {n}")

    def __len__(self) -> int:
        return len(self.batch)

    def take(self, index: np.ndarray | slice) -> ArrayDataset:
        return ArrayDataset(
            self.batch.take(index),
            self.labels[index],
            None if self.y_last is None else self.y_last[index],
            None if self.weights is None else self.weights[index],
        )

    @classmethod
    def from_samples(
        cls, samples: Sequence[LabeledSample], featurizer: Featurizer, use_served_prediction: bool = True
    ) -> ArrayDataset:
        """From joined samples; ``served_prediction`` becomes y_last when asked (the logged y_last)."""
        return cls(
            batch=featurizer.transform([s.features for s in samples]),
            labels=np.fromiter((s.label for s in samples), dtype=np.float32, count=len(samples)),
            y_last=(
                np.fromiter((s.served_prediction for s in samples), dtype=np.float32, count=len(samples))
                if use_served_prediction
                else None
            ),
            weights=np.fromiter((s.weight for s in samples), dtype=np.float32, count=len(samples)),
        )


@dataclass(frozen=True)
class EvalResult:
    auc: float
    logloss: float
    n: int
    mean_prediction: float
    positive_rate: float


def predict(learner: Learner, data: ArrayDataset, batch_size: int = 16384) -> np.ndarray:
    n = len(data)
    return (
        np.concatenate(
            [
                learner.predict_proba(data.batch.take(slice(i, i + batch_size)))
                for i in range(0, n, batch_size)
            ]
        )
        if n
        else np.zeros(0)
    )


def evaluate(learner: Learner, data: ArrayDataset, batch_size: int = 16384) -> EvalResult:
    p = predict(learner, data, batch_size)
    return EvalResult(
        auc=auc(data.labels, p),
        logloss=logloss(data.labels, p),
        n=len(data),
        mean_prediction=float(p.mean()) if len(p) else math.nan,
        positive_rate=float(np.mean(data.labels)) if len(p) else math.nan,
    )


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    train_samples: int
    seconds: float
    valid: EvalResult | None


@dataclass
class FitResult:
    epochs: list[EpochResult] = field(default_factory=list)
    best_epoch: int | None = None

    @property
    def best(self) -> EvalResult | None:
        for e in self.epochs:
            if e.epoch == self.best_epoch:
                return e.valid
        return None


@contextmanager
def _threads(single: bool):
    if not single:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class OfflineTrainer:
    """Epochs of mini-batch ``learner.learn`` calls, deterministic for ``config.seed``."""

    def __init__(self, config: OfflineConfig | None = None) -> None:
        self.config = config or OfflineConfig()

    def train_epoch(
        self, learner: Learner, data: ArrayDataset, rng: np.random.Generator
    ) -> tuple[float, int, list[LossStats]]:
        cfg = self.config
        n = len(data)
        order = rng.permutation(n) if cfg.shuffle else np.arange(n)
        stats: list[LossStats] = []
        total, counted = 0.0, 0
        skipped = getattr(learner, "skipped_samples", 0)
        for i in range(0, n, cfg.batch_size):
            part = data.take(order[i : i + cfg.batch_size])
            s = learner.learn(part.batch, part.labels, part.y_last, part.weights)
            stats.append(s)
            if s.n and math.isfinite(s.total):  # a step that learnt nothing has no loss to average
                total += s.total * s.n
                counted += s.n
        if n and getattr(learner, "skipped_samples", 0) - skipped >= n:
            raise TrainingDiverged(
                f"training diverged: an epoch learnt none of its {n} samples; {DIVERGED_HINT}"
            )
        return (total / counted if counted else math.nan), n, stats

    def fit(
        self,
        learner: Learner,
        train: ArrayDataset,
        valid: ArrayDataset | None = None,
        on_epoch: Callable[[EpochResult], None] | None = None,
    ) -> FitResult:
        """Train; with ``valid``: stop after ``patience`` epochs without a better AUC, keep the best state.
        A validation set of one class has no AUC: its LogLoss decides instead (with AUC's NaN no epoch was
        ever the best, and the last one was kept). Raises ``TrainingDiverged`` after an epoch that leaves
        a learner state that is not finite, or that learnt none of its samples (engine/models/finite.py)."""
        cfg = self.config
        # An empty validation set has neither AUC nor LogLoss: no epoch would ever be the best, and
        # training would silently stop after ``patience`` epochs.
        if len(train) == 0 or (valid is not None and len(valid) == 0):
            raise ValueError(
                f"fit needs samples: {len(train)} to train, {0 if valid is None else len(valid)} to validate"
            )
        rng = np.random.default_rng(cfg.seed)
        result = FitResult()
        best_score = -math.inf
        best_state: dict[str, Any] | None = None
        stale = 0
        with _threads(cfg.single_thread):
            for epoch in range(1, cfg.epochs + 1):
                t0 = time.perf_counter()
                loss, n, _ = self.train_epoch(learner, train, rng)
                seconds = time.perf_counter() - t0
                where = learner_not_finite(learner)  # once an epoch: evaluating NaN scores says nothing
                if where is not None:
                    raise TrainingDiverged(
                        f"training diverged in epoch {epoch}: the learner's {where}; {DIVERGED_HINT}"
                    )
                ev = evaluate(learner, valid, cfg.eval_batch_size) if valid is not None else None
                er = EpochResult(epoch, loss, n, seconds, ev)
                result.epochs.append(er)
                if on_epoch is not None:
                    on_epoch(er)
                if ev is None:
                    result.best_epoch = epoch
                    continue
                score = -ev.logloss if math.isnan(ev.auc) else ev.auc  # the same kind every epoch
                if score > best_score:
                    best_score, result.best_epoch, stale = score, epoch, 0
                    if cfg.restore_best:
                        best_state = copy.deepcopy(learner.state_dict())
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
            if best_state is not None and result.best_epoch != result.epochs[-1].epoch:
                learner.load_state_dict(best_state)
        return result
