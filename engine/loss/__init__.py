"""Training losses (CE, KD, ReLoop): small objects, testable without a model."""

from engine.loss.losses import (
    STRATEGIES,
    CrossEntropyLoss,
    DistillationLoss,
    Loss,
    LossStats,
    ReLoopLoss,
    make_loss,
)

__all__ = [
    "STRATEGIES",
    "CrossEntropyLoss",
    "DistillationLoss",
    "Loss",
    "LossStats",
    "ReLoopLoss",
    "make_loss",
]
