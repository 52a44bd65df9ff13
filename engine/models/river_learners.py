"""river learners behind the engine's Learner interface, trained with CE, KD or ReLoop.

Three backbones:

* ``river_lr``: river's ``linear_model.LogisticRegression``, one ``learn_one`` per sample.
* ``river_fm``: river's ``facto.FMClassifier``, one ``learn_one`` per sample. Its pairwise interactions
  are a Python loop over all field pairs, so it manages only ~400 samples/s on 39 fields: usable for a
  handful of fields only (docs/bench-river.md has the numbers).
* ``river_fm_np``: the same FM and the same plain-SGD update rule as ``river_fm`` (zeros for the linear
  weights, N(0, sigma) latents, intercept learned at ``intercept_lr``), written in numpy over a dense table
  indexed by the FeatureSpec's global rows. ``mode="sequential"`` updates after every sample exactly as
  river does (same parameters in, same parameters out, see the unit tests); ``mode="minibatch"`` takes
  one step per mini-batch with the batch-mean gradient (the convention of river's ``learn_many``), which
  is much faster but is a different optimiser: its learning rate must be larger.

How the loss reaches river: river asks its loss object for d(loss)/d(raw score) given (y, raw score).
ReLoop and KD also need the sample's ``y_last``, so ``ScoreGradientLoss`` is a river ``BinaryLoss`` that
carries the current sample's ``y_last`` and is set right before each ``learn_one``.

Features: a sample's river input is ``{global embedding row: value}``: 1.0 for a categorical id, the
dense value for a numeric field (its single row, the FuxiCTR convention) and 1/len for the values of a
multi-valued field (mean pooling). Row 0 of each field (missing value) is skipped.

>>> from reloop.engine.features.featurizer import Featurizer
>>> from reloop.engine.features.spec import CategoricalField, FeatureSpec
>>> spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=8), CategoricalField(name="i", buckets=8)))
>>> learner = build_river_learner("river_fm_np", spec, strategy="reloop", alpha=0.5, seed=0)
>>> learner.predict_proba(Featurizer(spec).transform([{"u": "a", "i": "b"}])).shape
(1,)
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from reloop.engine.checkpoint.registry import check_state_format
from reloop.engine.features.featurizer import FeatureBatch
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.loss import Loss, LossStats, make_loss
from reloop.engine.models.config import BackboneConfig, LearnerConfig
from reloop.engine.models.finite import learns_finite_rows
from reloop.engine.models.learner import check_labels, check_same_architecture
from reloop.engine.models.registry import BUILT_IN, build_learner, register_backbone
from river import facto, linear_model, optim, utils

RIVER_BACKBONES: tuple[str, ...] = ("river_lr", "river_fm", "river_fm_np")
FMMode = Literal["sequential", "minibatch"]
STATE_FORMAT = 1


def _sigmoid(z: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * z))  # overflow-free logistic


class ScoreGradientLoss(optim.losses.BinaryLoss):
    """A river BinaryLoss for CE / KD / ReLoop; set ``y_last`` before each ``learn_one``."""

    def __init__(self, strategy: str, alpha: float) -> None:
        self.loss = make_loss(strategy, alpha)  # validates the name and alpha with the engine's own rules
        self.strategy = strategy
        self.alpha = float(alpha)
        self.y_last = math.nan

    def __call__(self, y_true: Any, y_pred: Any) -> Any:
        z = np.atleast_1d(np.asarray(y_pred, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y_true, dtype=np.float64))
        return loss_stats(self.loss, z, y, np.full(z.shape, self.y_last), None).total

    def gradient(self, y_true: Any, y_pred: Any) -> Any:
        """d L / d z of one sample: the engine loss's scalar path (river calls it once per sample, and a
        numpy or torch call costs more than river's whole linear update; tested against autograd)."""
        return self.loss.event_gradient(_sigmoid(float(y_pred)), float(y_true), self.y_last)


