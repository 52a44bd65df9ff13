"""Training losses as small objects: CE, KD (distillation from the last model) and ReLoop.

All three are defined on probabilities exactly as in docs/method.md, per sample, and then
averaged over the batch as ``mean_i(w_i * L_i)`` (weights default to 1). They take LOGITS so the log
terms are computed stably (BCE with logits), never ``log`` of a rounded probability.

* CE:      ``L = -y log p - (1-y) log(1-p)``
* KD:      ``L = alpha * [-y_last log p - (1-y_last) log(1-p)] + (1-alpha) * CE``
* ReLoop:  ``L = alpha * [y max(y_last-p, 0) + (1-y) max(p-y_last, 0)] + (1-alpha) * CE``

``y_last`` is a constant (the last model's prediction, no gradient), clamped to [0, 1]. A sample
whose ``y_last`` is unknown (``None`` for the whole batch, or NaN for that sample: e.g. the first
period, or an impression served by no model) is trained with plain CE at full weight, so a missing
teacher never silently shrinks the learning rate by (1 - alpha).

Each strategy is written once, in torch (``_aux``): torch learners backpropagate through it, and numpy
learners (FTRL, river's math in numpy) get ``raw_gradient`` from it by autograd. The one hand-written
derivative is the per-event scalar ``event_gradient`` (river's ``learn_one`` and the per-event wide part,
where a tensor call per sample would cost more than the update); the tests hold it to autograd.

>>> import torch
>>> loss = make_loss("reloop", alpha=0.5)
>>> value, stats = loss(torch.tensor([0.0]), torch.tensor([1.0]), y_last=torch.tensor([0.75]))
>>> round(stats.sc, 4), round(stats.ce, 4), stats.sc_active_fraction   # p = 0.5 is worse than 0.75
(0.25, 0.6931, 1.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

STRATEGIES: tuple[str, ...] = ("ce", "kd", "reloop")
# Not in the paper: variants for its open scale question (docs/method.md, question 2), and two
# self-corrections of our own (reloop_kl, reloop_kd, reloop_gated; docs/backtest/self-correction.md).
VARIANTS: tuple[str, ...] = ("reloop_norm", "reloop_logit", "reloop_kl", "reloop_kd", "reloop_gated")


@dataclass(frozen=True, slots=True)
class LossStats:
    """What one loss evaluation was made of (batch means, weighted like the total).

    ``aux`` is the mixed-in term: L_sc for ReLoop, L_kd for KD, 0 for CE; ``sc`` and ``kd`` name it
    per strategy for readability. ``sc_active_fraction``: among samples with a known y_last, the
    fraction where the new model is worse than the last one (L_sc > 0); 0 for other strategies.
    """

    strategy: str
    alpha: float
    total: float
    ce: float
    aux: float
    sc_active_fraction: float
    n: int
    n_with_last: int

    @property
    def sc(self) -> float:
        return self.aux if self.strategy.startswith("reloop") else 0.0

    @property
    def kd(self) -> float:
        return self.aux if self.strategy == "kd" else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@runtime_checkable
class Loss(Protocol):
    strategy: str
    alpha: float

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        y_last: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LossStats]:
        """The scalar loss (with gradient to ``logits``) and its stats."""
        ...

    def raw_gradient(
        self,
        raw: np.ndarray,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> np.ndarray:
        """d L_i / d z_i per sample (NOT divided by the batch size), z = logit; float64 numpy.

        For learners that do their own updates (river, FTRL): multiply by the feature value.
        """
        ...


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


@dataclass(frozen=True, slots=True)
class _MixedLoss:
    """Shared machinery: alpha * aux + (1 - alpha) * CE where y_last is known, CE elsewhere."""

    alpha: float = 0.0
    strategy: ClassVar[str] = "ce"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or not np.isfinite(self.alpha):
            raise ValueError(f"loss alpha must be in [0, 1], got {self.alpha}")

    # The per-sample auxiliary term: each strategy's one definition. Every torch and numpy path takes
    # its value and gradient from it (autograd); only the per-event scalar path (_aux_event) is
    # written out by hand, and tests/unit/loss checks it against autograd.
    def _aux(
        self,
        logits: torch.Tensor,
        p: torch.Tensor,
        labels: torch.Tensor,
        y_last: torch.Tensor,
        has_last: torch.Tensor,
    ):
        return torch.zeros_like(p)

    def _per_sample(
        self, logits: torch.Tensor, labels: torch.Tensor, y_last: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """(L_i, CE_i, aux_i, has y_last, aux active) per sample: the loss before weights and the mean."""
        logits = logits.reshape(-1)
        labels = labels.reshape(-1).to(logits.dtype)
        _check_size("y_last", y_last, logits.shape[0])
        ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        mixing = self.strategy != "ce" and self.alpha > 0.0
        if y_last is None or not mixing:
            has_last = (
                torch.zeros_like(logits, dtype=torch.bool)
                if y_last is None
                else ~torch.isnan(y_last.reshape(-1))
            )
            per_sample = ce
            aux = torch.zeros_like(ce)
            active = torch.zeros_like(ce)
        else:
            yl = y_last.reshape(-1).to(logits.dtype).detach()
            has_last = ~torch.isnan(yl)
            yl = torch.where(has_last, yl.clamp(0.0, 1.0), torch.zeros_like(yl))
            p = torch.sigmoid(logits)
            aux = self._aux(logits, p, labels, yl, has_last) * has_last
            alpha = self._batch_alpha(logits, labels, yl, has_last, ce)
            mixed = alpha * aux + (1.0 - alpha) * ce
            per_sample = torch.where(has_last, mixed, ce)
            active = self._sc_active(p, labels, yl, aux) & has_last
        return per_sample, ce, aux, has_last, active

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        y_last: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LossStats]:
        logits = logits.reshape(-1)
        n = logits.shape[0]
        if n == 0:
            raise ValueError("loss of an empty batch")
        _check_size("weights", weights, n)
        w = torch.ones_like(logits) if weights is None else weights.reshape(-1).to(logits.dtype)
        per_sample, ce, aux, has_last, active = self._per_sample(logits, labels, y_last)
        total = (w * per_sample).sum() / n
        with torch.no_grad():
            n_last = int(has_last.sum())
            stats = LossStats(
                strategy=self.strategy,
                alpha=float(self.alpha),
                total=float(total.detach()),
                ce=float((w * ce).sum() / n),
                aux=float((w * aux).sum() / n),
                sc_active_fraction=float(active.sum()) / n_last
                if (n_last and self.strategy.startswith("reloop"))
                else 0.0,
                n=int(n),
                n_with_last=n_last,
            )
        return total, stats

    def _batch_alpha(self, logits, labels, y_last, has_last, ce) -> float | torch.Tensor:
        """The mixing weight of this batch: alpha, except for the adaptive variant."""
        return self.alpha

    def _sc_active(self, p: torch.Tensor, labels: torch.Tensor, y_last: torch.Tensor, aux: torch.Tensor):
        """Where the new model is worse than the last one (``sc_active_fraction``): where aux > 0."""
        return aux > 0

    def event_gradient(self, p: float, label: float, y_last: float) -> float:
        """``raw_gradient`` of one sample as a Python float, given its probability ``p``, for learners
        that update per event (engine/models/wide.py). ``y_last`` NaN = unknown (CE for that sample).
        Variants normalised over a batch (``reloop_norm``) use their per-sample form here (scale 1)."""
        grad = p - label
        if self.strategy != "ce" and self.alpha > 0.0 and y_last == y_last:  # y_last not NaN
            yl = 0.0 if y_last < 0.0 else 1.0 if y_last > 1.0 else y_last
            return self.alpha * self._aux_event(p, label, yl) + (1.0 - self.alpha) * grad
        return grad

    def _aux_event(self, p: float, label: float, y_last: float) -> float:
        return 0.0

    def event_curvature(self, p: float, y_last: float) -> float:
        """Gauss-Newton second derivative of one sample's loss in the logit: ``p (1 - p)`` for CE, mixed
        by alpha with the auxiliary term's (KD: ``p (1 - p)``; the ReLoop terms are piecewise linear in
        p or z: 0) where y_last is known. A per-event Newton step divides the gradient by it, so a CE part
        weighted by ``1 - alpha`` moves as far as plain CE and only its certainty grows more slowly."""
        h = p * (1.0 - p)
        if self.strategy != "ce" and self.alpha > 0.0 and y_last == y_last:
            return self.alpha * self._aux_curvature(p) * h + (1.0 - self.alpha) * h
        return h

    def _aux_curvature(self, p: float) -> float:
        """The auxiliary term's curvature as a multiple of ``p (1 - p)``."""
        return 0.0

    def raw_gradient(
        self,
        raw: np.ndarray,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> np.ndarray:
        # Autograd of the per-sample losses alone: no batch mean, no stats (this is a numpy hot path).
        z = _tensor(raw).requires_grad_()
        per_sample = self._per_sample(z, _tensor(labels), _tensor(y_last))[0]
        w = _tensor(weights)
        _check_size("weights", w, z.shape[0])
        (grad,) = torch.autograd.grad((per_sample if w is None else w * per_sample).sum(), z)
        return grad.numpy()


def _check_size(name: str, values: torch.Tensor | None, n: int) -> None:
    """One value per sample or none: a single y_last or weight would broadcast over the whole batch
    without a word (and count as one sample with a y_last: an sc_active_fraction above 1)."""
    if values is not None and values.numel() != n:
        raise ValueError(f"loss: {name} has {values.numel()} values for a batch of {n}")


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    """A float64 copy (a copy: a read-only numpy array cannot be shared with torch)."""
    return None if a is None else torch.tensor(np.asarray(a, dtype=np.float64).reshape(-1))


@dataclass(frozen=True, slots=True)
class CrossEntropyLoss(_MixedLoss):
    """Plain log loss; ``alpha`` is accepted and ignored so every strategy has the same signature."""

    strategy: ClassVar[str] = "ce"


@dataclass(frozen=True, slots=True)
class DistillationLoss(_MixedLoss):
    """KD: imitate the last model (soft-target log loss), mixed with CE by alpha."""

    strategy: ClassVar[str] = "kd"

    def _aux(self, logits, p, labels, y_last, has_last):
        return F.binary_cross_entropy_with_logits(logits, y_last, reduction="none")

    def _aux_event(self, p, label, y_last):
        return p - y_last

    def _aux_curvature(self, p):
        return 1.0


def _sc(p: torch.Tensor, labels: torch.Tensor, y_last: torch.Tensor) -> torch.Tensor:
    """ReLoop's self-correction term L_sc per sample (docs/method.md)."""
    return labels * torch.relu(y_last - p) + (1.0 - labels) * torch.relu(p - y_last)


def _sc_event(p: float, label: float, y_last: float) -> float:
    """d L_sc / d z of one sample (dp/dz = p (1 - p); 0 where inactive, and at a tie as autograd's relu)."""
    dp = p * (1.0 - p)
    return label * (-dp if y_last > p else 0.0) + (1.0 - label) * (dp if p > y_last else 0.0)


@dataclass(frozen=True, slots=True)
class ReLoopLoss(_MixedLoss):
    """ReLoop: a one-sided penalty where the new model is worse than the last one, mixed with CE."""

    strategy: ClassVar[str] = "reloop"

    def _aux(self, logits, p, labels, y_last, has_last):
        return _sc(p, labels, y_last)

    def _aux_event(self, p, label, y_last):
        return _sc_event(p, label, y_last)


@dataclass(frozen=True, slots=True)
class NormalisedReLoopLoss(_MixedLoss):
    """Variant: L_sc averaged over the samples where it is active instead of over the whole batch.

    Plain ReLoop's SC term shrinks with the fraction of active samples, so its weight against CE drifts
    as the model improves; here each active sample's penalty is scaled by n_with_last / n_active.
    """

    strategy: ClassVar[str] = "reloop_norm"

    @staticmethod
    def _scale(active, has_last) -> float:
        n_active = int(active.sum())
        return int(has_last.sum()) / n_active if n_active else 0.0

    def _aux(self, logits, p, labels, y_last, has_last):
        sc = _sc(p, labels, y_last)
        return sc * self._scale((sc.detach() > 0) & has_last, has_last)

    def _aux_event(self, p, label, y_last):
        return _sc_event(p, label, y_last)


_LOGIT_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class LogitReLoopLoss(_MixedLoss):
    """Variant: the one-sided penalty as a margin in logit space, z vs logit(y_last).

    ``y max(z_last - z, 0) + (1-y) max(z - z_last, 0)``: its gradient is +-1 where active, the same
    scale as CE's, and it does not vanish when the prediction saturates (probability-space SC does).
    """

    strategy: ClassVar[str] = "reloop_logit"

    def _aux(self, logits, p, labels, y_last, has_last):
        z_last = torch.logit(y_last.clamp(_LOGIT_EPS, 1.0 - _LOGIT_EPS))
        return labels * torch.relu(z_last - logits) + (1.0 - labels) * torch.relu(logits - z_last)

    def _aux_event(self, p, label, y_last):
        yl = min(max(y_last, _LOGIT_EPS), 1.0 - _LOGIT_EPS)
        return label * (-1.0 if yl > p else 0.0) + (1.0 - label) * (1.0 if p > yl else 0.0)


def _kl(logits: torch.Tensor, y_last: torch.Tensor) -> torch.Tensor:
    """KL(y_last || p) per sample: KD's soft-target log loss minus its minimum, so 0 where p = y_last."""
    entropy = -torch.special.xlogy(y_last, y_last) - torch.special.xlogy(1.0 - y_last, 1.0 - y_last)
    return F.binary_cross_entropy_with_logits(logits, y_last, reduction="none") - entropy


def _worse(p: torch.Tensor, labels: torch.Tensor, y_last: torch.Tensor) -> torch.Tensor:
    """1 where the new prediction is on the wrong side of the last one for the label (L_sc > 0)."""
    return (labels * (y_last > p) + (1.0 - labels) * (p > y_last)).detach()


@dataclass(frozen=True, slots=True)
class OneSidedDistillationLoss(_MixedLoss):
    """Ours: ReLoop's activation with KD's shape. Where the new model is worse than the last one for
    the label (where L_sc > 0), pull it towards the last prediction with KL(y_last || p); elsewhere
    nothing. The pull never opposes the label (KD's does, where the teacher was wrong), and its logit
    gradient is ``p - y_last``, which does not vanish when p saturates (L_sc's ``p (1 - p)`` does)."""

    strategy: ClassVar[str] = "reloop_kl"

    def _aux(self, logits, p, labels, y_last, has_last):
        return _worse(p, labels, y_last) * _kl(logits, y_last)

    def _aux_event(self, p, label, y_last):
        worse = y_last > p if label >= 0.5 else p > y_last
        return p - y_last if worse else 0.0


@dataclass(frozen=True, slots=True)
class SelfCorrectionDistillationLoss(_MixedLoss):
    """Ours: SC and KD together, ``alpha * (L_sc + L_kd) / 2 + (1 - alpha) * CE``: the earlier MovieLens
    prototype found SC helping where the last model knew the user and KD where it did not."""

    strategy: ClassVar[str] = "reloop_kd"

    def _aux(self, logits, p, labels, y_last, has_last):
        kd = F.binary_cross_entropy_with_logits(logits, y_last, reduction="none")
        return 0.5 * (_sc(p, labels, y_last) + kd)

    def _sc_active(self, p, labels, y_last, aux):
        return _worse(p, labels, y_last) > 0

    def _aux_event(self, p, label, y_last):
        return 0.5 * (_sc_event(p, label, y_last) + p - y_last)

    def _aux_curvature(self, p):
        return 0.5


@dataclass(frozen=True, slots=True)
class GatedReLoopLoss(_MixedLoss):
    """Ours, an adaptive alpha: ReLoop on a batch only where the last model predicts the batch better
    than the new one (lower log loss over the samples with a y_last); plain CE on the others.

    The teacher of a streaming learner is a period stale and usually worse than the learner, so a fixed
    alpha pulls towards an older model; this one leans on it only where it still knows more. The decision
    is a constant (no gradient). Per event (a batch of one) the gate is open exactly where L_sc > 0."""

    strategy: ClassVar[str] = "reloop_gated"

    def _aux(self, logits, p, labels, y_last, has_last):
        return _sc(p, labels, y_last)

    def _aux_event(self, p, label, y_last):
        return _sc_event(p, label, y_last)

    def _batch_alpha(self, logits, labels, y_last, has_last, ce):
        with torch.no_grad():
            if not bool(has_last.any()):
                return 0.0
            teacher = F.binary_cross_entropy(y_last, labels, reduction="none")  # its log loss
            better = float(teacher[has_last].mean()) < float(ce[has_last].mean())
        return self.alpha if better else 0.0

    def event_gradient(self, p: float, label: float, y_last: float) -> float:
        if y_last == y_last:  # known: the gate of a batch of one
            yl = 0.0 if y_last < 0.0 else 1.0 if y_last > 1.0 else y_last
            if (yl > p) if label >= 0.5 else (p > yl):
                return _MixedLoss.event_gradient(self, p, label, y_last)
        return p - label


_LOSSES: dict[str, type[_MixedLoss]] = {
    "ce": CrossEntropyLoss,
    "kd": DistillationLoss,
    "reloop": ReLoopLoss,
    "reloop_norm": NormalisedReLoopLoss,
    "reloop_logit": LogitReLoopLoss,
    "reloop_kl": OneSidedDistillationLoss,
    "reloop_kd": SelfCorrectionDistillationLoss,
    "reloop_gated": GatedReLoopLoss,
}


def make_loss(strategy: str, alpha: float = 0.0) -> Loss:
    """The loss for a strategy name (``ce``, ``kd``, ``reloop`` or a variant in ``VARIANTS``).

    Unknown names fail naming the choices."""
    try:
        cls = _LOSSES[strategy]
    except KeyError:
        raise ValueError(f"unknown loss strategy {strategy!r}; choose one of {sorted(_LOSSES)}") from None
    return cls(alpha=float(alpha))
