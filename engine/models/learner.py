"""The Learner protocol every backbone sits behind (torch and river alike), and its torch implementation.

A learner owns a model, its optimizer(s) and its loss; the trainer owns batching and periods; the model
(an ``nn.Module``) owns only the forward pass. State is tensors and plain types only, so snapshots
load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import orjson
import torch
from reloop.engine.checkpoint.registry import SnapshotMismatch, check_state_format
from reloop.engine.features.featurizer import FeatureBatch, TorchFeatureBatch
from reloop.engine.loss.losses import Loss, LossStats, make_loss
from reloop.engine.models.blocks import GenDropout
from reloop.engine.models.config import LearnerConfig, OptimizerConfig
from reloop.engine.models.finite import (
    DENSE_NOT_FINITE,
    DIVERGED_HINT,
    TrainingDiverged,
    count_unlearnable,
    finite_rows,
    first_not_finite,
    no_samples_stats,
    take_rows,
)
from reloop.engine.models.wide import OnlineWide
from torch import nn

log = logging.getLogger("reloop.learner")

STATE_FORMAT = 1

# torch's sparse Adagrad builds its update with sparse_coo_tensor and warns once that invariant checks
# are off; the indices come from an embedding gradient, which satisfies them.
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


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
    if name == "labels":
        check_labels(arr)
    return torch.from_numpy(arr)


def check_labels(labels: np.ndarray) -> None:
    """ValueError unless every label is a probability: -1/1 or 0/2 labels trained without a word (the
    loss went negative), and a NaN one was left out as if a feature value were too large."""
    if not bool(((labels >= 0) & (labels <= 1)).all()):  # NaN fails both comparisons
        bad = labels[~((labels >= 0) & (labels <= 1))]
        raise ValueError(f"labels must be in [0, 1] (1 = clicked, 0 = not), got {float(bad[0])!r}")


def _numpy_batch(batch: TorchFeatureBatch) -> FeatureBatch:
    return FeatureBatch(
        cat=batch.cat.cpu().numpy(),
        num=batch.num.cpu().numpy(),
        multi=batch.multi.cpu().numpy(),
        multi_mask=batch.multi_mask.cpu().numpy(),
    )


def _sigmoid64(z: np.ndarray) -> np.ndarray:
    """The one logistic every scoring path uses (float64; bit-identical across them)."""
    return torch.sigmoid(torch.from_numpy(np.asarray(z, dtype=np.float64))).numpy()


def _make_wide(config: LearnerConfig) -> OnlineWide | None:
    opt = config.optimizer
    if opt.wide == "off":
        return None
    return OnlineWide(config.spec, opt.wide_prior_variance, opt.wide_moderate)


def _load_wide(wide: OnlineWide | None, state: dict[str, Any]) -> None:
    """A state with a wide part needs a learner with one; a state without it (made before the wide part
    existed, or with ``wide=off``) starts this learner's wide part from its prior."""
    if "wide" in state:
        if wide is None:
            raise ValueError("learner state has a wide part (optimizer.wide='bayes'); this learner has none")
        wide.load_state_dict(state["wide"])
    elif wide is not None:
        wide.reset()


# Weight of a step's size in the moving average of samples per step (about the last 10 steps).
STEP_SIZE_SMOOTHING = 0.1
# A gradient beyond this comes from a value the model cannot take (1e30 under the identity transform
# gives an LR about 1e28 with a finite logit): squared into Adagrad's or Adam's float32 state it
# overflows to inf, and that parameter never moves again. Sound gradients are many orders smaller.
MAX_GRADIENT = 1e15


