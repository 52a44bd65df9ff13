"""Training losses (CE, KD, ReLoop): small objects, testable without a model."""

from reloop.engine.loss.losses import (
    STRATEGIES,
    VARIANTS,
    CrossEntropyLoss,
    DistillationLoss,
    LogitReLoopLoss,
    Loss,
    LossStats,
    NormalisedReLoopLoss,
    ReLoopLoss,
    make_loss,
)

__all__ = [
    "STRATEGIES",
    "VARIANTS",
    "CrossEntropyLoss",
    "DistillationLoss",
    "LogitReLoopLoss",
    "Loss",
    "LossStats",
    "NormalisedReLoopLoss",
    "ReLoopLoss",
    "make_loss",
]
