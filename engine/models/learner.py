"""The Learner protocol every backbone sits behind (torch and river alike), and its torch implementation.

A learner owns a model, its optimizer(s) and its loss; the trainer owns batching and periods; the model
(an ``nn.Module``) owns only the forward pass. State is tensors and plain types only, so snapshots
load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol, runtime_checkable

import numpy as np
import orjson
import torch
from torch import nn

from engine.features.featurizer import FeatureBatch
from engine.loss.losses import Loss, LossStats, make_loss
from engine.models.blocks import GenDropout
from engine.models.config import LearnerConfig, OptimizerConfig

STATE_FORMAT = 1


@runtime_checkable
class Learner(Protocol):
    """What the trainer, the scoring service and the backtests see of a model."""

    config: LearnerConfig

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        """P(click) per sample, float64 [B]; no side effects (eval mode, no gradient)."""
        ...

    def learn(
        self,
        batch: FeatureBatch,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> LossStats:
        """One optimisation step on the mini-batch with the configured loss.

        ``y_last``: the last model's probability per sample (NaN where unknown: CE only for that sample).
        ``weights``: per-sample loss weights (importance weights, corrections).
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Model + optimizer + RNG state, tensors and plain types only; includes ``config_json``."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def clone_frozen(self) -> Learner:
        """An independent copy that only predicts (``learn`` raises): the "last model" for y_last."""
        ...


class CTRModel(nn.Module):
    """A backbone: ``forward(TorchFeatureBatch) -> {"logit": [B], "hidden": [B, H], "embeddings": [...]}``.

    ``hidden`` is the representation under the output layer (a key for ReLoop2's error memory);
    ``embeddings`` lists the looked-up embedding tensors, for the learner's embedding L2.
    """


def _as_tensor(a: np.ndarray | None, name: str, n: int) -> torch.Tensor | None:
    if a is None:
        return None
    arr = np.asarray(a, dtype=np.float32).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} values for a batch of {n}")
    return torch.from_numpy(arr)


def _fused_adam(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused kernels missing on this build/device
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def check_same_architecture(state: dict[str, Any], config: LearnerConfig) -> None:
    """Refuse a state made for another backbone, model config or feature spec (the loss and the
    optimizer settings may differ: a CE-trained state can continue under ReLoop)."""
    if "config_json" not in state:
        return
    stored = orjson.loads(state["config_json"])
    mine = config.to_dict()
    for key in ("backbone", "model", "spec"):
        if stored.get(key) != mine[key]:
            raise ValueError(
                f"learner state has a different {key} ({stored.get('backbone')!r} state, "
                f"{config.backbone!r} learner); rebuild it with registry.learner_from_state"
            )


class TorchLearner:
    """A torch backbone trained with mini-batch steps (see Learner)."""

    def __init__(self, *, model: nn.Module, config: LearnerConfig, loss: Loss | None = None) -> None:
        self.config = config
        self.model = model
        self.loss = loss if loss is not None else make_loss(config.strategy, config.alpha)
        self.generator = torch.Generator().manual_seed(config.seed)
        for m in model.modules():
            if isinstance(m, GenDropout):
                m.generator = self.generator
        self.optimizers = self._make_optimizers(config.optimizer)
        self.steps = 0

    @property
    def spec(self):
        return self.config.spec

    def _make_optimizers(self, opt: OptimizerConfig) -> dict[str, torch.optim.Optimizer]:
        sparse_params: list[nn.Parameter] = []
        for m in self.model.modules():
            if isinstance(m, nn.Embedding) and m.sparse:
                sparse_params.append(m.weight)
        sparse_ids = {id(p) for p in sparse_params}
        dense_params = [p for p in self.model.parameters() if id(p) not in sparse_ids and p.requires_grad]
        optimizers: dict[str, torch.optim.Optimizer] = {}
        if dense_params:
            optimizers["dense"] = _fused_adam(dense_params, opt.lr, opt.weight_decay)
        if sparse_params:
            lr = opt.embedding_lr or opt.lr
            optimizers["embedding"] = (
                torch.optim.SparseAdam(sparse_params, lr=lr)
                if opt.embedding_optimizer == "adam"
                else torch.optim.Adagrad(sparse_params, lr=lr)
            )
        return optimizers

    def forward_logits(self, batch: FeatureBatch) -> torch.Tensor:
        """Logits in eval mode without gradient (for callers needing raw scores)."""
        self.model.eval()
        with torch.inference_mode():
            return self.model(batch.to_torch())["logit"]

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        return torch.sigmoid(self.forward_logits(batch).double()).numpy()

    def hidden(self, batch: FeatureBatch) -> np.ndarray:
        """The representation under the output layer, float32 [B, H] (ReLoop2's memory key)."""
        self.model.eval()
        with torch.inference_mode():
            return self.model(batch.to_torch())["hidden"].float().numpy()

    def learn(
        self,
        batch: FeatureBatch,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> LossStats:
        n = len(batch)
        y = _as_tensor(labels, "labels", n)
        assert y is not None
        self.model.train()
        out = self.model(batch.to_torch())
        loss, stats = self.loss(
            out["logit"], y, _as_tensor(y_last, "y_last", n), _as_tensor(weights, "weights", n)
        )
        opt = self.config.optimizer
        if opt.embedding_l2 > 0:
            loss = loss + opt.embedding_l2 * sum(e.square().sum() for e in out["embeddings"]) / n
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None and not p.grad.is_sparse],
                opt.grad_clip_norm,
            )
        for o in self.optimizers.values():
            o.step()
        self.steps += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config_json": self.config.to_json(),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            # deep copies: optimizer.state_dict() shares its tensors with the live optimizer
            "optimizers": {k: copy.deepcopy(o.state_dict()) for k, o in self.optimizers.items()},
            "rng": self.generator.get_state(),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"learner state format {state.get('format')!r}, expected {STATE_FORMAT}")
        check_same_architecture(state, self.config)
        self.model.load_state_dict(state["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        self.generator.set_state(state["rng"])
        self.steps = int(state["steps"])

    def clone_frozen(self) -> FrozenTorchLearner:
        return FrozenTorchLearner(model=copy.deepcopy(self.model), config=self.config)


class FrozenTorchLearner:
    """A predict-only copy of a torch learner (the last model that produces y_last)."""

    def __init__(self, *, model: nn.Module, config: LearnerConfig) -> None:
        self.config = config
        # Parameters keep requires_grad: flipping it changes some CPU kernels (BatchNorm), and the frozen
        # copy must predict bit-for-bit like the learner it was cloned from. inference_mode stops autograd.
        self.model = model.eval()

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(self.model(batch.to_torch())["logit"].double()).numpy()

    def hidden(self, batch: FeatureBatch) -> np.ndarray:
        with torch.inference_mode():
            return self.model(batch.to_torch())["hidden"].float().numpy()

    def learn(self, batch, labels, y_last=None, weights=None) -> LossStats:
        raise RuntimeError("a frozen learner only predicts")

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config_json": self.config.to_json(),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_architecture(state, self.config)
        self.model.load_state_dict(state["model"])

    def clone_frozen(self) -> FrozenTorchLearner:
        return FrozenTorchLearner(model=copy.deepcopy(self.model), config=self.config)
