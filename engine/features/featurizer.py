"""Featurizer: raw feature dicts -> a columnar FeatureBatch of embedding-row ids and dense values.

Work is columnar: one list comprehension per field pulls the values out of the dicts (the only
per-sample Python), then hashing, bucketing and offsets are numpy operations over the whole column.

>>> from engine.features.spec import CategoricalField, FeatureSpec, NumericField
>>> spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=10), NumericField(name="x")))
>>> b = Featurizer(spec).transform([{"u": "alice", "x": 2.5}, {"x": None}])
>>> b.cat.shape, b.num.tolist(), int(b.cat[1, 0])
((2, 1), [[2.5], [0.0]], 0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from engine.features.hashing import fnv1a_strings, splitmix64, to_bucket
from engine.features.spec import CategoricalField, FeatureSpec, MultiCategoricalField, NumericField


@dataclass(frozen=True, slots=True)
class TorchFeatureBatch:
    """The tensors a model's forward reads (see FeatureBatch for shapes)."""

    cat: torch.Tensor
    num: torch.Tensor
    multi: torch.Tensor
    multi_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.cat.shape[0])


@dataclass(frozen=True, slots=True)
class FeatureBatch:
    """A featurised mini-batch; ids are GLOBAL rows of the spec's shared embedding table.

    * ``cat``: int64 [B, n_cat] (row 0 of each field's block = missing),
    * ``num``: float32 [B, n_dense] transformed dense values,
    * ``multi``: int64 [B, n_multi, L] padded ids, ``multi_mask``: float32 [B, n_multi, L] (1 = real value).
    """

    cat: np.ndarray
    num: np.ndarray
    multi: np.ndarray
    multi_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.cat.shape[0])

    def to_torch(self, device: torch.device | str | None = None) -> TorchFeatureBatch:
        return TorchFeatureBatch(
            cat=torch.from_numpy(self.cat).to(device),
            num=torch.from_numpy(self.num).to(device),
            multi=torch.from_numpy(self.multi).to(device),
            multi_mask=torch.from_numpy(self.multi_mask).to(device),
        )

    def take(self, index: np.ndarray | slice) -> FeatureBatch:
        """Rows selected by an index array or slice (a new batch; slices are views)."""
        return FeatureBatch(
            cat=self.cat[index],
            num=self.num[index],
            multi=self.multi[index],
            multi_mask=self.multi_mask[index],
        )

    @staticmethod
    def concat(batches: Sequence[FeatureBatch]) -> FeatureBatch:
        if not batches:
            raise ValueError("FeatureBatch.concat needs at least one batch")
        return FeatureBatch(
            cat=np.concatenate([b.cat for b in batches]),
            num=np.concatenate([b.num for b in batches]),
            multi=np.concatenate([b.multi for b in batches]),
            multi_mask=np.concatenate([b.multi_mask for b in batches]),
        )


class FeatureError(ValueError):
    """A feature value that cannot be read as its field's kind (names the field)."""


def _string_column(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, missing mask) of a column of scalar values, hashed by their str() form."""
    col = np.array(["" if v is None else v for v in values], dtype=str)
    missing = col == ""
    return fnv1a_strings(col), missing


def log_bucket(x: np.ndarray) -> np.ndarray:
    """The Criteo-winners bucketing: floor(log(x)^2) for x > 2, else floor(x) (int64; nan -> 0)."""
    safe = np.where(np.isnan(x), 0.0, x)
    big = safe > 2
    with np.errstate(divide="ignore", invalid="ignore"):
        logged = np.floor(np.log(np.where(big, safe, 3.0)) ** 2)
    return np.where(big, logged, np.floor(safe)).astype(np.int64)


class Featurizer:
    """Turns feature dicts into FeatureBatch rows for one FeatureSpec. Stateless, so it is thread safe."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec

    def transform(self, features: Sequence[Mapping[str, Any]]) -> FeatureBatch:
        spec = self.spec
        n = len(features)
        cat = np.zeros((n, len(spec.cat_fields)), dtype=np.int64)
        for j, (f, offset) in enumerate(zip(spec.cat_fields, spec.cat_offsets, strict=True)):
            cat[:, j] = offset + self._cat_rows(f, [d.get(f.name) for d in features])
        num = np.zeros((n, len(spec.dense_fields)), dtype=np.float32)
        for j, f in enumerate(spec.dense_fields):
            num[:, j] = self._dense(f, [d.get(f.name) for d in features])
        length = spec.max_multi_len
        multi = np.zeros((n, len(spec.multi_fields), length), dtype=np.int64)
        mask = np.zeros((n, len(spec.multi_fields), length), dtype=np.float32)
        for j, (f, offset) in enumerate(zip(spec.multi_fields, spec.multi_offsets, strict=True)):
            ids, m = self._multi(f, [d.get(f.name) for d in features], length)
            multi[:, j, :] = offset + ids
            mask[:, j, :] = m
        return FeatureBatch(cat=cat, num=num, multi=multi, multi_mask=mask)

    def _cat_rows(self, f: CategoricalField | NumericField, values: list[Any]) -> np.ndarray:
        if isinstance(f, NumericField):
            x = self._floats(f, values)
            rows = to_bucket(splitmix64(log_bucket(x)), f.buckets)
            return np.where(np.isnan(x), 0, rows)
        try:
            h, missing = _string_column(values)
        except (TypeError, ValueError) as exc:
            raise FeatureError(f"field {f.name!r}: categorical values must be scalars ({exc})") from exc
        return np.where(missing, 0, to_bucket(h, f.buckets))

    @staticmethod
    def _floats(f: NumericField, values: list[Any]) -> np.ndarray:
        try:
            return np.array([np.nan if v is None or v == "" else v for v in values], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise FeatureError(f"field {f.name!r}: numeric values expected ({exc})") from exc

    def _dense(self, f: NumericField, values: list[Any]) -> np.ndarray:
        x = self._floats(f, values)
        if f.transform == "minmax":
            assert f.min is not None and f.max is not None
            x = np.clip((x - f.min) / (f.max - f.min), 0.0, 1.0)
        return np.where(np.isnan(x), f.fill, x)

    @staticmethod
    def _multi(f: MultiCategoricalField, values: list[Any], length: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(values)
        lists = []
        for v in values:
            if v is None:
                lists.append(())
            elif isinstance(v, list | tuple):
                lists.append(v[: f.max_len])
            else:
                raise FeatureError(f"field {f.name!r}: a list of strings expected, got {type(v).__name__}")
        counts = np.fromiter((len(v) for v in lists), dtype=np.int64, count=n)
        ids = np.zeros((n, length), dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.float32)
        total = int(counts.sum())
        if total == 0:
            return ids, mask
        try:
            h, missing = _string_column(list(chain.from_iterable(lists)))
        except (TypeError, ValueError) as exc:
            raise FeatureError(f"field {f.name!r}: list items must be strings ({exc})") from exc
        rows_flat = np.repeat(np.arange(n), counts)
        starts = np.cumsum(counts) - counts
        cols_flat = np.arange(total) - np.repeat(starts, counts)
        ids[rows_flat, cols_flat] = np.where(missing, 0, to_bucket(h, f.buckets))
        mask[rows_flat, cols_flat] = np.where(missing, 0.0, 1.0)
        return ids, mask
