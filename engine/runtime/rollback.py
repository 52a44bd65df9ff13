"""Rolling a checkpoint folder back to an older model version, and what a folder holds.

A rollback removes every version newer than the chosen one, with their serving bundles and the stop
checkpoints saved after them, while holding the folder's trainer lock (engine/checkpoint/folder_lock.py):
a trainer running on the folder would publish on top of it. It checks first that the chosen version
loads (checksums and a weights-only load), so a rollback never lands on a broken version. Before removing
anything it records the highest version number ever published (``highest_version``): the trainer's next
version then takes a new number, never a removed one's. The scoring service follows the registry's
newest down at its next poll; the trainer, started again, resumes from the chosen version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reloop.engine.checkpoint.folder_lock import FolderLock
from reloop.engine.checkpoint.registry import SnapshotError, SnapshotRegistry
from reloop.engine.serve.bundle_format import bundle_versions, serving_dir


class RollbackError(ValueError):
    """The rollback cannot be done as asked (the message says why); nothing was removed."""


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    created_unix: float | None
    samples_trained: int | None
    bundle: bool  # its serving bundle is there
    problem: str | None  # why its manifest does not read, or None


@dataclass(slots=True)
class FolderListing:
    root: Path
    versions: list[VersionInfo]  # newest first
    highest_published: int  # the highest number ever published here (past every version listed)
    # (number, base version, why it does not load or None)
    checkpoints: list[tuple[int, int | None, str | None]] = field(default_factory=list)


def describe(root: Path, *, verify: bool = True) -> FolderListing:
    """What ``root`` holds: each version's manifest and, with ``verify``, whether its parts pass their
    checksums (read whole, nothing unpickled: a corrupt version looked like any other in the listing a
    rollback's target is chosen from; a rollback's plan reads its target alone)."""
    registry = SnapshotRegistry(root, create=False)
    bundles = set(bundle_versions(serving_dir(root)))
    snapshots = set(registry.versions())
    found = []
    for v in sorted(snapshots | bundles, reverse=True):
        created = samples = problem = None
        if v in snapshots:
            try:
                manifest = registry.manifest(v)
                created = float(manifest["created_unix"])
                samples = _int_or_none(manifest["meta"].get("samples_trained"))
                if verify:
                    registry.verify(v)
            except (SnapshotError, KeyError, TypeError, ValueError) as exc:
                problem = str(exc)
        else:
            problem = "a serving bundle without its snapshot (written, or removed, a moment ago)"
        found.append(VersionInfo(v, created, samples, v in bundles, problem))
    checkpoints = []
    saved = registry.checkpoints
    for c in reversed(saved.versions()):
        base = problem = None
        try:
            base = _int_or_none(saved.manifest(c)["meta"].get("base_version"))
            if verify:
                saved.verify(c)
        except (SnapshotError, KeyError, TypeError) as exc:
            problem = str(exc)
        checkpoints.append((c, base, problem))
    highest = max([registry.highest_committed(), *(info.version for info in found)], default=0)
    return FolderListing(root, found, highest, checkpoints)


@dataclass(frozen=True, slots=True)
class RollbackPlan:
    root: Path
    to: int
    versions: list[int]  # to remove, newest first
    bundles: list[int]  # serving bundles to remove
    checkpoints: list[int]  # stop checkpoints saved after a removed version
    next_version: int  # what the trainer publishes next


def plan_rollback(root: Path, to: int) -> RollbackPlan:
    if not root.is_dir():
        raise RollbackError(f"{root} is not a folder")
    registry = SnapshotRegistry(root, create=False)
    versions = registry.versions()
    if to not in versions:
        listed = ", ".join(f"v{v}" for v in versions[-8:]) or "none"
        raise RollbackError(f"v{to} is not in {root} (its versions: {listed})")
    _check_loads(registry, to)  # said by --dry-run too, and for the newest version
    listing = describe(root, verify=False)
    return RollbackPlan(
        root,
        to,
        [v for v in reversed(versions) if v > to],
        [v for v in reversed(bundle_versions(serving_dir(root))) if v > to],
        # Saved after vN too: it holds what was trained after vN, and a restart resumed from it.
        [c for c, base, _ in listing.checkpoints if base is not None and base >= to],
        max(listing.highest_published, registry.next_version() - 1) + 1,
    )


def _check_loads(registry: SnapshotRegistry, to: int) -> None:
    try:
        registry.load(to)  # every part checked: never roll back onto a version that does not load
    except SnapshotError as exc:
        raise RollbackError(f"v{to} does not load ({exc}): choose another version") from exc


def roll_back(plan: RollbackPlan) -> None:
    """Carry ``plan`` out, holding the folder's lock (``FolderInUse`` while a trainer holds it)."""
    lock = FolderLock(plan.root).acquire(wait_s=0.0)
    try:
        registry = SnapshotRegistry(plan.root, create=False)
        _check_loads(registry, plan.to)  # again, under the lock
        registry.record_highest(plan.next_version - 1)
        registry.fsync()
        bundles = serving_dir(plan.root)
        # Newest first, each bundle before its snapshot (serving lists both): a service polling meanwhile
        # steps down through versions that are still whole.
        for v in sorted({*plan.versions, *plan.bundles}, reverse=True):
            for suffix in (".json", ".safetensors"):  # the manifest first, as the trainer removes them
                (bundles / f"v{v:012d}{suffix}").unlink(missing_ok=True)
            if v in plan.versions and registry.path(v).exists():
                registry.remove(v)
        for c in plan.checkpoints:
            if registry.checkpoints.path(c).exists():
                registry.checkpoints.remove(c)
        if plan.checkpoints:
            registry.checkpoints.fsync()
        registry.fsync()
    finally:
        lock.release()


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def utc(created_unix: float | None) -> str:
    if created_unix is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(created_unix))
