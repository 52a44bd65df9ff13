"""Deterministic, vectorised hashing of strings and integers into buckets.

Python's ``hash()`` is salted per process, so it can never decide an embedding row. These hashes are
64-bit FNV-1a over the Unicode code points of a string (numpy ``U`` arrays are UCS-4, so each code
point is one uint32 column) and the splitmix64 finaliser for integers: the same value gets the same
row in every process and on every machine.

>>> bool(fnv1a_strings(np.array(["a"]))[0] == fnv1a_strings(np.array(["a", "bb"]))[0])
True
"""

from __future__ import annotations

import numpy as np

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)
_U64 = np.uint64


def fnv1a_strings(values: np.ndarray) -> np.ndarray:
    """uint64 FNV-1a of each string in a numpy unicode array; trailing padding is not hashed."""
    if values.dtype.kind != "U":
        raise TypeError(f"fnv1a_strings needs a numpy unicode array, got dtype {values.dtype}")
    n = values.shape[0]
    width = values.dtype.itemsize // 4
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    if n == 0 or width == 0:
        return h
    codes = np.ascontiguousarray(values).view(np.uint32).reshape(n, width).astype(np.uint64)
    lengths = np.strings.str_len(values)
    # Fold a position into the hash only while it is inside the string, so the batch's widest string
    # (which sets the array width) never changes another string's hash.
    with np.errstate(over="ignore"):
        for j in range(width):
            active = lengths > j
            mixed = (h ^ codes[:, j]) * FNV_PRIME
            h = np.where(active, mixed, h)
    return h


def splitmix64(values: np.ndarray) -> np.ndarray:
    """uint64 mix of int64 values (the splitmix64 finaliser): neighbouring ints land far apart."""
    with np.errstate(over="ignore"):
        z = values.astype(np.int64).view(np.uint64) + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def to_bucket(h: np.ndarray, buckets: int) -> np.ndarray:
    """Map hashes to rows 1..buckets-1 (row 0 is kept for the missing value)."""
    return (h % _U64(buckets - 1)).astype(np.int64) + 1