class _Layout:
    """Maps a FeatureBatch to (ids, values) [B, K]: cat ids (value 1), dense rows (value), multi (1/len)."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.missing_rows = np.asarray(spec.cat_offsets, dtype=np.int64)
        self.dense_rows = np.asarray(spec.dense_rows, dtype=np.int64)

    def __call__(self, batch: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        n = len(batch)
        ids = [batch.cat]
        # A categorical id equal to its field's first row is the missing value: value 0 removes it.
        vals = [(batch.cat != self.missing_rows[None, :]).astype(np.float64)]
        if len(self.dense_rows):
            ids.append(np.broadcast_to(self.dense_rows, (n, len(self.dense_rows))))
            vals.append(batch.num.astype(np.float64))
        if batch.multi.shape[1]:
            counts = batch.multi_mask.sum(axis=2, keepdims=True)
            width = batch.multi.shape[1] * batch.multi.shape[2]  # not -1: an empty batch has none to infer
            ids.append(batch.multi.reshape(n, width))
            vals.append((batch.multi_mask / np.maximum(counts, 1.0)).reshape(n, width).astype(np.float64))
        return np.concatenate(ids, axis=1), np.concatenate(vals, axis=1)

    def dicts(self, batch: FeatureBatch) -> list[dict[int, float]]:
        ids, vals = self(batch)
        out = []
        for r, v in zip(ids.tolist(), vals.tolist(), strict=True):
            out.append({i: x for i, x in zip(r, v, strict=True) if x != 0.0})
        return out


def loss_stats(loss: Loss, raw: np.ndarray, labels: np.ndarray, y_last: np.ndarray | None,
               weights: np.ndarray | None) -> LossStats:
    """The engine loss's LossStats for the scores the updates were computed from (its torch definition,
    on float64 copies, without a graph)."""
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.tensor(np.asarray(a, dtype=np.float64).reshape(-1))

    with torch.no_grad():
        return loss(t(raw), t(labels), t(y_last), t(weights))[1]


def _check_lengths(n: int, labels: np.ndarray, y_last: np.ndarray | None, weights: np.ndarray | None) -> None:
    for name, arr in (("labels", labels), ("y_last", y_last), ("weights", weights)):
        if arr is not None and len(arr) != n:
            raise ValueError(f"learn: {name} has {len(arr)} values for a batch of {n}")


class RiverLRConfig(BackboneConfig):
    """river's SGD settings (river's defaults). The learner's ``optimizer`` section (torch) is unused."""

    embedding_dim: int = Field(default=1, ge=1, le=1)
    lr: float = Field(default=0.01, gt=0)
    intercept_lr: float = Field(default=0.01, ge=0)
    l2: float = Field(default=0.0, ge=0)
    clip_gradient: float = Field(default=1e12, gt=0, allow_inf_nan=True)  # inf: no clipping


class RiverFMConfig(RiverLRConfig):
    """``embedding_dim`` is river's ``n_factors`` (0 turns the numpy FM into river's LR)."""

    embedding_dim: int = Field(default=10, ge=0)
    init_sigma: float = Field(default=0.1, gt=0)


class NumpyFMConfig(RiverFMConfig):
    mode: FMMode = "sequential"


