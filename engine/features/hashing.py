"""Deterministic, vectorised hashing of strings and integers into buckets.

Python's ``hash()`` is salted per process, so it can never decide an embedding row. Strings use 64-bit
FNV-1a over their UTF-8 bytes (the standard definition, so other languages can reproduce the rows),
integers the splitmix64 finaliser: the same value gets the same row in every process and machine.

>>> hex(int(fnv1a_utf8(["a", "foobar"])[0][0])), hex(int(fnv1a_utf8(["a", "foobar"])[0][1]))
('0xaf63dc4c8601ec8c', '0x85944171f73967e8')
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
_U64 = np.uint64


_SCALARS = (str, int, float, bool, np.integer, np.floating)


def is_missing(value: Any) -> bool:
    """None, a float NaN or pandas' NA: a missing value, as dataframes write one (a NaN in a column of
    strings was hashed as the category "nan", and pandas.NA refused)."""
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return bool(value != value)
    pandas = sys.modules.get("pandas")  # only where pandas is in use: never imported here
    return pandas is not None and value is getattr(pandas, "NA", None)


def _as_strings(values: Sequence[Any]) -> list[str]:
    out = []
    for v in values:
        if type(v) is str:
            out.append(v)
        elif is_missing(v):
            out.append("")
        elif isinstance(v, _SCALARS):
            out.append(str(v))
        else:
            raise TypeError(f"a scalar value expected, got {type(v).__name__}")
    return out


Spans = tuple[np.ndarray, np.ndarray, np.ndarray]  # (bytes, start of each value, length of each value)


def fnv1a_utf8(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 FNV-1a of each value's str() as UTF-8, mask of missing values: None or "").

    The strings are joined into one buffer and hashed column by column (one numpy pass per byte
    position up to the longest string), so the Python work per value is a join and a len().
    """
    buf, starts, lengths = utf8_spans(values)
    return fnv1a_spans(buf, starts, lengths), lengths == 0


def fnv1a_arrow(array: Any) -> tuple[np.ndarray, np.ndarray]:
    """``fnv1a_utf8`` of a pyarrow string array, read straight from its offsets and data buffers (no
    Python object per value). Nulls and empty strings are missing, as None and "" are."""
    buf, starts, lengths = arrow_spans(array)
    return fnv1a_spans(buf, starts, lengths), lengths == 0


def fnv1a_many(spans: Sequence[Spans]) -> tuple[np.ndarray, np.ndarray]:
    """The hashes of k columns of n values each (``utf8_spans`` / ``arrow_spans``), as (k, n) arrays
    with the missing mask: the buffers are joined and hashed in one numpy pass per byte position, not
    one per column, so a batch's categorical columns cost about as much as one column."""
    if not spans:
        return np.empty((0, 0), np.uint64), np.empty((0, 0), bool)
    shift = np.cumsum([0] + [len(buf) for buf, _, _ in spans[:-1]])
    buf = np.concatenate([b for b, _, _ in spans])
    starts = np.concatenate([s + d for (_, s, _), d in zip(spans, shift, strict=True)])
    lengths = np.stack([ln for _, _, ln in spans])
    return fnv1a_spans(buf, starts, lengths.ravel()).reshape(lengths.shape), lengths == 0


def utf8_spans(values: Sequence[Any]) -> Spans:
    """(UTF-8 bytes, start, length) of each value's str(); None and "" have length 0. A value that is
    not a scalar raises TypeError."""
    try:
        joined = "".join(values)  # fast path: all str
        strings: Sequence[str] = values
    except TypeError:
        strings = _as_strings(values)
        joined = "".join(strings)
    data = joined.encode("utf-8")
    n = len(strings)
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=n)
    if len(data) != len(joined):  # non-ASCII somewhere: lengths in bytes differ from lengths in chars
        lengths = np.fromiter((len(s.encode("utf-8")) for s in strings), dtype=np.int64, count=n)
    return np.frombuffer(data, dtype=np.uint8), np.cumsum(lengths) - lengths, lengths


def arrow_spans(array: Any) -> Spans:
    """(data bytes, start, length) of each value of a pyarrow string array; a null has length 0."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    n = len(array)
    wide = pa.types.is_large_string(array.type)
    if not (wide or pa.types.is_string(array.type)):
        raise TypeError(f"a string array expected, got {array.type}")
    validity, offsets_buf, data_buf = array.buffers()
    # count=: a buffer may be longer than its array needs (and then not a whole number of offsets).
    offsets = np.frombuffer(offsets_buf, dtype=np.int64 if wide else np.int32, count=array.offset + n + 1)
    offsets = offsets[array.offset :].astype(np.int64)
    lengths = np.diff(offsets)
    if validity is not None and array.null_count:
        lengths = np.where(array.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    if data_buf is None:
        return np.empty(0, np.uint8), offsets[:-1], lengths
    first = int(offsets[0])  # a slice of a larger array: keep only its own bytes
    buf = np.frombuffer(data_buf, dtype=np.uint8)[first : int(offsets[-1])]
    return buf, offsets[:-1] - first, lengths


def fnv1a_spans(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """FNV-1a (uint64) of each byte span ``buf[starts[i] : starts[i] + lengths[i]]``."""
    n = len(lengths)
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    if n == 0 or not buf.size or not lengths.any():
        return h
    longest = int(lengths.max())
    if int(lengths.min()) == longest:  # one length (ids of a fixed format): no sort, no prefixes
        _fnv1a_rounds(h, buf, starts, [n] * longest)
        return h
    # Longest first: at byte position j the strings still running are a prefix of this order, so the
    # work is the total byte count, not (number of values x longest value).
    order = np.argsort(-lengths, kind="stable")
    running = np.cumsum(np.bincount(lengths)[::-1])[::-1]  # running[j] = #values longer than j-1
    hs = h[order]
    _fnv1a_rounds(hs, buf, starts[order], [int(k) for k in running[1 : longest + 1]])
    h[order] = hs
    return h


def _fnv1a_rounds(h: np.ndarray, buf: np.ndarray, starts: np.ndarray, running: Sequence[int]) -> None:
    """In place: byte round j folds ``buf[starts[i] + j]`` into ``h[i]`` for the first running[j] i."""
    for j, k in enumerate(running):
        head = h[:k]
        np.bitwise_xor(head, buf[starts[:k] + j], out=head)
        np.multiply(head, FNV_PRIME, out=head)


def splitmix64(values: np.ndarray) -> np.ndarray:
    """uint64 mix of int64 values (the splitmix64 finaliser): neighbouring ints land far apart."""
    with np.errstate(over="ignore"):
        z = values.astype(np.int64).view(np.uint64) + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def to_bucket(h: np.ndarray, buckets: int | np.ndarray) -> np.ndarray:
    """Map hashes to rows 1..buckets-1 (row 0 is kept for the missing value); ``buckets`` may be an
    array that broadcasts against ``h`` (one count per column of a block)."""
    return (h % (np.asarray(buckets, dtype=np.uint64) - _U64(1))).astype(np.int64) + 1
