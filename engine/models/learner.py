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

from engine.features.featurizer import FeatureBatch, TorchFeatureBatch
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


def _fused_adam(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # fused kernels missing on this build/device
        return torch.optim.Adam(groups, lr=lr)


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


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class TorchLearner:
    """A torch backbone trained with mini-batch steps (see Learner).

    CPU by default; ``to(device)`` moves it (the numpy-facing methods then copy each batch over, and
    ``learn_tensors`` / ``logits_tensors`` take batches already on the device). State is always saved
    on the CPU, so a snapshot loads anywhere.
    """

    def __init__(self, *, model: nn.Module, config: LearnerConfig, loss: Loss | None = None) -> None:
        self.config = config
        self.model = model
        self.loss = loss if loss is not None else make_loss(config.strategy, config.alpha)
        self.device = torch.device("cpu")
        self.generator = self._seed_dropout(self.device)
        self.optimizers = self._make_optimizers(config.optimizer)
        self.steps = 0
        self._pending_rng: tuple[str, torch.Tensor] | None = None

    @property
    def spec(self):
        return self.config.spec

    def _seed_dropout(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device).manual_seed(self.config.seed)
        for m in self.model.modules():
            if isinstance(m, GenDropout):
                m.generator = generator
        return generator

    def _make_optimizers(self, opt: OptimizerConfig) -> dict[str, torch.optim.Optimizer]:
        tables = [m.weight for m in self.model.modules() if isinstance(m, nn.Embedding)]
        table_ids = {id(p) for p in tables}
        sparse_params = [
            p for m in self.model.modules() if isinstance(m, nn.Embedding) and m.sparse for p in (m.weight,)
        ]
        sparse_ids = {id(p) for p in sparse_params}
        dense_tables = [p for p in tables if id(p) not in sparse_ids]
        rest = [p for p in self.model.parameters() if id(p) not in table_ids and p.requires_grad]
        groups = [
            g
            for g in (
                {"params": rest, "weight_decay": opt.weight_decay},
                {"params": dense_tables, "weight_decay": opt.embedding_weight_decay},
            )
            if g["params"]
        ]
        optimizers: dict[str, torch.optim.Optimizer] = {}
        if groups:
            optimizers["dense"] = _fused_adam(groups, opt.lr)
        if sparse_params:
            lr = opt.embedding_lr or opt.lr
            optimizers["embedding"] = (
                torch.optim.SparseAdam(sparse_params, lr=lr)
                if opt.embedding_optimizer == "adam"
                else torch.optim.Adagrad(sparse_params, lr=lr)
            )
        return optimizers

    def to(self, device: torch.device | str) -> TorchLearner:
        """Move the model and optimizer state. Dropout draws from a generator on the device: reseeded from
        the config's seed, or set from a loaded state that was saved on this device type."""
        device = torch.device(device)
        if device == self.device:
            return self
        self.model.to(device)
        for o in self.optimizers.values():
            # Fused/capturable Adam keeps its step counters on the parameters' device, the others on the CPU.
            steps_follow = bool(o.defaults.get("fused") or o.defaults.get("capturable"))
            for state in o.state.values():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and (k != "step" or steps_follow):
                        state[k] = v.to(device)
        self.device = device
        self.generator = self._seed_dropout(device)
        pending = self._pending_rng
        if pending is not None and pending[0] == device.type:
            self.generator.set_state(pending[1])  # a state saved on this device type, loaded elsewhere
            self._pending_rng = None
        return self

    def logits_tensors(self, batch: TorchFeatureBatch) -> torch.Tensor:
        """Eval-mode logits without gradient for a batch already on the learner's device."""
        self.model.eval()
        with torch.inference_mode():
            return self.model(batch)["logit"]

    def forward_logits(self, batch: FeatureBatch) -> torch.Tensor:
        """Logits (on the CPU) in eval mode without gradient, for callers needing raw scores."""
        return self.logits_tensors(batch.to_torch(self.device)).cpu()

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        return torch.sigmoid(self.forward_logits(batch).double()).numpy()

    def hidden(self, batch: FeatureBatch) -> np.ndarray:
        """The representation under the output layer, float32 [B, H] (ReLoop2's memory key)."""
        self.model.eval()
        with torch.inference_mode():
            return self.model(batch.to_torch(self.device))["hidden"].float().cpu().numpy()

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
        yl, w = _as_tensor(y_last, "y_last", n), _as_tensor(weights, "weights", n)
        if self.device.type != "cpu":
            y, yl, w = (None if t is None else t.to(self.device) for t in (y, yl, w))
        return self.learn_tensors(batch.to_torch(self.device), y, yl, w)

    def learn_tensors(
        self,
        batch: TorchFeatureBatch,
        labels: torch.Tensor,
        y_last: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> LossStats:
        """``learn`` for tensors already on the learner's device (y_last NaN = unknown)."""
        n = len(batch)
        self.model.train()
        out = self.model(batch)
        loss, stats = self.loss(out["logit"], labels, y_last, weights)
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
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            # copies on the CPU: optimizer.state_dict() shares its tensors with the live optimizer
            "optimizers": {k: _to_cpu(o.state_dict()) for k, o in self.optimizers.items()},
            "rng": self.generator.get_state(),
            "rng_device": self.device.type,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"learner state format {state.get('format')!r}, expected {STATE_FORMAT}")
        check_same_architecture(state, self.config)
        self.model.load_state_dict(state["model"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])  # torch casts the state to each parameter's device
        self._pending_rng = None
        rng_device = state.get("rng_device", "cpu")
        if rng_device == self.device.type:
            self.generator.set_state(state["rng"])
        else:  # generator states do not transfer between device types: applied by to(rng_device)
            self._pending_rng = (rng_device, state["rng"])
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
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(batch.to_torch(self.device))["logit"]
            return torch.sigmoid(logits.double()).cpu().numpy()

    def hidden(self, batch: FeatureBatch) -> np.ndarray:
        with torch.inference_mode():
            return self.model(batch.to_torch(self.device))["hidden"].float().cpu().numpy()

    def learn(self, batch, labels, y_last=None, weights=None) -> LossStats:
        raise RuntimeError("a frozen learner only predicts")

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config_json": self.config.to_json(),
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_architecture(state, self.config)
        self.model.load_state_dict(state["model"])

    def clone_frozen(self) -> FrozenTorchLearner:
        return FrozenTorchLearner(model=copy.deepcopy(self.model), config=self.config)
