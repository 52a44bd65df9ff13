"""Typed, frozen, JSON-round-trippable configs for learners (stored in snapshots next to the weights)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator
from reloop.engine.features.counters import CounterSettings
from reloop.engine.features.spec import FeatureSpec


class FrozenConfig(BaseModel):
    """Unknown keys are refused, so a typo in a config fails fast and names the key. So are infinite
    and NaN numbers (YAML's ``.inf``): an infinite rate, variance or penalty passes ``gt=0`` and wrecks
    the model at its first step; a field where infinity means "no limit" says so itself."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class OptimizerConfig(FrozenConfig):
    """How a torch learner learns (defaults measured for streaming in docs/backtest/ablation.md).

    * dense parameters: Adam at ``lr`` (by default the backbone's rate, ``adam_lr``: 1e-3; DCN, NFM, PNN
      and xDeepFM 2e-3, DeepFM 4e-3, FmFM 1.6e-2);
    * embedding tables: with ``sparse_embeddings`` a sparse optimizer, Adagrad (per-row learning rates:
      rows seen rarely keep large steps) at ``embedding_lr`` (by default the backbone's rate,
      ``adagrad_embedding_lr``: 0.1; DeepFM 0.03, FmFM 0.055, LR and PNN 0.17, AFN+ 0.3) or SparseAdam
      (at ``lr`` by default); without, they join the dense Adam;
    * while the learner's steps hold fewer than ``small_steps_below`` samples on average (a moving
      average over about the last 10 steps: the train stage's partial steps on a slow stream, small
      batches, one batch per event time) it learns at ``small_step_lr`` on the dense part and
      ``small_step_embedding_lr`` on the tables instead: Adam moves each weight by about its rate per
      step whatever the step's size, so the rates chosen for batches of 512 move the model too far per
      sample when steps hold a few (ablation.md, "Learning rates for small steps"). An average, not each
      step's size: switching rates for the odd partial batch among full ones cost MovieLens 9e-3 AUC;
    * ``wide``: ``bayes`` adds a first-order part learned PER EVENT by Bayesian filtering to the
      backbone's logit (engine/models/wide.py; ``wide_prior_variance`` is its one setting,
      ``wide_moderate`` scores with the predictive probability; it learns with the learner's loss).
      With it, unset rates default to those the part was chosen with (``PER_EVENT_RATES``: Adam 1e-3,
      Adagrad 0.03), not the backbone's.
      Off by default: it pays where labels arrive with their events, in event order, and predictions
      come from the live learner (the streaming backtest); where clicks are joined with a delay and
      negatives emitted when the window closes, or predictions come from periodic snapshots, it does
      not help and can badly hurt calibration (ablation.md, "Delayed feedback").
    """

    lr: float | None = Field(default=None, gt=0, description="Adam's dense rate; default: the backbone's")
    embedding_lr: float | None = Field(
        default=None, gt=0, description="default: the backbone's Adagrad rate (adagrad), lr (adam)"
    )
    sparse_embeddings: bool = Field(
        default=True,
        description="the tables learn with a sparse optimizer: only the rows a batch looks up are touched",
    )
    embedding_optimizer: Literal["adam", "adagrad"] = Field(
        default="adagrad",
        description="the tables' optimizer with sparse_embeddings: adagrad (a rate per row) or adam",
    )
    embedding_l2: float = Field(default=0.0, ge=0, description="L2 on the embedding rows a batch looks up")
    weight_decay: float = Field(default=0.0, ge=0, description="Adam weight decay on dense parameters")
    embedding_weight_decay: float = Field(
        default=0.0,
        ge=0,
        description="FuxiCTR's embedding_regularizer: (lambda/2)||E||^2 over the WHOLE tables, i.e. Adam "
        "weight decay on the embedding parameters; needs sparse_embeddings=false",
    )
    grad_clip_norm: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=True,
        description="clip the gradients' total norm at this; null: no clipping",
    )  # inf: no clipping
    small_steps_below: int = Field(
        default=256, ge=0, description="steps averaging fewer samples use the small-step rates (0: never)"
    )
    small_step_lr: float = Field(default=3e-4, gt=0, description="Adam's dense rate in small steps")
    small_step_embedding_lr: float | None = Field(
        default=None, gt=0, description="default: 0.1 (adagrad); small_step_lr (adam, unless embedding_lr)"
    )
    wide: Literal["bayes", "off"] = Field(
        default="off",
        description="bayes: a first-order part learnt per event (opt-in: its gain needs labels in event "
        "order, docs/backtest/ablation.md)",
    )
    wide_prior_variance: float = Field(default=1.0, gt=0, description="the per-event part's prior variance")
    wide_moderate: bool = Field(
        default=True,
        description="the per-event part scores with its predictive probability (its uncertainty moderates "
        "the score)",
    )

    @model_validator(mode="after")
    def _check_sparse(self) -> OptimizerConfig:
        if self.embedding_weight_decay > 0 and self.sparse_embeddings:
            raise ValueError(
                "embedding_weight_decay needs sparse_embeddings=false (sparse optimizers lack weight decay)"
            )
        return self

    def effective_embedding_lr(self, backbone: str | None = None) -> float:
        """The tables' rate for batch-sized steps: ``embedding_lr``, else ``backbone``'s Adagrad rate
        (``adagrad_embedding_lr``; with the per-event part, ``PER_EVENT_RATES``) or, for SparseAdam,
        ``lr``."""
        if self.embedding_lr is not None:
            return self.embedding_lr
        if self.embedding_optimizer == "adagrad":
            return self._default_rates(backbone)[1]
        return self.effective_lr(backbone)

    def effective_lr(self, backbone: str | None = None) -> float:
        """Adam's rate on the dense parameters for batch-sized steps: ``lr``, else ``backbone``'s (with
        the per-event part, ``PER_EVENT_RATES``)."""
        return self.lr if self.lr is not None else self._default_rates(backbone)[0]

    def _default_rates(self, backbone: str | None) -> tuple[float, float]:
        if self.wide == "bayes":
            return PER_EVENT_RATES
        return adam_lr(backbone), adagrad_embedding_lr(backbone)

    @property
    def effective_small_step_embedding_lr(self) -> float:
        if self.small_step_embedding_lr is not None:
            return self.small_step_embedding_lr
        if self.embedding_optimizer == "adagrad":
            return ADAGRAD_SMALL_STEP_EMBEDDING_LR
        return self.embedding_lr if self.embedding_lr is not None else self.small_step_lr

    def rates(self, step_samples: float, backbone: str | None = None) -> tuple[float, float]:
        """(dense rate, table rate) for steps of ``step_samples`` samples on average (over all ranks)."""
        if step_samples < self.small_steps_below:
            return self.small_step_lr, self.effective_small_step_embedding_lr
        return self.effective_lr(backbone), self.effective_embedding_lr(backbone)

    @classmethod
    def previous_defaults(cls, **overrides: object) -> OptimizerConfig:
        """The defaults before the streaming study (SparseAdam at lr): for comparisons."""
        settings = {"embedding_optimizer": "adam", "wide": "off", "small_steps_below": 0, "lr": ADAM_LR}
        return cls(**{**settings, **overrides})

    @classmethod
    def per_event(cls, **overrides: object) -> OptimizerConfig:
        """The defaults plus the per-event Bayesian wide part (``wide="bayes"``)."""
        return cls(**{"wide": "bayes", **overrides})


