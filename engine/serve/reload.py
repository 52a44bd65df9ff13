"""Hot reload: poll each arm's snapshot registry and swap in newer versions.

Loading (reading files, verifying the checksum, building the model) happens on the watcher thread,
off the request path; only the finished immutable bundle is swapped in, by one reference assignment.
A snapshot that fails to load (bad checksum, wrong format, a part that does not unpickle, weights that
are not all finite: engine/serve/loader.py) is refused and counted, and the next older version not yet
tried is loaded instead when it is newer than what is live: a service that (re)starts next to a broken
newest snapshot serves the newest one that loads, rather than staying not-ready.
``reloop_serve_snapshot_fallback`` is 1 while an arm serves an older version than the newest in its
registry. A refused version is not retried, but for one whose serving bundle was refused before its
training snapshot was written (the trainer writes the bundle first): it is loaded again, once, when
that snapshot is there (the error's ``ready()``, engine/serve/loader.py).

A version that could not be *read* (an ``OSError`` but a missing file: an NFS hiccup such as a stale
handle, EIO, a volume remounted; or a ``SnapshotError`` raised from one) is not refused: it is tried
again after 1, 2, 4 ... up to 60 s (``RETRY_FIRST_S``, ``RETRY_MAX_S``), for as long as the registry
lists it, while the older versions are served meanwhile as for a refused one. What fails its checksum,
its format or the weights-only load, or misses a file, stays refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from reloop.engine.checkpoint.registry import ChecksumError, SnapshotError
from reloop.engine.exit_guard import native_work
from reloop.engine.metrics.stats import STATS
from reloop.engine.serve.bundle import ModelBundle, ModelHolder

log = logging.getLogger(__name__)

RETRY_FIRST_S = 1.0  # a version that could not be read is tried again after this, doubling ...
RETRY_MAX_S = 60.0  # ... up to this


# A file that is not there (a manifest missing, a part the manifest names): the snapshot is incomplete,
# not unreadable for a moment (versions appear by one rename of a finished folder).
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def unreadable(exc: BaseException) -> bool:
    """Whether ``exc`` says the snapshot could not be *read* (an I/O error: EIO, ESTALE, EACCES ...,
    worth trying again) rather than that it is broken: an ``OSError`` but a missing file, or a
    ``SnapshotError`` raised from one; never a ``ChecksumError`` (nor anything raised from one)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, (ChecksumError, *_MISSING)):
            return False
        if isinstance(seen, OSError):
            return True
        if not isinstance(seen, SnapshotError):
            return False
        seen = seen.__cause__
    return False


@dataclass(slots=True)
class ArmSource:
    """Where one arm's snapshots come from: ``latest()`` -> newest version or None, ``load(v)`` -> bundle,
    ``versions()`` -> every version available (for falling back; without it only the newest is tried)."""

    name: str
    holder: ModelHolder
    latest: Callable[[], int | None]
    load: Callable[[int], ModelBundle]
    versions: Callable[[], list[int]] | None = None
    # Why a loaded bundle cannot score this arm's requests (a counters arm's model without the counter
    # inputs: /readyz says 503), or None: its load is then a warning, not "now serving".
    unusable: Callable[[ModelBundle], str | None] | None = None
    refused: set[int] = field(default_factory=set)
    pending: dict[int, Callable[[], bool]] = field(default_factory=dict)  # refused until ready() says
    retry: dict[int, tuple[float, int]] = field(default_factory=dict)  # unreadable: (next try, tries)
    warned: tuple[int, int] | None = None  # (live, newest) last warned of as removed newer versions
    # The registry could not be listed: (the error, when last logged, polls failed since), or None.
    list_failing: tuple[str, float, int] | None = None


