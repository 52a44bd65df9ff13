"""Hot reload: poll each arm's snapshot registry and swap in newer versions.

Loading (reading files, verifying the checksum, building the model) happens on the watcher thread,
off the request path; only the finished immutable bundle is swapped in, by one reference assignment.
A snapshot that fails to load (bad checksum, wrong format) is refused and counted; the arm keeps
serving what it served before, and the same version is not retried until a newer one appears.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from engine.metrics.registry import SERVE_RELOADS
from engine.serve.bundle import ModelBundle, ModelHolder

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ArmSource:
    """Where one arm's snapshots come from: ``latest()`` -> newest version or None, ``load(v)`` -> bundle."""

    name: str
    holder: ModelHolder
    latest: Callable[[], int | None]
    load: Callable[[int], ModelBundle]
    refused_version: int | None = None


class ReloadWatcher:
    def __init__(self, *, sources: list[ArmSource], interval_s: float = 1.0) -> None:
        self.sources = sources
        self.interval_s = interval_s
        self.refused = 0
        self.loaded = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> int:
        """Check every arm once; returns how many bundles were swapped in."""
        swapped = 0
        for src in self.sources:
            try:
                latest = src.latest()
            except Exception:  # noqa: BLE001 - a registry hiccup must not kill the watcher
                log.exception("reload %s: cannot list the registry", src.name)
                continue
            live = src.holder.version
            if latest is None or (live is not None and latest <= live) or latest == src.refused_version:
                continue
            try:
                bundle = src.load(latest)
            except Exception as exc:  # noqa: BLE001 - refuse the snapshot, keep serving the old one
                src.refused_version = latest
                self.refused += 1
                SERVE_RELOADS.labels(outcome="refused").inc()
                log.error("reload %s: snapshot v%s refused: %s", src.name, latest, exc)
                continue
            if src.holder.swap(bundle):
                swapped += 1
                self.loaded += 1
                SERVE_RELOADS.labels(outcome="ok").inc()
                log.info("reload %s: now serving v%s", src.name, bundle.version)
        return swapped

    def start(self) -> ReloadWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="snapshot-reload", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