# Adam's rate on the dense parameters when ``lr`` is unset, chosen per backbone on the backtests' selection
# periods by the rule of the tables' rate below, over the grid 1e-3, 2e-3, 4e-3 at each backbone's
# tables' rate, and on up the doublings for FmFM, which gained at each step to 1.6e-2
# (docs/backtest/ablation.md, "The dense rate, backbone by backbone").
ADAM_LR = 1e-3
ADAM_LR_BY_BACKBONE: dict[str, float] = {
    "dcn": 2e-3,
    "deepfm": 4e-3,
    "fmfm": 1.6e-2,
    "nfm": 2e-3,
    "pnn": 2e-3,
    "xdeepfm": 2e-3,
}


def adam_lr(backbone: str | None) -> float:
    """The default Adam rate of ``backbone``'s dense parameters (``ADAM_LR`` if unknown)."""
    return ADAM_LR_BY_BACKBONE.get(backbone or "", ADAM_LR)


# Adagrad's rate on the embedding tables when ``embedding_lr`` is unset, chosen per backbone on the
# backtests' selection periods (MovieLens weeks 1-10, Frappe chunks 1-3; docs/backtest/ablation.md, "The
# tables' rate, backbone by backbone"): a backbone moves up the grid 0.03, 0.1, 0.3 while the larger rate is
# nowhere worse (both datasets, AUC and LogLoss, 95% over 5 seeds) and better somewhere; the step it failed
# is then bisected once (its geometric midpoint: 0.055 or 0.17) by the same test. DeepFM keeps 0.03 (worse
# on MovieLens at 0.055), FmFM moves to 0.055, LR and PNN to 0.17; backbones not listed (plugins too) take
# ADAGRAD_EMBEDDING_LR.
ADAGRAD_EMBEDDING_LR = 0.1
ADAGRAD_EMBEDDING_LR_BY_BACKBONE: dict[str, float] = {
    "deepfm": 0.03,
    "fmfm": 0.055,
    "lr": 0.17,
    "pnn": 0.17,
    "afn": 0.3,
}


