"""Large ``bytes`` in a snapshot part as uint8 tensors.

torch.save pickles with protocol 2 (the one ``torch.load(weights_only=True)`` reads), which writes a
``bytes`` object through a latin-1 string: ~2.3 s for 170 MB here, and about as long to load. A tensor's
storage is written and read as it is (a join state of that size: 35 ms to serialise, 0.3 s to load).

>>> packed = bytes_as_tensors({"ids": b"abc", "none": b""})
>>> packed["ids"].dtype, tensors_as_bytes(packed)
(torch.uint8, {'ids': b'abc', 'none': b''})
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch


def bytes_as_tensors(blobs: Mapping[str, bytes]) -> dict[str, torch.Tensor]:
    """Each value as a 1-D uint8 tensor over a copy of its bytes."""
    return {name: _tensor(data) for name, data in blobs.items()}


def tensors_as_bytes(blobs: Mapping[str, Any]) -> dict[str, bytes]:
    """The inverse of ``bytes_as_tensors`` (``bytes`` values pass through)."""
    return {k: v.numpy().tobytes() if isinstance(v, torch.Tensor) else bytes(v) for k, v in blobs.items()}


def _tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is only copied
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8).clone()


def saveable(state: Mapping[str, Any], key: str = "blobs") -> dict[str, Any]:
    """``state`` with its ``key`` mapping (name -> bytes), if any, as tensors."""
    return {**state, key: bytes_as_tensors(state[key])} if key in state else dict(state)


def loadable(state: Mapping[str, Any], key: str = "blobs") -> dict[str, Any]:
    """The inverse of ``saveable``."""
    return {**state, key: tensors_as_bytes(state[key])} if key in state else dict(state)
