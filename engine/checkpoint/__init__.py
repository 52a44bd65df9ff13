"""Atomic snapshots with monotonic versions: the only state that survives a restart."""

from reloop.engine.checkpoint.registry import ChecksumError, Snapshot, SnapshotError, SnapshotRegistry

__all__ = ["ChecksumError", "Snapshot", "SnapshotError", "SnapshotRegistry"]
