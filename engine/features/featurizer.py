"""Featurizer: raw feature dicts -> a columnar FeatureBatch of embedding-row ids and dense values.

Work is columnar: one list comprehension per field pulls the values out of the dicts (the only
per-sample Python), then hashing, bucketing and offsets are numpy operations over the whole column.
Columns may also be pyarrow arrays (the samples topic's batches, engine/events/sample_batch.py): strings
are hashed straight from the Arrow buffers and numbers read as numpy, with no Python object per value;
the rows are the same as for the same values given as Python objects.

>>> from reloop.engine.features.spec import CategoricalField, FeatureSpec, NumericField
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
import pyarrow as pa
import pyarrow.compute as pc
import torch
from reloop.engine.features.hashing import (
    Spans,
    arrow_spans,
    fnv1a_many,
    fnv1a_spans,
    is_missing,
    splitmix64,
    to_bucket,
    utf8_spans,
)
from reloop.engine.features.spec import CategoricalField, FeatureSpec, MultiCategoricalField, NumericField


@dataclass(frozen=True, slots=True)
class TorchFeatureBatch:
    """The tensors a model's forward reads (see FeatureBatch for shapes)."""

    cat: torch.Tensor
    num: torch.Tensor
    multi: torch.Tensor
    multi_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.cat.shape[0])

    def to(self, device: torch.device | str) -> TorchFeatureBatch:
        return TorchFeatureBatch(
            cat=self.cat.to(device),
            num=self.num.to(device),
            multi=self.multi.to(device),
            multi_mask=self.multi_mask.to(device),
        )


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


def log_bucket(x: np.ndarray) -> np.ndarray:
    """The Criteo-winners bucketing: floor(log(x)^2) for x > 2, else floor(x) (int64; nan -> 0)."""
    safe = np.where(np.isnan(x), 0.0, x)
    big = safe > 2
    with np.errstate(divide="ignore", invalid="ignore"):
        logged = np.floor(np.log(np.where(big, safe, 3.0)) ** 2)
    # Below -2**63 the cast to int64 is undefined in C (numpy warns "invalid value encountered in
    # cast"); -2**63 is what x86 gives them, so clamping there keeps their rows and defines them.
    small = np.maximum(np.floor(safe), -(2.0**63))
    return np.where(big, logged, small).astype(np.int64)


