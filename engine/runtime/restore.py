"""Where a stage resumes from: the newest period snapshot or checkpoint that loads.

Order, newest first: per period snapshot (model version) V, the checkpoints written after V (a graceful
stop's final save, which takes no version), then V itself; last, the checkpoints written before the
first snapshot (a stop within the first period: without them a restart would read everything again).
A restore point that fails to load or to apply is refused and the next older one tried; when points
exist and none works the stage refuses to start from scratch (``NoUsableSnapshot``), which would
silently retrain everything. A point written by a newer reloop (``NewerFormat``: its manifest, raised by
the registry, or a state in it, raised by whoever reads that state) is not refused but stops the stage:
falling back would resume from before the upgrade.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

# NewerFormat and SnapshotMismatch live with the registry (which raises NewerFormat for a manifest of a
# newer format, as the learners do for a state of one); imported from here as before.
from reloop.engine.checkpoint.registry import (
    NewerFormat,
    Snapshot,
    SnapshotError,
    SnapshotMismatch,
    SnapshotRegistry,
)
from reloop.engine.runtime.config import RUNTIME_ONLY_KEYS, fingerprinted_defaults

__all__ = [
    "NewerFormat",
    "NoUsableSnapshot",
    "RestorePoint",
    "SnapshotMismatch",
    "check_fingerprint",
    "check_train_fingerprint",
    "config_changes",
    "newer_format",
    "restore_newest",
    "restore_points",
    "take_over",
]
log = logging.getLogger("reloop.restore")
SaveKind = Literal["snapshot", "checkpoint"]


def config_changes(
    saved: object,
    current: object,
    sections: tuple[str, ...],
    *,
    defaults: Mapping[str, Any] | None = None,
    ignore: tuple[str, ...] = (),
) -> list[str] | None:
    """The dotted keys of ``sections`` whose values differ between two config dumps (a restore point's
    meta ``config`` and this run's), as ``key: saved -> current``; None when the point recorded no
    config. A key only this run has (added to reloop since the point was written) counts when it is
    not at its default in ``defaults`` (at it, the run does what the point's did); a key only the point
    has (removed from reloop since) is left out, and so are the keys in ``ignore``."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return None
    out: list[str] = []
    missing = object()

    def walk(a: object, b: object, default: object, path: str) -> None:
        if path in ignore:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(b):
                below = default.get(key, missing) if isinstance(default, dict) else missing
                if key in a:
                    walk(a[key], b[key], below, f"{path}.{key}")
                elif b[key] != below and f"{path}.{key}" not in ignore:
                    out.append(f"{path}.{key}: (not recorded) -> {_short(b[key])}")
        elif a != b:
            out.append(f"{path}: {_short(a)} -> {_short(b)}")

    for section in sections:
        if section in saved and section in current:
            walk(saved[section], current[section], (defaults or {}).get(section, missing), section)
    return out


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_fingerprint(
    point: RestorePoint | str,
    made_with: object,
    current: str,
    *,
    allow: bool,
    changes: Callable[[], list[str] | None] | None = None,
) -> None:
    """Refuse a restore point made under other settings than ``current`` fingerprints (the train
    stage's: model, train, join; a join task's: join, validation) with ``SnapshotMismatch``: state built
    one way resumed under settings of another is rarely what was meant. ``allow``
    (``checkpoint.allow_fingerprint_change``) resumes anyway, with a warning naming both. ``changes``
    gives the settings that differ (``config_changes``; called only when the fingerprints do), or
    None when the restore point recorded no config; none (an empty list) resumes: the fingerprints then
    differ only by what a newer reloop added at its defaults, or left out of them (an upgrade with the
    config unchanged)."""
    if made_with == current:
        return
    changed_keys = None if changes is None else changes()
    if changed_keys is not None and not changed_keys:
        log.info(
            "resuming: the fingerprints differ only by settings added since the restore point was "
            "written, at their defaults",
            extra={"fields": {"restore_point": str(point), "made_with": made_with, "config": current}},
        )
        return
    keys = changed_keys or []
    changed = f" (changed: {'; '.join(keys[:5])}{' ...' if len(keys) > 5 else ''})" if keys else ""
    if not allow:
        raise SnapshotMismatch(
            f"{point} was made with config fingerprint {made_with}, this config is {current}{changed}; "
            "resume under the changed settings with checkpoint.allow_fingerprint_change: true (for one "
            "start: RELOOP__CHECKPOINT__ALLOW_FINGERPRINT_CHANGE=true; a changed model shape or optimizer "
            "kind is refused even so), or start a new pipeline: a fresh checkpoint dir with its own "
            "stages.samples_topic and stages.join_group_id (with the old ones it trains the samples the old "
            "pipeline wrote, and its join stage writes them again)"
        )
    log.warning(
        "resuming under a changed config (checkpoint.allow_fingerprint_change)",
        extra={
            "fields": {
                "restore_point": str(point),
                "made_with": made_with,
                "config": current,
                **({"changed": keys} if keys else {}),
            }
        },  # fmt: skip
    )


def check_train_fingerprint(
    point: RestorePoint, saved: Mapping[str, Any], run: Mapping[str, Any], current: str, *, allow: bool
) -> None:
    """``check_fingerprint`` for a train stage's (or the one-process pipeline's) restore point: ``saved``
    its meta, ``run`` the meta this run writes (both with the config they were made with)."""
    config = run.get("config")
    backbone = config.get("model", {}).get("backbone") if isinstance(config, dict) else None

    def changes() -> list[str] | None:
        defaults, ignore = fingerprinted_defaults(backbone), RUNTIME_ONLY_KEYS
        sections = ("model", "train", "join")
        return config_changes(saved.get("config"), config, sections, defaults=defaults, ignore=ignore)

    check_fingerprint(point, saved.get("fingerprint"), current, allow=allow, changes=changes)


class NoUsableSnapshot(SnapshotError):
    """Snapshots exist but none loads: starting from scratch would silently retrain everything."""


class RestorePoint(NamedTuple):
    kind: SaveKind
    number: int  # version (snapshot) or checkpoint number
    base_version: int | None  # the period snapshot this state follows (== number for a snapshot; None
    # for a checkpoint written before the first snapshot)

    def __str__(self) -> str:
        return f"{self.kind} {self.number}"

    def load(self, registry: SnapshotRegistry) -> Snapshot:
        target = registry.checkpoints if self.kind == "checkpoint" else registry
        return target.load(self.number)


def restore_points(registry: SnapshotRegistry) -> Iterator[RestorePoint]:
    checkpoints: dict[int | None, list[int]] = {}
    unreadable: list[int] = []
    for c in reversed(registry.checkpoints.versions()):
        try:
            base = registry.checkpoints.manifest(c)["meta"].get("base_version")
        except SnapshotError:
            unreadable.append(c)
            continue
        if base is None or (isinstance(base, int) and not isinstance(base, bool)):
            checkpoints.setdefault(base, []).append(c)
    # A checkpoint whose manifest does not read has no known place in the order; offered first, its
    # load fails again and it is refused like any other point (logged, counted), and it counts towards
    # "points exist": skipped here, the only checkpoint of a first period let the stage start afresh.
    for c in unreadable:
        yield RestorePoint("checkpoint", c, None)
    versions = registry.versions()
    newest = versions[-1] if versions else 0
    passed = sorted(
        c for base, numbers in checkpoints.items() if base is not None and base > newest for c in numbers
    )
    if passed:
        # Saved after versions that are gone (removed by hand: a rollback): resuming from one would
        # carry on the rolled-back model, so the newest version left is the place to resume from.
        log.warning(
            "not resuming from checkpoints saved after versions that were removed",
            extra={"fields": {"checkpoints": passed, "newest_version": versions[-1] if versions else None}},
        )
    for v in reversed(versions):
        for c in checkpoints.get(v, []):
            yield RestorePoint("checkpoint", c, v)
        yield RestorePoint("snapshot", v, v)
    for c in checkpoints.get(None, []):  # before any snapshot: older than every version
        yield RestorePoint("checkpoint", c, None)


def restore_newest(
    registry: SnapshotRegistry,
    apply: Callable[[RestorePoint, Snapshot], None],
    on_refused: Callable[[RestorePoint, BaseException], None] | None = None,
) -> RestorePoint | None:
    """Apply the newest restore point that loads and applies; None when the registry is empty."""
    refused: list[str] = []
    for point in restore_points(registry):
        try:
            apply(point, point.load(registry))
        except NewerFormat as exc:  # the registry's (a manifest) or the stage's own (a state in it)
            target = registry.checkpoints if point.kind == "checkpoint" else registry
            raise newer_format(point, target.path(point.number), exc) from exc
        except SnapshotMismatch as exc:  # other settings (or a model of another shape): every point alike
            if str(point) in str(exc):
                raise
            raise SnapshotMismatch(f"{point}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - an unusable snapshot: fall back to an older one
            refused.append(f"{point}: {exc!r:.300}")
            if on_refused is not None:
                on_refused(point, exc)
            log.error(
                "refusing restore point, falling back",
                extra={"fields": {"kind": point.kind, "number": point.number, "error": repr(exc)}},
            )
            continue
        if refused:
            log.error(
                "restored from an older restore point",
                extra={"fields": {"restored": str(point), "refused": refused}},
            )
        return point
    if refused:
        raise NoUsableSnapshot(
            f"no snapshot under {registry.root} loads; refusing to start from scratch "
            f"(refused: {'; '.join(refused)})"
        )
    return None


def newer_format(point: object, where: Path, exc: NewerFormat, *, fresh_dir: bool = True) -> NewerFormat:
    """``exc``, raised loading or applying the restore point ``point`` (in the folder ``where``), as the
    error the stage stops with: naming the point, its folder and what to do (raise it ``from exc``).
    ``fresh_dir``: starting from a fresh checkpoint dir is one of the answers."""
    folder = "" if str(where) in str(exc) else f" ({where})"
    fresh = ", or start this one from a fresh checkpoint dir" if fresh_dir else ""
    return NewerFormat(f"{point}{folder}: {exc}; run the reloop that wrote it (or a newer one){fresh}")


def take_over(registry: SnapshotRegistry, *, bundles: bool = True) -> None:
    """What the writer of ``registry`` does once it restored (or found nothing), before it publishes.

    * It follows the newest version on disk: another writer that publishes after this restore (a zombie
      trainer, a second one started by mistake) then stops this one's next write, as after its first
      write. Without it, the first write went on unchecked: a version forked from an older one.
    * ``bundles``: it removes the serving bundles of versions past the newest snapshot. A bundle is
      written just before its snapshot, so a write that failed or a crash in between left one whose
      snapshot never came; serving takes a version from its bundle alone, so that bundle would be served
      as a version that is not there (or, rolled back, no longer there). Removed, serving follows the
      newest version down.
    """
    latest = registry.latest_version()
    if latest is not None:
        registry.follow(latest)
    registry.next_version()  # a highest_version that does not read stops the stage here, at its start
    if not bundles:
        return
    from reloop.engine.serve.bundle_format import bundle_versions, serving_dir

    root = serving_dir(registry.root)
    for version in bundle_versions(root):
        if version > (latest or 0):
            log.warning(
                "removing the serving bundle of a version with no snapshot (its write did not finish, "
                "or the version was removed)",
                extra={"fields": {"version": version, "newest_snapshot": latest}},
            )
            # The manifest first: a reader never finds a manifest whose data file is gone for good.
            for suffix in (".json", ".safetensors"):
                (root / f"v{version:012d}{suffix}").unlink(missing_ok=True)