def _fused_adam(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # fused kernels missing on this build/device
        return torch.optim.Adam(groups, lr=lr)


class StateDoesNotFit(SnapshotMismatch, ValueError):
    """A learner state made for another model or optimizer kind than the config builds: every restore
    point of the run fails alike, so a resuming stage stops at the first (a ``SnapshotMismatch``: exit
    2) instead of refusing them one by one."""


def check_same_architecture(state: dict[str, Any], config: LearnerConfig) -> None:
    """Refuse a state made for another backbone, model config or feature spec (the loss and the
    optimizer settings may differ: a CE-trained state can continue under ReLoop)."""
    if "config_json" not in state:
        return
    stored = orjson.loads(state["config_json"])
    mine = config.to_dict()
    for key in ("backbone", "model", "spec"):
        if stored.get(key) != mine[key]:
            raise StateDoesNotFit(
                f"learner state has a different {_WHERE[key]}: {_difference(stored.get(key), mine[key])}; "
                "a model of another shape cannot resume from it; keep the settings it was made with, or "
                "start a fresh checkpoint dir"
            )


# Where each part of a learner's config comes from in a run config.
_WHERE = {
    "backbone": "backbone (model.backbone)",
    "model": "model (model.params)",
    "spec": "spec (model.spec)",
}


def _difference(saved: Any, now: Any, limit: int = 3, at: str = "") -> str:
    """What differs between two config values, briefly: the first few differing keys of two mappings and
    the first differing mapping of two lists of one length, followed down to the values that differ
    (``fields[2].buckets: 64 in the state, 65 now``), else both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        parts = [
            _difference(saved.get(k), now.get(k), limit, f"{at}.{k}" if at else str(k)) for k in keys[:limit]
        ]
        return "; ".join(parts) + (f"; {len(keys) - limit} more" if len(keys) > limit else "")
    if isinstance(saved, list) and isinstance(now, list) and _named(saved) and _named(now):
        names_saved, names_now = [d["name"] for d in saved], [d["name"] for d in now]
        if names_saved != names_now:  # fields added, removed or reordered: name them
            gone = [n for n in names_saved if n not in names_now]
            new = [n for n in names_now if n not in names_saved]
            parts = [f"only in the state: {', '.join(gone)}"] if gone else []
            parts += [f"only now: {', '.join(new)}"] if new else []
            return f"{at}: {'; '.join(parts) or 'the same names in another order'}"
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        i = next(i for i, (a, b) in enumerate(zip(saved, now, strict=True)) if a != b)
        if isinstance(saved[i], dict) and isinstance(now[i], dict):  # a list of scalars reads whole
            return _difference(saved[i], now[i], limit, f"{at}[{i}]")
    where = f"{at}: " if at else ""
    return f"{where}{_short(saved)} in the state, {_short(now)} now"


def _named(items: list[Any]) -> bool:
    return all(isinstance(d, dict) and isinstance(d.get("name"), str) for d in items)


def _short(value: Any, width: int = 80) -> str:
    text = orjson.dumps(value).decode() if value is not None else "none"
    return text if len(text) <= width else text[: width - 3] + "..."


def check_same_optimizers(saved: dict[str, Any], optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Refuse optimizer states of another kind than the live optimizers (Adagrad's per-row sums where
    SparseAdam wants its moments): torch loads them without a word, and the first step then failed with
    ``KeyError('betas')``, retried as a transient failure. Told apart by the settings of their parameter
    groups, which every version of torch saves."""
    for name, optimizer in optimizers.items():
        state = saved.get(name)
        if state is None:
            raise StateDoesNotFit(
                f"learner state has no {name} optimizer (model.optimizer, model.params.sparse_embeddings "
                "changed?): keep the settings it was made with, or start a fresh checkpoint dir"
            )
        was, now = _kind(state), _kind(optimizer.state_dict())
        if was != now:
            key = " (model.optimizer.embedding_optimizer)" if name == "embedding" else ""
            raise StateDoesNotFit(
                f"learner state's {name} optimizer is {was}, this config's is {now}{key}: an optimizer's "
                "saved state fits only its own kind; keep it, or start a fresh checkpoint dir"
            )


def _kind(optimizer_state: dict[str, Any]) -> str:
    groups = optimizer_state.get("param_groups") or [{}]
    if "initial_accumulator_value" in groups[0]:
        return "adagrad"
    return "adam" if "betas" in groups[0] else "unknown"


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
        # Found once, not at every step (none by default): a step that stops or is skipped restores them.
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.loss = loss if loss is not None else make_loss(config.strategy, config.alpha)
        self.device = torch.device("cpu")
        self.generator = self._seed_dropout(self.device)
        self.optimizers = self._make_optimizers(config.optimizer)
        self.wide = _make_wide(config)
        self.steps = 0
        # Steps whose gradients were not all finite (a value the model cannot take, e.g. a numeric feature
        # of 1e39 under an identity transform): not applied, so one bad sample cannot turn every later
        # prediction into NaN. Counted, and logged.
        self.skipped_steps = 0
        self.skipped_samples = 0  # in skipped steps, and rows left out of a step (engine/models/finite.py)
        # Samples per step, a moving average: it picks the learning rates (OptimizerConfig.rates). An average,
        # not each step's size, so that the last partial batch of a run of full ones keeps the batch rates.
        self.step_size_average: float | None = None
        # The rates a restored snapshot last stepped at, when only the first step tells this run's.
        self._rates_unchecked: dict[str, list[Any]] | None = None
        self._pending_rng: tuple[str, torch.Tensor] | None = None
        # Data parallel (engine/train/data_parallel.py): called after backward with this rank's sample
        # count; it replaces every gradient with the average over all ranks' samples and returns their count.
        self.grad_sync: Callable[[int], int] | None = None

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
            optimizers["dense"] = _fused_adam(groups, opt.effective_lr(self.config.backbone))
        if sparse_params:
            lr = opt.effective_embedding_lr(self.config.backbone)
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
        """Scoring logits (on the CPU, float64 with a wide part) in eval mode without gradient: the
        backbone's, plus the wide part's when there is one."""
        deep = self.logits_tensors(batch.to_torch(self.device)).cpu()
        if self.wide is None:
            return deep
        return torch.from_numpy(self.wide.logits(batch, deep.double().numpy()))

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        return torch.sigmoid(self.forward_logits(batch).double()).numpy()

    def _train_forward_is_eval_forward(self) -> bool:
        """No dropout or batch norm: the training forward's logits are the eval-mode scores."""
        cached = getattr(self, "_same_forward", None)
        if cached is None:
            cached = not any(
                (isinstance(m, GenDropout) and m.p > 0) or isinstance(m, nn.modules.batchnorm._BatchNorm)
                for m in self.model.modules()
            )
            self._same_forward = cached
        return cached

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
        return self._learn(batch, labels, y_last, weights, scored=False)[1]

    def learn_scored(
        self,
        batch: FeatureBatch,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> tuple[np.ndarray, LossStats]:
        """Predict-then-learn in one call: (P(click) of each sample from BEFORE it was learned, stats).

        The backbone scores the batch as it was before this step; the wide part (if any) scores each
        sample after learning every earlier sample of the batch, one event at a time. Without dropout
        or batch norm the backbone's training forward pass doubles as its scoring pass."""
        probs, stats = self._learn(batch, labels, y_last, weights, scored=True)
        assert probs is not None
        return probs, stats

    def learn_replay(
        self,
        batch: FeatureBatch,
        labels: np.ndarray,
        y_last: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> LossStats:
        """A step on samples learned before (a replay buffer's draw): the backbone learns; the wide part,
        whose belief already counts these samples, only gives its offset (learning them again would
        count the same evidence twice)."""
        if self.wide is None:
            return self.learn(batch, labels, y_last, weights)
        n = len(batch)
        y = _as_tensor(labels, "labels", n)
        assert y is not None
        yl, w = _as_tensor(y_last, "y_last", n), _as_tensor(weights, "weights", n)
        if self.device.type != "cpu":
            y, yl, w = (None if t is None else t.to(self.device) for t in (y, yl, w))
        return self._step(
            batch.to_torch(self.device), y, yl, w, batch, y_last, weights, None, wide_learns=False
        )[2]

    def _learn(
        self,
        batch: FeatureBatch,
        labels: np.ndarray,
        y_last: np.ndarray | None,
        weights: np.ndarray | None,
        scored: bool,
    ) -> tuple[np.ndarray | None, LossStats]:
        keep = finite_rows(batch)
        if keep is not None:
            return self._learn_finite_rows(keep, batch, labels, y_last, weights, scored)
        n = len(batch)
        y = _as_tensor(labels, "labels", n)
        assert y is not None
        yl, w = _as_tensor(y_last, "y_last", n), _as_tensor(weights, "weights", n)
        eval_deep: np.ndarray | None = None
        if scored and not self._train_forward_is_eval_forward():
            eval_deep = self.logits_tensors(batch.to_torch(self.device)).double().cpu().numpy()
        if self.device.type != "cpu":
            y, yl, w = (None if t is None else t.to(self.device) for t in (y, yl, w))
        try:
            deep, wide_scores, stats = self._step(
                batch.to_torch(self.device),
                y,
                yl,
                w,
                batch,
                y_last,
                weights,
                eval_deep,
                want_deep=scored,
                refuse_rows=True,
            )
        except _RowsRefused as exc:
            return self._learn_finite_rows(exc.keep, batch, labels, y_last, weights, scored, exc.why)
        if not scored:
            return None, stats
        logits = next(x for x in (wide_scores, eval_deep, deep) if x is not None)
        return _sigmoid64(logits), stats

    def learn_tensors(
        self,
        batch: TorchFeatureBatch,
        labels: torch.Tensor,
        y_last: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> LossStats:
        """``learn`` for tensors already on the learner's device (y_last NaN = unknown). The wide part,
        if any, reads the batch on the CPU."""
        if self.wide is None:
            return self._step(batch, labels, y_last, weights, None, None, None, None)[2]
        host = _numpy_batch(batch)
        yl = None if y_last is None else y_last.detach().cpu().numpy()
        w = None if weights is None else weights.detach().cpu().numpy()
        return self._step(batch, labels, y_last, weights, host, yl, w, None)[2]

    def _step(
        self,
        batch: TorchFeatureBatch,
        labels: torch.Tensor,
        y_last: torch.Tensor | None,
        weights: torch.Tensor | None,
        host: FeatureBatch | None,
        host_y_last: np.ndarray | None,
        host_weights: np.ndarray | None,
        eval_deep: np.ndarray | None,
        want_deep: bool = False,
        wide_learns: bool = True,
        refuse_rows: bool = False,
    ) -> tuple[np.ndarray | None, np.ndarray | None, LossStats]:
        """One optimisation step; returns (the backbone's training-forward logits if asked or used,
        the wide part's per-event scoring logits if any, stats).

        With a wide part, the backbone's logits go through the wide part's per-event pass first, and the
        backbone then learns with the updated wide logits as a constant offset. For a backbone whose
        training forward differs from its scoring one (dropout, batch norm), the wide part learns and
        scores against the eval-mode logits (``eval_deep``, computed here when not given): it corrects
        the scores it is added to, and the training forward's logits differ from those by the batch's
        own statistics (AFN+'s batch norm: LogLoss 2.78 against 0.59 on MovieLens's selection weeks,
        ablation.md). ``refuse_rows``: rows whose logits are not finite end the step before it learns
        anything (``_refuse_rows``)."""
        n = len(batch)
        if (
            self.wide is not None
            and wide_learns
            and eval_deep is None
            and not self._train_forward_is_eval_forward()
        ):
            eval_deep = self.logits_tensors(batch).double().cpu().numpy()
        self.model.train()
        norms = self._norm_buffers()  # a skipped step must not leave its batch in BN's running stats
        # A step that starts again without some rows draws the same dropout masks as if they had never
        # been in it (the generator's state: 5 KB on the CPU, a copy of about a microsecond).
        rng = self.generator.get_state() if refuse_rows else None
        out = self.model(batch)
        logit = out["logit"]
        if refuse_rows and not bool(torch.isfinite(logit).all()):
            self._refuse_rows(batch, eval_deep, norms, rng)
        deep: np.ndarray | None = None
        wide_scores: np.ndarray | None = None
        if self.wide is not None or want_deep:
            deep = logit.detach().double().cpu().numpy()
        if self.wide is not None:
            assert deep is not None
            if host is None:
                host = _numpy_batch(batch)
        if self.wide is not None and wide_learns:
            wide_scores = self.wide.learn(
                host,
                deep if eval_deep is None else eval_deep,
                labels.detach().cpu().numpy(),
                self.loss,
                host_y_last,
                host_weights,
                score_deep=eval_deep,
            )
        if self.wide is not None:
            offset, _ = self.wide.moments(host)
            logit = logit + torch.from_numpy(offset).to(device=logit.device, dtype=logit.dtype)
        loss, stats = self.loss(logit, labels, y_last, weights)
        loss = self._with_embedding_l2(loss, out, n)
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        loss.backward()
        checked = False
        if refuse_rows and self.wide is None and host is not None:
            # Checked here, before any data-parallel sync: a rank finds its own rows to blame.
            checked = self._gradients_sound()
            if not checked:
                self._blame_rows(host, labels, y_last, weights, norms, rng)
        if not self._apply_gradients(n, checked=checked and self.grad_sync is None):
            for buffer, saved in norms:
                buffer.copy_(saved)
        return deep, wide_scores, stats

    def _blame_rows(
        self,
        host: FeatureBatch,
        labels: torch.Tensor,
        y_last: torch.Tensor | None,
        weights: torch.Tensor | None,
        norms: list[tuple[torch.Tensor, torch.Tensor]],
        rng: torch.Tensor | None,
    ) -> None:
        """The step's gradients are not sound: find the rows to blame by halving the batch (a half's
        gradient, each row weighted as in the whole batch, is tested only when its parent failed: about
        two full-batch backward passes for one bad row), then raise ``_RowsRefused`` so the step goes on
        without them, before it learns anything. Returns, the step's gradients and batch-norm statistics
        as they were, when no row fails on its own (the step's guard then skips it)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        saved_norms = [(b, b.clone()) for b, _ in norms]
        n = len(host)
        bad = np.zeros(n, dtype=bool)
        bad[0] = n == 1
        pending = [(n // 2, n), (0, n // 2)] if n > 1 else []  # the whole batch already failed
        while pending:
            lo, hi = pending.pop()
            if self._part_sound(host, labels, y_last, weights, lo, hi, n):
                continue
            if hi - lo == 1:
                bad[lo] = True
            else:
                mid = (lo + hi) // 2
                pending += [(mid, hi), (lo, mid)]
        if bad.any():
            self._restart(norms, rng)
            raise _RowsRefused(np.flatnonzero(~bad), _GRADIENT_NOT_SOUND)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        for buffer, saved in saved_norms:
            buffer.copy_(saved)

    def _restart(self, norms: list[tuple[torch.Tensor, torch.Tensor]], rng: torch.Tensor | None) -> None:
        """Batch-norm statistics and the dropout generator as before the step (it starts again)."""
        for buffer, saved in norms:
            buffer.copy_(saved)
        if rng is not None:
            self.generator.set_state(rng)

    def _part_sound(
        self,
        host: FeatureBatch,
        labels: torch.Tensor,
        y_last: torch.Tensor | None,
        weights: torch.Tensor | None,
        lo: int,
        hi: int,
        n: int,
    ) -> bool:
        """Whether rows ``lo:hi`` of a batch of ``n`` give a sound gradient on their own."""
        rows = slice(lo, hi)
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        alone = hi - lo == 1 and bool(self._norms)
        if alone:  # batch norm cannot train on one row: its running statistics stand in for the batch's
            self.model.eval()
        try:
            out = self.model(host.take(rows).to_torch(self.device))
        finally:
            self.model.train()
        part = [None if t is None else t[rows] for t in (y_last, weights)]
        loss, _ = self.loss(out["logit"], labels[rows], *part)
        loss = self._with_embedding_l2(loss * ((hi - lo) / n), out, n)  # each row's share of the batch's mean
        loss.backward()
        return self._gradients_sound()

    def _with_embedding_l2(self, loss: torch.Tensor, out: dict[str, Any], n: int) -> torch.Tensor:
        """The step's loss plus the L2 penalty on the embeddings it used (per sample of a batch of ``n``)."""
        l2 = self.config.optimizer.embedding_l2
        if l2 > 0:
            loss = loss + l2 * sum(e.square().sum() for e in out["embeddings"]) / n
        return loss

    def _refuse_rows(
        self,
        batch: TorchFeatureBatch,
        eval_deep: np.ndarray | None,
        norms: list[tuple[torch.Tensor, torch.Tensor]],
        rng: torch.Tensor | None,
    ) -> None:
        """Training logits that are not finite, from finite inputs (a value too large for the model, as
        1e30 under the identity transform): raise ``_RowsRefused`` with the rows whose eval-mode
        logits are finite, so the step goes on without the others, before anything learnt from this
        batch (batch-norm statistics restored). Returns when no row is to blame on its own (batch norm
        mixes the rows in training; its statistics then keep out this batch): the step's gradients
        decide (``_apply_gradients``)."""
        for buffer, saved in norms:  # first: the training forward just put this batch in them
            buffer.copy_(saved)
        scores = eval_deep if eval_deep is not None else self.logits_tensors(batch).double().cpu().numpy()
        ok = np.isfinite(scores)
        if not ok.all():
            self._check_not_diverged(batch, np.flatnonzero(~ok))
        self.model.train()  # logits_tensors left it in eval mode; the step goes on in training mode
        if not ok.all():
            self._restart([], rng)
            raise _RowsRefused(np.flatnonzero(ok), _LOGIT_NOT_FINITE)

    def _check_not_diverged(self, batch: TorchFeatureBatch, rows: np.ndarray) -> None:
        """Rows whose eval-mode logits are not finite: blame the model, not them, when their logits are
        still not finite with their dense inputs zeroed (their ids alone: weights that are not finite, or
        too large for any input). Leaving such rows out would dead-letter every later sample that uses
        them: raise ``TrainingDiverged`` instead. Runs only when rows are refused (one small forward)."""
        index = torch.from_numpy(rows).to(batch.cat.device)
        probe = TorchFeatureBatch(
            cat=batch.cat[index],
            num=torch.zeros_like(batch.num[index]),
            multi=batch.multi[index],
            multi_mask=batch.multi_mask[index],
        )
        if bool(torch.isfinite(self.logits_tensors(probe)).all()):
            return
        self.model.train()
        where = self.not_finite()
        if where is None:
            name, largest = max(
                ((n, float(p.detach().abs().max())) for n, p in self.model.named_parameters() if p.numel()),
                key=lambda item: item[1],
            )
            where = f"none is NaN or inf, but the largest |weight| is {largest:.3g} ({name!r})"
        raise TrainingDiverged(
            f"training diverged: the model's logits are not finite for {len(rows)} samples even with"
            f" their dense inputs zeroed; {where}; {DIVERGED_HINT}"
        )

    def not_finite(self) -> str | None:
        """Where the model's weights, buffers, optimizer moments or wide part first hold a value that is
        not finite (engine/models/finite.py), None when none does: one pass, no copy."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        moments = {
            k: {names.get(id(p), "?"): st for p, st in o.state.items()} for k, o in self.optimizers.items()
        }
        wide = {} if self.wide is None else {"wide": {"mean": self.wide.mean, "var": self.wide.var}}
        return first_not_finite({"model": self.model.state_dict(), "optimizers": moments, **wide})

    def _learn_finite_rows(
        self,
        keep: np.ndarray,
        batch: FeatureBatch,
        labels: np.ndarray,
        y_last: np.ndarray | None,
        weights: np.ndarray | None,
        scored: bool,
        why: str = DENSE_NOT_FINITE,
    ) -> tuple[np.ndarray | None, LossStats]:
        """``_learn`` of the rows ``keep`` (the others' dense inputs or logits are not finite, ``why``:
        engine/models/finite.py); the others are counted, and scored NaN (the model cannot score them)."""
        count_unlearnable(self, len(batch) - len(keep), why)
        if len(keep):
            probs, stats = self._learn(batch.take(keep), *take_rows(keep, labels, y_last, weights), scored)
        else:
            if self.grad_sync is not None:  # the other ranks wait for this one's part of the step
                self.idle_step()
            probs, stats = None, no_samples_stats(self.config.strategy, self.config.alpha)
        if not scored:
            return None, stats
        full = np.full(len(batch), np.nan)
        if probs is not None:
            full[keep] = probs
        return full, stats

    def _norm_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) for the running statistics of every batch-norm layer (none by default)."""
        return [(b, b.clone()) for m in self._norms for b in m.buffers()]

    def _apply_gradients(self, n: int, checked: bool = False) -> bool:
        """Average the gradients over the data-parallel ranks (if any), clip, step at the rates for the
        steps' recent size over all ranks (so every rank takes the same step). False when the step was
        skipped (a gradient not sound: ``_gradients_sound``; ``checked``: already found sound)."""
        step_samples = n if self.grad_sync is None else self.grad_sync(n)
        # After the sync: every rank sees the same gradients and skips alike.
        if not checked and not self._gradients_sound():
            self.skipped_steps += 1
            self.skipped_samples += n
            if self.skipped_steps & (self.skipped_steps - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...
                log.error(
                    "optimizer step skipped: a gradient is not sound (%d skipped so far); a feature value"
                    " the model cannot take? Bound it in the feature spec (minmax, log_bucket)",
                    self.skipped_steps,
                )
            return False
        last = self.step_size_average
        self.step_size_average = float(
            step_samples if last is None else last + STEP_SIZE_SMOOTHING * (step_samples - last)
        )
        opt = self.config.optimizer
        self._set_rates(*opt.rates(self.step_size_average, self.config.backbone))
        if self._rates_unchecked is not None:
            saved_lrs, self._rates_unchecked = self._rates_unchecked, None
            self._warn_changed_rates(saved_lrs)
        if opt.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.grad is not None and not p.grad.is_sparse],
                opt.grad_clip_norm,
            )
        for o in self.optimizers.values():
            o.step()
        self.steps += 1
        return True

    def _gradients_sound(self) -> bool:
        """Whether every gradient is finite and at most ``MAX_GRADIENT`` in magnitude, by the minimum
        and maximum of each (a NaN makes both NaN): one pass per tensor, 260-306 us a step against
        184-304 for a plain sum (DCN, Criteo-shaped, batch 1024), far less than ``isfinite(g).all()`` on
        a sparse gradient."""
        bounds = [
            torch.stack(torch.aminmax(g))
            for g in (
                p.grad._values() if p.grad.is_sparse else p.grad
                for p in self.model.parameters()
                if p.grad is not None
            )
            if g.numel()
        ]
        return not bounds or bool((torch.stack(bounds).abs() <= MAX_GRADIENT).all())

    def learning_rates(self) -> dict[str, float]:
        """The rate each optimizer steps at now (``dense``, ``embedding``): the batch or small-step rates."""
        return {name: float(o.param_groups[0]["lr"]) for name, o in self.optimizers.items()}

    def _set_rates(self, dense: float, tables: float) -> None:
        for name, o in self.optimizers.items():
            lr = tables if name == "embedding" else dense
            for group in o.param_groups:
                group["lr"] = lr

    def idle_step(self) -> None:
        """A data-parallel step in which this rank has no samples: it contributes zero gradients and
        applies the others' average like every rank, so all ranks keep the same weights."""
        if self.grad_sync is None:
            raise RuntimeError("idle_step is for a data-parallel rank (set grad_sync first)")
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=True)
        self._apply_gradients(0)

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
            "step_size_average": self.step_size_average,
            **({"wide": self.wide.state_dict()} if self.wide is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A newer one (a rollback): the stage stops (engine/runtime/restore.py), not resuming from before it.
        check_state_format(state, STATE_FORMAT, "learner state")
        check_same_architecture(state, self.config)
        check_same_optimizers(state["optimizers"], self.optimizers)
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
        average = state.get("step_size_average")  # absent from states saved before it existed
        self.step_size_average = None if average is None else float(average)
        _load_wide(self.wide, state)
        saved_lrs = {
            name: [g.get("lr") for g in optimizer.get("param_groups", [])]
            for name, optimizer in state["optimizers"].items()
        }
        self._rates_unchecked = None
        if self.step_size_average is None and self.steps > 0:
            # Saved before the average was recorded (an upgrade): the rates this config steps at are
            # known at the first step, and compared then (they were never compared).
            self._rates_unchecked = saved_lrs
        else:
            self._warn_changed_rates(saved_lrs)

    def _warn_changed_rates(self, saved_lrs: dict[str, list[Any]]) -> None:
        """Log where the rates this config steps at differ from those the snapshot last stepped at: a
        changed setting, or a changed default (the tables' rate per backbone), moves a resumed run's
        learning without any config edit; ``model.optimizer`` pins a rate."""
        if self.step_size_average is None:  # never stepped: no rate was used yet
            return
        opt = self.config.optimizer
        dense, tables = opt.rates(self.step_size_average, self.config.backbone)
        small = self.step_size_average < opt.small_steps_below
        for name in self.optimizers:
            now, key = (tables, "embedding_lr") if name == "embedding" else (dense, "lr")
            before = saved_lrs.get(name, [])
            if any(isinstance(lr, float) and not math.isclose(lr, now, rel_tol=1e-9) for lr in before):
                log.warning(
                    "resumed learner steps at another learning rate than its snapshot did",
                    extra={
                        "fields": {
                            "optimizer": name,
                            "snapshot_lr": before[0],
                            "lr": now,
                            "key": f"model.optimizer.{'small_step_' if small else ''}{key}",
                        }
                    },
                )

    def clone_frozen(self) -> FrozenTorchLearner:
        return FrozenTorchLearner(
            model=copy.deepcopy(self.model),
            config=self.config,
            wide=None if self.wide is None else self.wide.copy(),
        )


_LOGIT_NOT_FINITE = (
    "its logit is not finite from finite inputs (a numeric value too large for the model under the identity"
    " transform? Bound it in the feature spec: minmax, log_bucket)"
)
_GRADIENT_NOT_SOUND = (
    "its gradient is not finite or beyond MAX_GRADIENT (a numeric value too large for the model, or an"
    " infinite sample weight? Bound it in the feature spec: minmax, log_bucket)"
)


class _RowsRefused(Exception):
    """Raised inside a step, before it learns anything: ``keep`` = the rows to learn without the others,
    ``why`` = what is wrong with the others."""

    def __init__(self, keep: np.ndarray, why: str) -> None:
        super().__init__(f"{len(keep)} rows kept: the others' {why}")
        self.keep = keep
        self.why = why


class FrozenTorchLearner:
    """A predict-only copy of a torch learner (the last model that produces y_last)."""

    def __init__(self, *, model: nn.Module, config: LearnerConfig, wide: OnlineWide | None = None) -> None:
        self.config = config
        # Parameters keep requires_grad: flipping it changes some CPU kernels (BatchNorm), and the frozen
        # copy must predict bit-for-bit like the learner it was cloned from. inference_mode stops autograd.
        self.model = model.eval()
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.wide = wide if wide is not None or config.optimizer.wide == "off" else _make_wide(config)

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(batch.to_torch(self.device))["logit"]
        if self.wide is None:
            return torch.sigmoid(logits.double()).cpu().numpy()
        return _sigmoid64(self.wide.logits(batch, logits.double().cpu().numpy()))

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
            **({"wide": self.wide.state_dict()} if self.wide is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_same_architecture(state, self.config)
        self.model.load_state_dict(state["model"])
        _load_wide(self.wide, state)

    def clone_frozen(self) -> FrozenTorchLearner:
        return FrozenTorchLearner(
            model=copy.deepcopy(self.model),
            config=self.config,
            wide=None if self.wide is None else self.wide.copy(),
        )