def adagrad_embedding_lr(backbone: str | None) -> float:
    """The default Adagrad rate of ``backbone``'s embedding tables (``ADAGRAD_EMBEDDING_LR`` if unknown)."""
    return ADAGRAD_EMBEDDING_LR_BY_BACKBONE.get(backbone or "", ADAGRAD_EMBEDDING_LR)


# (Adam's dense rate, Adagrad's table rate) with the per-event part (``wide="bayes"``) when unset, for every
# backbone: the rates it was studied with. A backbone would keep its own rates only where they were nowhere
# worse with the part and better somewhere (both datasets' selection periods, AUC and LogLoss, 95% over 5
# seeds; docs/backtest/ablation.md, "The per-event part's rates"); none of the eleven torch backbones did:
# each one's own rates were worse with the part on MovieLens (though better on Frappe for nine).
PER_EVENT_RATES: tuple[float, float] = (1e-3, 0.03)


# The small-step rates were chosen on the selection periods with one batch per event time on MovieLens
# (Adam 3e-4, Adagrad 0.1); batches of 8, 32 and 128 gain from them on both MovieLens and Frappe.
ADAGRAD_SMALL_STEP_EMBEDDING_LR = 0.1


class BackboneConfig(FrozenConfig):
    """Base of every backbone's typed config."""

    embedding_dim: int = Field(default=10, ge=1)


class LearnerConfig(FrozenConfig):
    """Everything needed to rebuild a learner from nothing (``registry.learner_from_config``)."""

    backbone: str
    strategy: str
    alpha: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int = 0
    spec: FeatureSpec
    model: SerializeAsAny[BackboneConfig]
    optimizer: OptimizerConfig = OptimizerConfig()
    # The click counters whose inputs the spec ends with (``model.counters``), so that a serving arm can
    # be checked against every setting, the prior strength included, which the inputs' names do not
    # carry. Left out of the JSON when None: a reloop from before it reads those snapshots as it did.
    counters: CounterSettings | None = None

    def _dump_excludes(self) -> set[str] | None:
        return {"counters"} if self.counters is None else None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude=self._dump_excludes())

    def to_json(self) -> str:
        return self.model_dump_json(exclude=self._dump_excludes())
