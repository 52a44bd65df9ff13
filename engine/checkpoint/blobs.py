"""Large ``bytes`` in a snapshot part as uint8 tensors.

torch.save pickles with protocol 2 (the one ``torch.load(weights_only=True)`` reads), which writes a
``bytes`` object through a latin-1 string: ~2.3 s for 170 MB here, and about as long to load. A tensor's
storage is written and read as it is (a join state of that size: 35 ms to serialise, 0.3 s to load).

>>> packed = bytes_as_tensors({"ids": b"abc", "none": b""})
>>> packed["ids"].dtype, tensors_as_bytes(packed)
(torch.uint8, {'ids': b'abc', 'none': b''})

``pack_bytes`` / ``unpack_bytes`` do it for every large ``bytes`` anywhere in a state, marked so that
the registry (registry.py) gives back exactly what was saved: a rolling metric's window (100k samples,
900 KB) serialised in 0.3 ms instead of 1.6.

>>> state = {"window": {"p": bytes(5000), "n": 3}, "small": b"ab"}
>>> packed = pack_bytes(state)
>>> type(packed["window"]["p"][BYTES_MARK]).__name__, packed["small"], unpack_bytes(packed) == state
('Tensor', b'ab', True)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

BYTES_MARK = "__reloop_bytes__"  # {BYTES_MARK: uint8 tensor}: a packed ``bytes`` (pack_bytes)
PACK_MIN_BYTES = 4096  # smaller ones pickle as fast as a tensor's record is written (but b"": pack_bytes)


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


def pack_bytes(obj: Any, min_bytes: int = PACK_MIN_BYTES) -> Any:
    """``obj`` with every ``bytes`` of ``min_bytes`` or more, in dicts, lists and tuples at any depth,
    as ``{BYTES_MARK: uint8 tensor}``. The tensors are views of the bytes (immutable, so no copy): for
    serialising at once, as ``SnapshotRegistry.prepare`` does. The containers are new; ``obj`` is not
    changed."""
    if isinstance(obj, bytes):
        # An empty one too: protocol 2 writes b"" as a call of the global ``bytes``, which a weights-only
        # load refuses (an empty metric window made a checkpoint taken before any sample unloadable).
        return {BYTES_MARK: _view(obj)} if len(obj) >= min_bytes or not obj else obj
    if isinstance(obj, dict):
        return {k: pack_bytes(v, min_bytes) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(pack_bytes(v, min_bytes) for v in obj)
    return obj


def unpack_bytes(obj: Any) -> Any:
    """The inverse of ``pack_bytes`` (a state without marks comes back equal)."""
    if isinstance(obj, dict):
        if len(obj) == 1 and isinstance(obj.get(BYTES_MARK), torch.Tensor):
            return obj[BYTES_MARK].numpy().tobytes()
        return {k: unpack_bytes(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(unpack_bytes(v) for v in obj)
    return obj


def _view(data: bytes) -> torch.Tensor:
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only: it is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)