# A registry that cannot be listed is logged at most this often (the watcher polls it 5 times a second).
LIST_FAILURE_LOG_EVERY_S = 60.0


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
                live = src.holder.version
                if latest is None or latest == live:
                    self._listed(src)
                    self._fallback(src, latest)
                    continue
                # Newer versions removed (a rollback, or a registry started again): the live one may
                # no longer exist; serve the registry's newest, as for any other change of it.
                rollback = live is not None and latest < live
                if rollback and src.warned != (live, latest):
                    src.warned = (live, latest)
                    log.warning(
                        "reload %s: the registry's newest is v%s, older than the live v%s (versions removed "
                        "or the registry started again): serving its newest",
                        src.name,
                        latest,
                        live,
                    )
                if rollback:
                    live = None
                candidates = [latest] if src.versions is None else sorted(src.versions(), reverse=True)
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not kill the watcher
                self._list_failed(src, exc)
                continue
            self._listed(src)
            for version in candidates:
                if (live is not None and version <= live) or version > latest or version in src.refused:
                    continue
                if version in src.pending and not self._ready(src, version):
                    continue
                if version in src.retry and time.monotonic() < src.retry[version][0]:
                    continue  # could not be read a moment ago: an older one meanwhile
                try:
                    # A load outlives close()'s wait (a large snapshot): the process's exit waits for it,
                    # since a daemon thread inside torch then aborts the process (engine/exit_guard.py).
                    with native_work():
                        bundle = src.load(version)
                except Exception as exc:  # noqa: BLE001 - refuse the snapshot, try the next older one
                    if unreadable(exc):
                        tries = src.retry.get(version, (0.0, 0))[1] + 1
                        wait = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** min(tries - 1, 16))
                        src.retry[version] = (time.monotonic() + wait, tries)
                        log.warning(
                            "reload %s: snapshot v%s could not be read (%s): trying again in %.0f s",
                            src.name,
                            version,
                            exc,
                            wait,
                        )
                        continue
                    src.retry.pop(version, None)
                    ready = getattr(exc, "ready", None)
                    if callable(ready):
                        src.pending[version] = ready
                    else:
                        src.refused.add(version)
                    self.refused += 1
                    STATS.serve_reloads.add("refused")
                    log.error("reload %s: snapshot v%s refused: %s", src.name, version, exc)
                    src.holder.last_refusal = f"v{version}: {exc!s:.300}"
                    continue
                src.retry.pop(version, None)
                if src.holder.swap(bundle, rollback=rollback):
                    swapped += 1
                    self.loaded += 1
                    STATS.serve_reloads.add("ok")
                    why = None if src.unusable is None else src.unusable(bundle)
                    if why is None:
                        log.info("reload %s: now serving v%s (newest v%s)", src.name, bundle.version, latest)
                    else:
                        log.warning(
                            "reload %s: loaded v%s (newest v%s), which cannot score this arm's requests "
                            "(%s): /readyz answers 503 and requests get 503 until a version that can loads",
                            src.name, bundle.version, latest, why,
                        )  # fmt: skip
                break
            live = src.holder.version
            if live is not None:
                # Keep what may still be a candidate, so a refused version is tried once, not every
                # poll: normally what is newer than the live one; while the registry's newest is older
                # than the live one (nothing of it loaded yet), all of it (else its refused versions,
                # all older than the live one, were forgotten and loaded, and refused, every poll).
                # Never what is newer than the registry's newest: those versions were removed, and a
                # registry started again reuses their numbers for other snapshots.
                floor = None if latest < live else live
                src.refused = {v for v in src.refused if v <= latest and (floor is None or v > floor)}
                src.pending = {
                    v: r for v, r in src.pending.items() if v <= latest and (floor is None or v > floor)
                }
                src.retry = {
                    v: r for v, r in src.retry.items() if v <= latest and (floor is None or v > floor)
                }
            self._fallback(src, latest)
        return swapped

    @staticmethod
    def _ready(src: ArmSource, version: int) -> bool:
        """Whether a pending version may be loaded again (once: it is refused if it fails then)."""
        try:
            ready = src.pending[version]()
        except Exception:  # noqa: BLE001 - a registry hiccup: not yet
            return False
        if ready:
            del src.pending[version]
        return ready

    def _list_failed(self, src: ArmSource, exc: Exception) -> None:
        """Log a registry that cannot be listed with its traceback once, then (the same error at every
        poll, 5 a second: out of file descriptors wrote 770 traceback lines in 10 s) once a minute."""
        now, what = time.monotonic(), repr(exc)
        failing = src.list_failing
        if failing is not None and failing[0] == what and now - failing[1] < LIST_FAILURE_LOG_EVERY_S:
            src.list_failing = (what, failing[1], failing[2] + 1)
            return
        if failing is None or failing[0] != what:
            log.exception("reload %s: cannot list the registry", src.name)
        else:
            log.error(
                "reload %s: still cannot list the registry (%d polls failed since): %s",
                src.name,
                failing[2] + 1,
                what,
            )
        src.list_failing = (what, now, 0)

    def _listed(self, src: ArmSource) -> None:
        if src.list_failing is not None:
            src.list_failing = None
            log.info("reload %s: the registry is listed again", src.name)

    @staticmethod
    def _fallback(src: ArmSource, latest: int | None) -> None:
        live = src.holder.version
        STATS.serve_fallback.set(1.0 if latest is not None and (live or 0) < latest else 0.0, src.name)

    def start(self) -> ReloadWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="snapshot-reload", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop polling; a load in progress is left to finish on its own (the thread is a daemon; the
        process's exit waits for it: engine/exit_guard.py)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
