"""Atomic snapshots with monotonic versions: the only state that survives a restart."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reloop.engine.checkpoint.registry import ChecksumError, Snapshot, SnapshotError, SnapshotRegistry

__all__ = ["ChecksumError", "Snapshot", "SnapshotError", "SnapshotRegistry"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the registry brings torch in, and `reloop run`'s supervising parent, which
    # needs only folder_lock from this package, would hold torch's ~480 MB for nothing.
    if name in __all__:
        from reloop.engine.checkpoint import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
