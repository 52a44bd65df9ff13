"""ReLoop2's error memory as a locality-sensitive-hashing sketch (docs/method.md, "ReLoop2").

Keys are a hidden layer of the base model; values are (label, base prediction). The sketch has
``n_tables`` hash tables of ``2 ** n_bits`` buckets; a key's bucket in a table is the sign pattern of
``n_bits`` random hyperplane projections (signed random projections: nearby keys by angle share
buckets). Each bucket holds the sums of the labels and base predictions written to it and their
count, so a write and a read are O(n_tables) and the memory is fixed whatever the traffic. Over every
bucket a key hits (count-weighted across tables): ``Y`` = sum of labels, ``B`` = sum of base
predictions, ``N`` = count; ``n0 = prior_count`` pseudo-samples shrink the estimate towards the base.

* ``form="residual"`` (ReLoop2's ``y = clamp(y_base + lambda * y_err, 0, 1)``, y_err the neighbours'
  mean error): ``p = p_base + lam * (Y - B) / (N + n0)``;
* ``form="label"`` (the setting of ReLoop2's experiments: interpolate with the neighbours' mean label):
  ``p = (1 - lam) * p_base + lam * (Y + n0 * p_base) / (N + n0)``.

Both are clipped to ``[eps, 1 - eps]`` (eps keeps the log loss finite); an empty neighbourhood leaves
``p_base`` as it is.

Hidden layers after a ReLU are non-negative, so hyperplanes through the origin would put almost every
key on the same side; keys are centred first, on the mean of the first batch written after a reset
(frozen until the next reset, so a key's buckets do not move while the memory fills).

State is numpy arrays only (``state_dict`` / ``load_state_dict``), saved with ``np.savez`` and read with
``allow_pickle=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

STATE_FORMAT = 1
EPS = 1e-4


@dataclass(frozen=True, slots=True)
class SketchConfig:
    n_tables: int = 4
    n_bits: int = 8
    lam: float = 0.3
    prior_count: float = 0.0
    form: Literal["residual", "label"] = "residual"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_tables < 1 or not 1 <= self.n_bits <= 24:
            raise ValueError(f"need n_tables >= 1 and 1 <= n_bits <= 24, got {self.n_tables}, {self.n_bits}")
        if not 0.0 <= self.lam <= 1.0 or self.prior_count < 0:
            raise ValueError(f"need 0 <= lam <= 1 and prior_count >= 0, got {self.lam}, {self.prior_count}")
        if self.form not in ("residual", "label"):
            raise ValueError(f"form must be 'residual' or 'label', got {self.form!r}")


class ErrorSketch:
    """The LSH error memory over keys of dimension ``dim``. Not thread-safe (callers lock)."""

    def __init__(self, dim: int, config: SketchConfig = SketchConfig()) -> None:
        if dim < 1:
            raise ValueError(f"key dimension must be >= 1, got {dim}")
        self.dim = dim
        self.config = config
        c = config
        rng = np.random.default_rng([c.seed, dim])
        self.planes = rng.standard_normal((dim, c.n_tables * c.n_bits)).astype(np.float32)
        self._planes_t = torch.from_numpy(self.planes)
        # Sign bits -> bucket number per table as one small matmul: block-diagonal powers of two (exact in
        # float32 up to 2^24, hence n_bits <= 24), plus each table's offset in the flat arrays.
        pack = np.zeros((c.n_tables * c.n_bits, c.n_tables), dtype=np.float32)
        for t in range(c.n_tables):
            pack[t * c.n_bits : (t + 1) * c.n_bits, t] = 2.0 ** np.arange(c.n_bits)
        self._pack_t = torch.from_numpy(pack)
        self._offsets = (np.arange(c.n_tables, dtype=np.int64) << c.n_bits)[None, :]
        self._center_t: torch.Tensor | None = None
        size = c.n_tables << c.n_bits
        # labels, base predictions, counts: rows of one array, so a read is one gather
        self._sums = np.zeros((3, size), dtype=np.float64)
        self.labels, self.base, self.counts = self._sums
        self.center: np.ndarray | None = None
        self.written = 0

    def reset(self) -> None:
        self._sums[:] = 0.0
        self._set_center(None)
        self.written = 0

    def _set_center(self, center: np.ndarray | None) -> None:
        self.center = center
        self._center_t = None if center is None else torch.from_numpy(np.asarray(center, dtype=np.float32))

    def buckets(self, keys: np.ndarray) -> np.ndarray:
        """Flat bucket index of each key in each table, int64 [B, n_tables]."""
        x = torch.as_tensor(np.asarray(keys, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"keys must be [B, {self.dim}], got {tuple(x.shape)}")
        # torch, not numpy, multiplies: numpy's BLAS starts its own threads, which on a busy machine cost
        # 18 ms instead of 0.07 ms per 512 keys (measured); torch follows the process's thread setting.
        # Subtract, then project (not x @ P - c @ P): a key at the centre gets exact zeros, whatever the
        # batch it comes in (matmul rounding depends on the batch shape).
        if self._center_t is not None:
            x = x - self._center_t
        bits = ((x @ self._planes_t) > 0).to(torch.float32)
        return (bits @ self._pack_t).numpy().astype(np.int64) + self._offsets

    def write(self, keys: np.ndarray, labels: np.ndarray, base: np.ndarray) -> None:
        """Add (label_i, base prediction_i) to the buckets of ``key_i``."""
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if len(y) == 0:
            return
        if self.center is None:
            self._set_center(np.asarray(keys, dtype=np.float32).mean(0))
        idx = self.buckets(keys).ravel()
        size, k = len(self.counts), self.config.n_tables
        self.labels += np.bincount(idx, weights=np.repeat(y, k), minlength=size)
        self.base += np.bincount(
            idx, weights=np.repeat(np.asarray(base, np.float64).reshape(-1), k), minlength=size
        )
        self.counts += np.bincount(idx, minlength=size)
        self.written += len(y)

    def read(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Y, B, N) per key: sums of labels and of base predictions, and the count, over its buckets."""
        n = len(keys)
        if self.written == 0:
            return np.zeros(n), np.zeros(n), np.zeros(n)
        y, b, c = self._sums[:, self.buckets(keys)].sum(-1)
        return y, b, c

    def correct(self, base: np.ndarray, keys: np.ndarray, lam: float | None = None) -> np.ndarray:
        """The corrected prediction of each key (module docstring); ``lam`` defaults to the config's."""
        return self.apply(base, *self.read(keys), lam=self.config.lam if lam is None else lam)

    def apply(self, base: np.ndarray, y: np.ndarray, b: np.ndarray, n: np.ndarray, lam: float) -> np.ndarray:
        """The correction from a ``read``'s sums (one read serves several lams)."""
        p = np.asarray(base, dtype=np.float64)
        n0 = self.config.prior_count
        denom = n + n0
        safe = np.where(denom > 0, denom, 1.0)
        if self.config.form == "residual":
            out = p + lam * np.where(denom > 0, (y - b) / safe, 0.0)
        else:
            out = np.where(denom > 0, (1.0 - lam) * p + lam * (y + n0 * p) / safe, p)
        return np.clip(out, EPS, 1.0 - EPS)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, np.ndarray]:
        c = self.config
        return {
            "format": np.array(STATE_FORMAT),
            "shape": np.array([self.dim, c.n_tables, c.n_bits, c.seed], dtype=np.int64),
            "labels": self.labels.copy(),
            "base": self.base.copy(),
            "counts": self.counts.copy(),
            "center": np.zeros(0, np.float32) if self.center is None else self.center.copy(),
            "written": np.array(self.written, dtype=np.int64),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Refuses a state made with another key size, table layout or hyperplane seed."""
        if int(state["format"]) != STATE_FORMAT:
            raise ValueError(f"error sketch state format {int(state['format'])}, expected {STATE_FORMAT}")
        c = self.config
        mine = [self.dim, c.n_tables, c.n_bits, c.seed]
        if np.asarray(state["shape"]).tolist() != mine:
            raise ValueError(f"error sketch state is for (dim, tables, bits, seed) = "
                             f"{np.asarray(state['shape']).tolist()}, this sketch is {mine}")  # fmt: skip
        # Checked before anything is assigned: a short array broadcast silently (one value in every
        # bucket) and a centre of another length failed every later read, i.e. every scored request.
        sums = [np.asarray(state[k], dtype=np.float64) for k in ("labels", "base", "counts")]
        center = np.asarray(state["center"], dtype=np.float32)
        written = int(state["written"])
        if any(a.shape != self.counts.shape for a in sums) or center.shape not in ((0,), (self.dim,)):
            raise ValueError(
                f"error sketch state arrays have shapes {[a.shape for a in sums]} and centre {center.shape}; "
                f"this sketch needs {self.counts.shape} and ({self.dim},)"
            )
        if not all(np.isfinite(a).all() for a in (*sums, center)) or (sums[2] < 0).any() or written < 0:
            raise ValueError("error sketch state holds non-finite sums or negative counts")
        self.labels[:], self.base[:], self.counts[:] = sums
        self._set_center(center.copy() if center.size else None)
        self.written = written