class Featurizer:
    """Turns feature dicts (or columns) into FeatureBatch rows for one FeatureSpec. Stateless: thread safe."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._names = tuple(f.name for f in spec.fields)

    def transform(self, features: Sequence[Mapping[str, Any]]) -> FeatureBatch:
        """Rows from one feature dict per sample (absent keys are missing values)."""
        names = self._names
        if not features:
            return self.transform_columns({name: () for name in names})
        # One C-level map per dict, then a transpose: the cheapest way out of row-shaped Python data.
        columns = zip(*[list(map(d.get, names)) for d in features], strict=True)
        return self.transform_columns(dict(zip(names, columns, strict=True)))

    def transform_columns(
        self, columns: Mapping[str, Sequence[Any] | pa.Array], *, rows: int | None = None
    ) -> FeatureBatch:
        """Rows from columnar input (field name -> one value per sample, a sequence or a pyarrow array;
        or a pandas DataFrame); absent fields are missing. ``rows`` gives the count when no column may be
        present."""
        if not isinstance(columns, Mapping) and hasattr(columns, "columns"):  # a DataFrame: by its columns
            frame = columns
            columns = {str(name): frame[name] for name in frame.columns}
        lengths = {len(c) for c in columns.values()}
        if rows is not None:
            lengths.add(rows)
        if len(lengths) > 1:
            raise FeatureError(f"columns have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        spec = self.spec
        missing_col = (None,) * n

        def col(name: str) -> Sequence[Any]:
            return columns.get(name, missing_col)

        # The categorical and bucketed numeric fields as two blocks (hashing a block costs about as much
        # as one column); bad values still fail in field order, naming the field.
        cat = np.zeros((n, len(spec.cat_fields)), dtype=np.int64)
        texts: list[tuple[int, CategoricalField, Spans]] = []
        numbers: list[tuple[int, NumericField, np.ndarray]] = []
        for j, f in enumerate(spec.cat_fields if n else ()):
            if isinstance(f, NumericField):
                numbers.append((j, f, self._floats(f, col(f.name))))
            else:
                texts.append((j, f, _spans(f, col(f.name))))
        if texts:
            h, missing = fnv1a_many([spans for _, _, spans in texts])
            self._put_block(cat, texts, np.where(missing, 0, to_bucket(h, _buckets(texts))))
        if numbers:
            x = np.stack([v for _, _, v in numbers])
            rows = to_bucket(splitmix64(log_bucket(x)), _buckets(numbers))
            self._put_block(cat, numbers, np.where(np.isnan(x), 0, rows))
        num = np.zeros((n, len(spec.dense_fields)), dtype=np.float32)
        for j, f in enumerate(spec.dense_fields):
            num[:, j] = self._dense(f, col(f.name))
        length = spec.max_multi_len
        multi = np.zeros((n, len(spec.multi_fields), length), dtype=np.int64)
        mask = np.zeros((n, len(spec.multi_fields), length), dtype=np.float32)
        for j, (f, offset) in enumerate(zip(spec.multi_fields, spec.multi_offsets, strict=True)):
            ids, m = self._multi(f, col(f.name), length)
            multi[:, j, :] = offset + ids
            mask[:, j, :] = m
        return FeatureBatch(cat=cat, num=num, multi=multi, multi_mask=mask)

    def _put_block(self, cat: np.ndarray, block: Sequence[tuple[int, Any, Any]], rows: np.ndarray) -> None:
        """Rows of a block of fields (one row of ``rows`` per field) into their columns of ``cat``."""
        index = [j for j, _, _ in block]
        offsets = np.asarray(self.spec.cat_offsets, dtype=np.int64)[index]
        cat[:, index] = (rows + offsets[:, None]).T

    @staticmethod
    def _hash(f: CategoricalField | MultiCategoricalField, values: Sequence[Any] | pa.Array) -> np.ndarray:
        buf, starts, lengths = _spans(f, values)
        return np.where(lengths == 0, 0, to_bucket(fnv1a_spans(buf, starts, lengths), f.buckets))

    @staticmethod
    def _floats(f: NumericField, values: Sequence[Any] | pa.Array) -> np.ndarray:
        if isinstance(values, pa.Array):
            if _is_numeric(values):
                # safe=False: an int64 beyond 2**53 rounds to the nearest double, as float() does
                # (a safe cast refuses it, and the door accepts any int).
                x = pc.cast(values, pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # null -> nan
                return _finite(f, x)
            values = values.to_pylist()  # numbers as text (rare): the Python rules below
        try:
            x = np.asarray(values, dtype=np.float64)  # None -> nan already
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int past the float range
            pass
        else:
            if x.shape == (len(values),):  # lists of equal length would make a matrix
                return _finite(f, x)
        return _finite(f, np.fromiter((_float(f, v) for v in values), dtype=np.float64, count=len(values)))

    def _dense(self, f: NumericField, values: Sequence[Any]) -> np.ndarray:
        x = self._floats(f, values)
        bound = f.max_abs
        if bound is not None and len(x) and np.nanmax(np.abs(x), initial=0.0) > bound:
            big = x[np.abs(x) > bound]  # nan compares False: missing values are not refused here
            raise FeatureError(
                f"field {f.name!r}: {float(big[0])!r} is beyond float32 (magnitude at most {bound:.7g})"
                f" under its {f.transform} transform"
            )
        if f.transform == "minmax":
            assert f.min is not None and f.max is not None
            x = np.clip((x - f.min) / (f.max - f.min), 0.0, 1.0)
        return np.where(np.isnan(x), f.fill, x)

    def _multi(
        self, f: MultiCategoricalField, values: Sequence[Any], length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(values)
        if isinstance(values, pa.Array) and pa.types.is_list(values.type):
            return self._multi_arrow(f, values, length)
        if isinstance(values, pa.Array):
            values = values.to_pylist()
        lists = []
        for v in values:
            if isinstance(v, list | tuple):
                lists.append(v[: f.max_len])
            elif isinstance(v, np.ndarray) and v.ndim == 1:  # what pandas.read_parquet gives a list cell
                lists.append(v[: f.max_len].tolist())
            elif is_missing(v) or (isinstance(v, str) and v == ""):
                lists.append(())
            else:
                raise FeatureError(f"field {f.name!r}: a list of strings expected, got {type(v).__name__}")
        counts = np.fromiter(map(len, lists), dtype=np.int64, count=n)
        ids = np.zeros((n, length), dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.float32)
        total = int(counts.sum())
        if total == 0:
            return ids, mask
        rows = self._hash(f, list(chain.from_iterable(lists)))
        rows_flat = np.repeat(np.arange(n), counts)
        starts = np.cumsum(counts) - counts
        cols_flat = np.arange(total) - np.repeat(starts, counts)
        ids[rows_flat, cols_flat] = rows
        mask[rows_flat, cols_flat] = (rows != 0).astype(np.float32)
        return ids, mask

    def _multi_arrow(
        self, f: MultiCategoricalField, values: pa.Array, length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``_multi`` for a list<string> array: the first ``max_len`` items of each row, from buffers."""
        n = len(values)
        offsets = values.offsets.to_numpy().astype(np.int64)
        counts = np.diff(offsets)
        if values.null_count:
            counts = np.where(values.is_null().to_numpy(zero_copy_only=False), 0, counts)
        keep = np.minimum(counts, f.max_len)
        ids = np.zeros((n, length), dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.float32)
        total = int(keep.sum())
        if total == 0:
            return ids, mask
        rows_flat = np.repeat(np.arange(n), keep)
        cols_flat = np.arange(total) - np.repeat(np.cumsum(keep) - keep, keep)
        items = values.values.take(pa.array(offsets[:-1][rows_flat] + cols_flat))
        rows = self._hash(f, items)
        ids[rows_flat, cols_flat] = rows
        mask[rows_flat, cols_flat] = (rows != 0).astype(np.float32)
        return ids, mask