class _RiverLearnerBase:
    """Shared Learner plumbing: loss, feature layout, frozen copies."""

    backbone: str

    def __init__(self, config: LearnerConfig) -> None:
        if config.backbone != self.backbone:
            raise TypeError(f"{type(self).__name__} builds {self.backbone!r}, not {config.backbone!r}")
        self.config = config
        self.options = config.model
        self.strategy = config.strategy
        self.alpha = float(config.alpha)
        self.loss = make_loss(config.strategy, config.alpha)
        self.layout = _Layout(config.spec)
        self.frozen = False

    @property
    def loss(self) -> Loss:
        return self._loss

    @loss.setter
    def loss(self, value: Loss) -> None:
        # river's model computes its gradients through ``river_loss``: it must follow a loss set after
        # construction (train.delayed_feedback wraps it: FNW weights were silently left out).
        self._loss = value
        river_loss = getattr(self, "river_loss", None)
        if river_loss is not None:
            river_loss.loss = value

    @property
    def spec(self) -> FeatureSpec:
        return self.config.spec

    def _header(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "config_json": self.config.to_json()}

    def _check_state(self, state: dict[str, Any]) -> None:
        check_state_format(state, STATE_FORMAT, f"{self.backbone} state")
        check_same_architecture(state, self.config)

    def clone_frozen(self) -> _RiverLearnerBase:
        """An independent copy that predicts like this one now and refuses to learn."""
        clone = copy.deepcopy(self)
        clone.frozen = True
        return clone

    def _check_learn(self, batch: FeatureBatch, labels: np.ndarray, y_last: np.ndarray | None,
                     weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.frozen:
            raise RuntimeError(f"{self.backbone}: a frozen clone cannot learn")
        _check_lengths(len(batch), labels, y_last, weights)
        n = len(batch)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        check_labels(y)
        yl = np.full(n, np.nan) if y_last is None else np.asarray(y_last, dtype=np.float64).reshape(-1)
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        return y, yl, w


class RiverLogisticRegression(_RiverLearnerBase):
    """river's LogisticRegression, one learn_one per sample with the engine's loss."""

    backbone = "river_lr"

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__(config)
        options = self.options
        self.river_loss = ScoreGradientLoss(self.strategy, self.alpha)
        self.river_loss.loss = self.loss
        self.model = linear_model.LogisticRegression(
            optimizer=optim.SGD(options.lr),
            loss=self.river_loss,
            l2=options.l2,
            intercept_lr=options.intercept_lr,
            clip_gradient=options.clip_gradient,
        )

    def _raw_one(self, x: dict[int, float]) -> float:
        return self.model._raw_dot_one(x)

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        dicts = self.layout.dicts(batch)
        raw = np.fromiter((self._raw_one(x) for x in dicts), dtype=np.float64, count=len(batch))
        return 1.0 / (1.0 + np.exp(-raw))

    @learns_finite_rows
    def learn(self, batch: FeatureBatch, labels: np.ndarray, y_last: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> LossStats:
        y, yl, w = self._check_learn(batch, labels, y_last, weights)
        raw = np.empty(len(batch))
        learn_one, raw_one, rl = self.model.learn_one, self.model._raw_dot_one, self.river_loss
        # Python scalars: river's per-sample arithmetic is several times slower on numpy scalars.
        ys, yls, ws = y.tolist(), yl.tolist(), w.tolist()
        for i, x in enumerate(self.layout.dicts(batch)):
            raw[i] = raw_one(x)
            rl.y_last = yls[i]
            learn_one(x, ys[i], ws[i])
        return loss_stats(self.loss, raw, y, y_last, weights)

    def state_dict(self) -> dict[str, Any]:
        weights = self.model._weights.to_dict()
        keys = np.fromiter(weights.keys(), dtype=np.int64, count=len(weights))
        return {
            **self._header(),
            "keys": torch.from_numpy(keys),
            "values": torch.tensor([weights[k] for k in keys.tolist()], dtype=torch.float64),
            "intercept": float(self.model.intercept),
            "n_iterations": int(self.model.optimizer.n_iterations),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        keys, values = state["keys"].tolist(), state["values"].tolist()
        self.model._weights = utils.VectorDict(dict(zip(keys, values, strict=True)))
        self.model.intercept = float(state["intercept"])
        self.model.optimizer.n_iterations = int(state["n_iterations"])


class RiverFM(_RiverLearnerBase):
    """river's FMClassifier, one learn_one per sample with the engine's loss (slow on many fields)."""

    backbone = "river_fm"

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__(config)
        options, seed = self.options, config.seed
        self.river_loss = ScoreGradientLoss(self.strategy, self.alpha)
        self.river_loss.loss = self.loss
        self.model = facto.FMClassifier(
            n_factors=options.embedding_dim,
            weight_optimizer=optim.SGD(options.lr),
            latent_optimizer=optim.SGD(options.lr),
            loss=self.river_loss,
            l2_weight=options.l2,
            l2_latent=options.l2,
            intercept_lr=options.intercept_lr,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=options.init_sigma, seed=seed),
            clip_gradient=options.clip_gradient,
            seed=seed,
        )

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        raw = np.fromiter((self.model._raw_dot(x) for x in self.layout.dicts(batch)), dtype=np.float64,
                          count=len(batch))
        return 1.0 / (1.0 + np.exp(-raw))

    @learns_finite_rows
    def learn(self, batch: FeatureBatch, labels: np.ndarray, y_last: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> LossStats:
        y, yl, w = self._check_learn(batch, labels, y_last, weights)
        raw = np.empty(len(batch))
        model, rl = self.model, self.river_loss
        ys, yls, ws = y.tolist(), yl.tolist(), w.tolist()
        for i, x in enumerate(self.layout.dicts(batch)):
            raw[i] = model._raw_dot(x)
            rl.y_last = yls[i]
            model.learn_one(x, ys[i], ws[i])
        return loss_stats(self.loss, raw, y, y_last, weights)

    def state_dict(self) -> dict[str, Any]:
        m = self.model
        wkeys = list(m.weights.keys())
        lkeys = list(m.latents.keys())
        rng_name, rng_keys, rng_pos, has_gauss, cached = m.latent_initializer._rng.get_state()
        return {
            **self._header(),
            "weight_keys": torch.tensor(wkeys, dtype=torch.int64),
            "weights": torch.tensor([m.weights[k] for k in wkeys], dtype=torch.float64),
            "latent_keys": torch.tensor(lkeys, dtype=torch.int64),
            "latents": torch.from_numpy(np.stack([m.latents[k] for k in lkeys]) if lkeys
                                        else np.zeros((0, m.n_factors))),
            "intercept": float(m.intercept),
            "weight_iterations": int(m.weight_optimizer.n_iterations),
            "latent_iterations": int(m.latent_optimizer.n_iterations),
            # The latent initialiser draws lazily, so its RNG is state: a restored model must draw the
            # same vectors for features it has not seen yet.
            "rng_keys": torch.from_numpy(rng_keys.astype(np.int64)),
            "rng_pos": int(rng_pos),
            "rng_has_gauss": int(has_gauss),
            "rng_cached": float(cached),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        m = self.model
        m.weights.clear()
        m.weights.update(zip(state["weight_keys"].tolist(), state["weights"].tolist(), strict=True))
        m.latents.clear()
        for k, v in zip(state["latent_keys"].tolist(), state["latents"].numpy(), strict=True):
            m.latents[k] = v.astype(np.float64).copy()
        m.intercept = float(state["intercept"])
        m.weight_optimizer.n_iterations = int(state["weight_iterations"])
        m.latent_optimizer.n_iterations = int(state["latent_iterations"])
        m.latent_initializer._rng.set_state((
            "MT19937", state["rng_keys"].numpy().astype(np.uint32), int(state["rng_pos"]),
            int(state["rng_has_gauss"]), float(state["rng_cached"]),
        ))


class NumpyFM(_RiverLearnerBase):
    """river's FMClassifier math (plain SGD) on a dense numpy table.

    ``embedding_dim=0`` is river's LogisticRegression math when ``l2 == 0`` (river's LR applies its l2
    to every weight at every step, its FM only to the sample's features; this class does the latter).
    The table is initialised eagerly (river draws each latent lazily on first sight), so the two agree
    exactly once they start from the same parameters, which is how the tests compare them.
    """

    backbone = "river_fm_np"

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__(config)
        options = self.options
        rng = np.random.default_rng(config.seed)
        rows = config.spec.total_rows
        self.w0 = 0.0
        self.w = np.zeros(rows, dtype=np.float64)
        self.v = rng.normal(0.0, options.init_sigma, size=(rows, options.embedding_dim))
        self.steps = 0

    def raw_scores(self, batch: FeatureBatch) -> np.ndarray:
        ids, vals = self.layout(batch)
        return self._raw(ids, vals)

    def _raw(self, ids: np.ndarray, vals: np.ndarray) -> np.ndarray:
        linear = (self.w[ids] * vals).sum(axis=1)
        xv = self.v[ids] * vals[..., None]
        s = xv.sum(axis=1)
        pair = 0.5 * ((s * s).sum(axis=1) - (xv * xv).sum(axis=(1, 2)))
        return self.w0 + linear + pair

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        raw = self.raw_scores(batch)
        return 1.0 / (1.0 + np.exp(-raw))

    @learns_finite_rows
    def learn(self, batch: FeatureBatch, labels: np.ndarray, y_last: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> LossStats:
        y, yl, w = self._check_learn(batch, labels, y_last, weights)
        ids, vals = self.layout(batch)
        if self.options.mode == "sequential":
            raw = self._learn_sequential(ids, vals, y, yl, w)
        else:
            raw = self._learn_minibatch(ids, vals, y, y_last, w)
        return loss_stats(self.loss, raw, y, y_last, weights)

    def _learn_sequential(self, ids: np.ndarray, vals: np.ndarray, y: np.ndarray, yl: np.ndarray,
                          w: np.ndarray) -> np.ndarray:
        # Per-sample numpy calls dominate here, so one-hot rows (the common case) take a path with as
        # few calls as possible and all scalars are Python floats.
        o = self.options
        lr, ilr, l2, clip = o.lr, o.intercept_lr, o.l2, o.clip_gradient
        event_gradient = self.loss.event_gradient  # the loss's scalar path (per sample)
        W, V = self.w, self.v
        one_hot = (vals == 1.0).all(axis=1).tolist()
        ys, yls, ws = y.tolist(), yl.tolist(), w.tolist()
        raw = [0.0] * len(ys)
        w0 = self.w0
        for i in range(len(ys)):
            r = ids[i]
            if one_hot[i] and l2 == 0.0:
                wr, vr = W[r], V[r]
                s = vr.sum(axis=0)
                z = w0 + float(wr.sum()) + 0.5 * (float(s.dot(s)) - float(np.vdot(vr, vr)))
                g = min(max(event_gradient(_sigmoid(z), ys[i], yls[i]), -clip), clip) * ws[i]
                step = lr * g
                W[r] = wr - step
                vr += step * (vr - s)  # vr is a copy (fancy index): v_j -= lr * g * (s - v_j)
                V[r] = vr
            else:
                x = vals[i]
                keep = x != 0.0
                r, x = r[keep], x[keep]
                wr, vr = W[r], V[r]
                xcol = x[:, None]
                xv = vr * xcol
                s = xv.sum(axis=0)
                z = w0 + float(wr @ x) + 0.5 * (float(s @ s) - float((xv * xv).sum()))
                # river order: clamp the loss gradient, then scale it by the sample weight.
                g = min(max(event_gradient(_sigmoid(z), ys[i], yls[i]), -clip), clip) * ws[i]
                W[r] = wr - lr * (g * x + l2 * wr)
                V[r] = vr - lr * (g * (xcol * s - vr * (xcol * xcol)) + l2 * vr)
            raw[i] = z
            w0 -= ilr * g
        self.w0 = w0
        self.steps += len(ys)
        return np.asarray(raw)

    def _learn_minibatch(self, ids: np.ndarray, vals: np.ndarray, y: np.ndarray, y_last: np.ndarray | None,
                         w: np.ndarray) -> np.ndarray:
        o = self.options
        n = len(y)
        emb = self.v[ids]  # [B, F, k], gathered once for the scores and the gradients
        xv = emb * vals[..., None]
        s = xv.sum(axis=1)
        pair = 0.5 * ((s * s).sum(axis=1) - (xv * xv).sum(axis=(1, 2)))
        raw = self.w0 + (self.w[ids] * vals).sum(axis=1) + pair
        g = self.loss.raw_gradient(raw, y, y_last, None)
        g = np.clip(g, -o.clip_gradient, o.clip_gradient) * w
        uniq, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        m = len(uniq)
        gx = (g[:, None] * vals).reshape(-1)  # d raw / d w_j per occurrence, times g
        per_occ = gx[:, None] * (np.repeat(s, ids.shape[1], axis=0) - xv.reshape(-1, xv.shape[2]))
        wr, vr = self.w[uniq], self.v[uniq]
        grad_w = np.bincount(inverse, weights=gx, minlength=m)
        # One bincount per factor: much cheaper than np.add.at on [occurrences, k].
        grad_v = np.stack([np.bincount(inverse, weights=per_occ[:, c], minlength=m)
                           for c in range(per_occ.shape[1])], axis=1) if per_occ.shape[1] else vr * 0.0
        if o.l2:
            counts = np.bincount(inverse, weights=(vals.reshape(-1) != 0.0).astype(np.float64), minlength=m)
            grad_w += o.l2 * counts * wr
            grad_v += o.l2 * counts[:, None] * vr
        # Batch mean, like river's learn_many.
        self.w0 -= o.intercept_lr * float(g.sum()) / n
        self.w[uniq] = wr - o.lr * grad_w / n
        self.v[uniq] = vr - o.lr * grad_v / n
        self.steps += 1
        return raw

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._header(),
            "w0": float(self.w0),
            "w": torch.from_numpy(self.w.copy()),
            "v": torch.from_numpy(self.v.copy()),
            "steps": int(self.steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        w, v = state["w"].numpy(), state["v"].numpy()
        if w.shape != self.w.shape or v.shape != self.v.shape:
            raise ValueError(f"river_fm_np: state shapes {w.shape}/{v.shape} do not match {self.w.shape}/"
                             f"{self.v.shape}")
        self.w0 = float(state["w0"])
        self.w = w.astype(self.w.dtype).copy()
        self.v = v.astype(self.v.dtype).copy()
        self.steps = int(state["steps"])


register_backbone("river_lr", RiverLRConfig, RiverLogisticRegression,
                  "river LogisticRegression, learn_one per sample", "river")
register_backbone("river_fm", RiverFMConfig, RiverFM,
                  "river FMClassifier, learn_one per sample (slow beyond a few fields)", "river")
register_backbone("river_fm_np", NumpyFMConfig, NumpyFM,
                  "river FMClassifier math in numpy: sequential (exact) or minibatch", "river")
BUILT_IN.update(("river_lr", "river_fm", "river_fm_np"))


def build_river_learner(backbone: str, spec: FeatureSpec, strategy: str = "ce", alpha: float = 0.0,
                        seed: int = 0, **model_config: Any) -> _RiverLearnerBase:
    """``registry.build_learner`` restricted to the river backbones (a wrong name fails naming them)."""
    if backbone not in RIVER_BACKBONES:
        raise ValueError(f"unknown river backbone {backbone!r}; choose one of {list(RIVER_BACKBONES)}")
    learner = build_learner(backbone, spec, strategy, alpha, seed, **model_config)
    assert isinstance(learner, _RiverLearnerBase)
    return learner


__all__ = [
    "RIVER_BACKBONES",
    "NumpyFM",
    "NumpyFMConfig",
    "RiverFM",
    "RiverFMConfig",
    "RiverLRConfig",
    "RiverLogisticRegression",
    "ScoreGradientLoss",
    "build_river_learner",
]
