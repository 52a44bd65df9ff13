"""Typed, frozen, JSON-round-trippable configs for learners (stored in snapshots next to the weights)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator
from reloop.engine.features.spec import FeatureSpec


class FrozenConfig(BaseModel):
    """Unknown keys are refused, so a typo in a config fails fast and names the key."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class OptimizerConfig(FrozenConfig):
    """How a torch learner learns (defaults measured for streaming in docs/backtest/ablation.md).

    * dense parameters: Adam at ``lr``;
    * embedding tables: with ``sparse_embeddings`` a sparse optimizer, Adagrad (per-row learning rates:
      rows seen rarely keep large steps) at ``embedding_lr`` (0.03 by default) or SparseAdam (at ``lr`` by
      default); without, they join the dense Adam;
    * ``wide``: ``bayes`` adds a first-order part learned PER EVENT by Bayesian filtering to the
      backbone's logit (engine/models/wide.py; ``wide_prior_variance`` is its one setting,
      ``wide_moderate`` scores with the predictive probability; it learns with the learner's loss).
      Off by default: it pays where labels arrive with their events, in event order, and predictions
      come from the live learner (the streaming backtest); where clicks are joined with a delay and
      negatives emitted when the window closes, or predictions come from periodic snapshots, it does
      not help and can badly hurt calibration (ablation.md, "Delayed feedback").
    """

    lr: float = Field(default=1e-3, gt=0)
    embedding_lr: float | None = Field(default=None, gt=0, description="default: 0.03 (adagrad), lr (adam)")
    sparse_embeddings: bool = True
    embedding_optimizer: Literal["adam", "adagrad"] = "adagrad"
    embedding_l2: float = Field(default=0.0, ge=0, description="L2 on the embedding rows a batch looks up")
    weight_decay: float = Field(default=0.0, ge=0, description="Adam weight decay on dense parameters")
    embedding_weight_decay: float = Field(
        default=0.0,
        ge=0,
        description="FuxiCTR's embedding_regularizer: (lambda/2)||E||^2 over the WHOLE tables, i.e. Adam "
        "weight decay on the embedding parameters; needs sparse_embeddings=false",
    )
    grad_clip_norm: float | None = Field(default=None, gt=0)
    wide: Literal["bayes", "off"] = "off"
    wide_prior_variance: float = Field(default=1.0, gt=0)
    wide_moderate: bool = True

    @model_validator(mode="after")
    def _check_sparse(self) -> OptimizerConfig:
        if self.embedding_weight_decay > 0 and self.sparse_embeddings:
            raise ValueError(
                "embedding_weight_decay needs sparse_embeddings=false (sparse optimizers lack weight decay)"
            )
        return self

    @property
    def effective_embedding_lr(self) -> float:
        if self.embedding_lr is not None:
            return self.embedding_lr
        return ADAGRAD_EMBEDDING_LR if self.embedding_optimizer == "adagrad" else self.lr

    @classmethod
    def previous_defaults(cls, **overrides: object) -> OptimizerConfig:
        """The defaults before the streaming study (SparseAdam at lr): for comparisons."""
        return cls(**{"embedding_optimizer": "adam", "wide": "off", **overrides})

    @classmethod
    def per_event(cls, **overrides: object) -> OptimizerConfig:
        """The defaults plus the per-event Bayesian wide part (``wide="bayes"``)."""
        return cls(**{"wide": "bayes", **overrides})

    @classmethod
    def small_steps(cls, **overrides: object) -> OptimizerConfig:
        """The defaults with the learning rates for steps of a few samples (one batch per event time):
        Adam 3e-4 on the dense part, Adagrad 0.1 on the tables (``small_step_rates``)."""
        return cls(**{**small_step_rates(str(overrides.get("embedding_optimizer", "adagrad"))), **overrides})


ADAGRAD_EMBEDDING_LR = 0.03


def small_step_rates(embedding_optimizer: str = "adagrad") -> dict[str, float]:
    """The learning rates for steps of a few samples: Adam 3e-4 on the dense part and, for Adagrad tables,
    0.1 on the tables (with SparseAdam the tables follow ``lr`` as by default). Chosen on MovieLens's
    selection weeks with one batch per event time (about 2 samples a step), where the defaults' rates,
    chosen for batches of 512, move the dense part too far per sample (docs/backtest/ablation.md,
    "Learning rates for small steps")."""
    rates = {"lr": 3e-4}
    if embedding_optimizer == "adagrad":
        rates["embedding_lr"] = 0.1
    return rates


class BackboneConfig(FrozenConfig):
    """Base of every backbone's typed config."""

    embedding_dim: int = Field(default=10, ge=1)


class LearnerConfig(FrozenConfig):
    """Everything needed to rebuild a learner from nothing (``registry.learner_from_config``)."""

    backbone: str
    strategy: str
    alpha: float = Field(ge=0.0, le=1.0)
    seed: int = 0
    spec: FeatureSpec
    model: SerializeAsAny[BackboneConfig]
    optimizer: OptimizerConfig = OptimizerConfig()

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return self.model_dump_json()