def _float(f: NumericField, value: Any) -> float:
    """One numeric value the slow way: None and "" are missing (nan), anything float() cannot read
    (a numeric string can be read) raises FeatureError naming the field."""
    if is_missing(value) or (isinstance(value, str) and value == ""):
        return np.nan
    if isinstance(value, int | float | str):
        try:
            return float(value)
        except (OverflowError, ValueError) as exc:
            raise FeatureError(f"field {f.name!r}: numeric values expected ({exc})") from exc
    raise FeatureError(f"field {f.name!r}: numeric values expected, got {type(value).__name__}")


def _finite(f: NumericField, x: np.ndarray) -> np.ndarray:
    """``x`` unless it holds an infinity (NaN is a missing value): +-inf was bucketed by an undefined
    float -> int64 cast under log_bucket (+inf: row of INT64_MIN on x86, of INT64_MAX on ARM) and
    clipped under minmax, where the door (check.py) refuses it."""
    if np.isinf(x).any():
        raise FeatureError(
            f"field {f.name!r}: numeric values must be finite, got {float(x[np.isinf(x)][0])!r}"
        )
    return x


def _is_numeric(values: pa.Array) -> bool:
    kind = values.type
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)


def _spans(f: CategoricalField | MultiCategoricalField, values: Sequence[Any] | pa.Array) -> Spans:
    """A column's bytes to hash: strings as they are, other scalars as ``str()`` spells them; a bad value
    raises FeatureError naming the field."""
    try:
        if isinstance(values, pa.Array):
            values = _arrow_strings(values)
            return arrow_spans(values) if isinstance(values, pa.Array) else utf8_spans(values)
        return utf8_spans(values)
    except TypeError as exc:
        raise FeatureError(f"field {f.name!r}: {exc}") from exc
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" from json.loads): no UTF-8 bytes to hash
        raise FeatureError(f"field {f.name!r}: a string that is not valid Unicode ({exc.reason})") from exc


def _buckets(block: Sequence[tuple[int, Any, Any]]) -> np.ndarray:
    """The bucket counts of a block's fields, as a column to broadcast against its (fields, n) hashes."""
    return np.array([f.buckets for _, f, _ in block], dtype=np.uint64)[:, None]


def _arrow_strings(values: pa.Array) -> pa.Array | list[Any]:
    """A column to hash as text, the way ``str(value)`` spells it: strings as they are, integers cast
    in Arrow (the same decimal digits), anything else as Python values for ``utf8_spans``, which
    applies the rules of row input (a list or a dict is not a category: TypeError)."""
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return values
    if pa.types.is_integer(kind):
        return pc.cast(values, pa.string())
    if pa.types.is_null(kind):
        return pa.nulls(len(values), pa.string())
    return values.to_pylist()
