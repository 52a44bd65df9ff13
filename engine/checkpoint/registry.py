"""Atomic snapshot store with monotonic versions.

Layout under ``root``::

    v000000000007/            one committed snapshot (a model version: serving loads these)
        manifest.json         version, created time, meta (JSON), CRC32C + size of every part
        model.pt, state.pt    one torch.save file per part: tensors and plain data only
    .tmp-.../                 a snapshot being written (ignored; removed on the next publish)
    highest_version           the highest version ever committed here (one integer)
    checkpoints/              ``checkpoints``: a registry of its own for state saved between period
                              boundaries (a graceful stop); never a model version, never served

One writer per folder: a registry that has written refuses to write again once the folder's newest
version is not its own (``SnapshotError``), so a second trainer on the same folder stops instead of
alternating versions with the first.

A snapshot becomes visible by one ``rename`` of its finished directory (files and directory fsynced
first, the root fsynced after), so a reader sees a whole snapshot or none. A write that fails (a full
disk, a read-only folder, a failed fsync) raises naming the file, removes its temporary folder and
leaves the versions before it as they were: older versions are pruned (``keep``) only after a new one
is durable. A version is the highest ever committed here + 1: the folder's newest, or the number in
``highest_version`` (written at every publish), whichever is higher. Versions removed by hand (a
rollback) keep their numbers taken, so a number never names two models (serving, the impressions it
logs and the per-version metrics tell versions apart by number alone).
Parts are read with ``torch.load(weights_only=True)``: no arbitrary unpickling; a part holding what such
a load refuses (a numpy scalar, a frozenset ...) is refused when it is prepared
(``SnapshotError``), never committed in place of an older snapshot that loads.
A part whose checksum differs from the manifest is refused (``ChecksumError``); a part that passes its
checksum but does not load (a pickle refused by ``weights_only``, a truncated file resealed) is refused
too (``SnapshotError``), so ``load()`` falls back to the newest snapshot that loads. A manifest of a
newer ``format`` (written by a newer reloop: a rollback) raises ``NewerFormat`` naming the file and both
formats, and ``load()`` does not fall back past it: that would resume from before the upgrade.

The checksum guards against torn and corrupted files, which is all a checksum kept next to its file can
do (whoever can rewrite a part can rewrite the manifest): CRC32C (hardware, the checksum of Kafka's own
records) plus the exact length. sha256 took 4.2 ms per 8 MB here against 0.3 ms, about 7% of a
samples-topic replay that snapshots every simulated week (docs/benchmarks.md, figure 6). Manifests
written with a ``sha256`` per part (before) are still verified with it. For the same reason torch.save
writes the parts without the zip format's own CRC-32 of every record (``_without_zip_crc``): a second
checksum pass that torch.load does not check. Large ``bytes`` in a part (rolling metric windows, encoded
batches) travel as uint8 tensors and come back as ``bytes`` (blobs.py): pickle protocol 2 writes
``bytes`` through a latin-1 string, 5x slower.

>>> import tempfile
>>> reg = SnapshotRegistry(tempfile.mkdtemp(), keep=2)
>>> [reg.publish({"model": {"w": [1.0]}}, meta={"step": i}) for i in range(3)]
[1, 2, 3]
>>> reg.versions(), reg.latest_version(), reg.load().meta["step"]
([2, 3], 3, 2)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
import types
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import torch
from reloop.engine.checkpoint.blobs import pack_bytes, unpack_bytes

FORMAT = 1
_DIR_RE = re.compile(r"^v(\d{12})$")
_PART_RE = re.compile(r"^[a-z][a-z0-9_]*$")
CHECKPOINTS_DIR = "checkpoints"
HIGHEST_VERSION_FILE = "highest_version"
log = logging.getLogger(__name__)
# Parts written before pack_bytes packed empty ``bytes`` hold b"" as a call of ``bytes()``: allowed, so
# that they load (a constructor of plain bytes runs no code; torch allows ``_codecs.encode`` for the rest).
torch.serialization.add_safe_globals([bytes])


class SnapshotError(Exception):
    """A snapshot that cannot be used."""


class ChecksumError(SnapshotError):
    """A snapshot part whose content does not match its manifest checksum."""


class SnapshotMismatch(RuntimeError):
    """The newest snapshot was made with a different training configuration (or format): the stage stops
    instead of falling back to an older one (engine/runtime/restore.py re-exports it)."""


class NewerFormat(SnapshotMismatch, SnapshotError):
    """A snapshot, checkpoint or state in it written by a newer reloop, in a format this one does not read
    (a rollback). A resuming stage does not refuse it in favour of an older point, which would silently
    resume from before the upgrade (and train again, or lose, what came since): it stops, naming the
    file and both formats (a ``SnapshotMismatch``: exit 2). A reader that serves versions (reloop serve)
    refuses the version like any unusable snapshot (a ``SnapshotError``) and keeps the one it serves.
    Defined here, below engine/runtime, so that the registry and the learners can raise it."""


def check_state_format(
    state: Mapping[str, Any],
    reads: int,
    what: str,
    *,
    prefix: str = "",
    oldest: int | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``NewerFormat`` when ``state["format"]`` is above ``reads`` (a state written by a newer
    reloop: a rollback), ``error`` when it is any other value but ``reads``. ``what`` names the state in
    the message (after ``prefix``); ``oldest``: the oldest format the caller still reads itself."""
    found = state.get("format")
    if isinstance(found, int) and not isinstance(found, bool) and found > reads:
        readable = f"format {reads}" if oldest is None else f"formats {oldest} to {reads}"
        raise NewerFormat(
            f"{prefix}{what} format {found}, written by a newer reloop; this one reads {readable}"
        )
    if type(found) is not int or found != reads:
        hint = ""
        if found is None and state and all(isinstance(k, str) and "." in k for k in state):
            # learner.load_state_dict(learner.model.state_dict()): a PyTorch habit
            hint = (
                ": this looks like a torch module's state_dict (parameter names); a learner loads what "
                "its own state_dict() returns (model, optimizers and config)"
            )
        raise error(f"{prefix}unknown {what} format {found!r}, expected {reads}{hint}")


@dataclass(frozen=True)
class PreparedSnapshot:
    """A snapshot serialised in memory and not written yet (``SnapshotRegistry.prepare``)."""

    version: int
    created_unix: float
    meta: dict[str, Any]
    parts: dict[str, io.BytesIO]


@dataclass(frozen=True)
class Snapshot:
    version: int
    created_unix: float
    meta: dict[str, Any]
    state: dict[str, Any]


class SnapshotRegistry:
    def __init__(self, root: str | os.PathLike[str], *, keep: int = 5, create: bool = True) -> None:
        """``create=False``: a reader's registry (the scoring service's, often on a read-only mount) that
        leaves a missing folder to its writer and lists no versions until it exists."""
        if keep < 1:
            raise ValueError("keep must be >= 1 (the newest snapshot is what a restart resumes from)")
        self.root = Path(root)
        self.keep = keep
        self._create = create
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self._last_written: int | None = None  # this object's newest version: the fence (``write``)
        self._sound: set[int] = set()  # versions that passed ``verify`` or were written here (``_retain``)
        self._unsound: set[int] = set()  # versions that failed it, logged once

    @property
    def checkpoints(self) -> SnapshotRegistry:
        """State saved between period boundaries (e.g. at a graceful stop). It lives beside the model
        versions without taking a version number, so a stop never shifts the version sequence and
        serving, which lists only ``v*`` folders here, never loads one."""
        return SnapshotRegistry(self.root / CHECKPOINTS_DIR, keep=2, create=self._create)

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[int]:
        out = []
        if not self.root.is_dir():  # a reader's registry before its writer made the folder
            return out
        for entry in os.scandir(self.root):
            m = _DIR_RE.match(entry.name)
            if m and entry.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def follow(self, version: int) -> None:
        """This writer continues from ``version`` (the state it restored): a version another writer
        publishes after it stops this one's next write, as if this one had written ``version``."""
        self._last_written = version

    def _names_taken(self) -> list[int]:
        """Versions whose name some other entry holds (a stray file, a link): a new snapshot goes past
        them, or every publish from then on would fail on the name (serving lists folders only)."""
        return [
            int(m.group(1)) for e in os.scandir(self.root) if (m := _DIR_RE.match(e.name)) and not e.is_dir()
        ]

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: int) -> Path:
        return self.root / f"v{version:012d}"

    def manifest(self, version: int) -> dict[str, Any]:
        where = self.path(version)  # in the errors: a checkpoint, a join task's or a model version's
        path = where / "manifest.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            if where.is_dir():  # the folder without its manifest: not the same as no such version
                raise SnapshotError(
                    f"{where} has no manifest.json (removed by hand, or not a snapshot reloop wrote)"
                ) from exc
            raise SnapshotError(f"snapshot {version} does not exist under {self.root}") from exc
        except OSError as exc:
            raise SnapshotError(f"{where}: manifest cannot be read ({exc})") from exc
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise ChecksumError(f"{where}: manifest is not valid JSON ({exc!r:.200})") from exc
        if not isinstance(data, dict):
            raise ChecksumError(f"{where}: manifest is not a JSON object")
        found = data.get("format")
        body = {k: v for k, v in data.items() if k != "manifest_sha256"}
        sealed = data.get("manifest_sha256") == _sha256(_canonical(body))
        if isinstance(found, int) and not isinstance(found, bool) and found > FORMAT:
            # Whatever the checksum says: a newer format may checksum its manifest another way. One that
            # fails this reloop's may also be a corrupted format field: the message says both.
            unsure = "" if sealed else " (or a corrupted manifest: it fails this reloop's checksum)"
            raise NewerFormat(
                f"{path}: snapshot format {found}, written by a newer reloop{unsure}; this one reads format "
                f"{FORMAT}"
            )
        if not sealed:
            raise ChecksumError(f"{where}: manifest checksum mismatch")
        if type(found) is not int or found != FORMAT:
            raise SnapshotError(f"{where}: unexpected format {found!r} in manifest (expected {FORMAT})")
        if data.get("version") != version:  # a version folder copied or renamed by hand
            raise SnapshotError(
                f"{where}: its manifest is version {data.get('version')!r}'s, not {version}'s (a version "
                "folder copied or renamed?)"
            )
        parts = data.get("parts")
        if (
            not isinstance(data.get("meta"), dict)
            or not isinstance(data.get("created_unix"), int | float)
            or not 0 <= data["created_unix"] < 2**53  # NaN, inf and a huge int raised out of load()
            or not isinstance(parts, dict)
            or not all(
                isinstance(p, dict)
                and isinstance(p.get("file"), str)
                and "/" not in p["file"]
                and isinstance(p.get("bytes"), int)
                and (isinstance(p.get("crc32c"), str) or isinstance(p.get("sha256"), str))
                for p in parts.values()
            )
        ):
            raise SnapshotError(f"{where}: manifest lacks meta, created_unix or parts")
        return data

    def load(self, version: int | None = None, parts: Iterable[str] | None = None) -> Snapshot:
        """Load ``version`` (or the newest snapshot that passes its checksums) with the named parts
        (all when None). A named version that fails its checksum raises ``ChecksumError``. A snapshot
        of a newer format raises ``NewerFormat``, also when looking for the newest one that loads."""
        if version is not None:
            return self._load(version, parts)
        refused: list[str] = []
        for v in reversed(self.versions()):
            try:
                return self._load(v, parts)
            except NewerFormat:
                raise
            except SnapshotError as exc:
                log.error("refusing snapshot %d: %s", v, exc)
                refused.append(str(exc))
        detail = f" (refused: {'; '.join(refused)})" if refused else ""
        raise SnapshotError(f"no usable snapshot under {self.root}{detail}")

    def verify(self, version: int) -> None:
        """Raise ``SnapshotError`` unless ``version``'s manifest and every part pass their checksums
        (reads every byte, unpickles nothing)."""
        manifest = self.manifest(version)
        for name in manifest["parts"]:
            self._checked_bytes(version, manifest, name)

    def _checked_bytes(self, version: int, manifest: dict[str, Any], name: str) -> bytes:
        where = self.path(version)
        info = manifest["parts"].get(name)
        if info is None:
            raise SnapshotError(f"{where} has no part {name!r}")
        try:
            data = (where / info["file"]).read_bytes()
        except OSError as exc:
            raise SnapshotError(f"{where}: part {name!r} cannot be read ({exc})") from exc
        kind = "crc32c" if "crc32c" in info else "sha256"  # sha256: snapshots written before
        digest = _crc32c(data) if kind == "crc32c" else _sha256(data)
        if len(data) != info["bytes"] or digest != info[kind]:
            raise ChecksumError(f"{where}: part {name!r} fails its {kind} checksum")
        return data

    def _load(self, version: int, parts: Iterable[str] | None) -> Snapshot:
        manifest = self.manifest(version)
        where = self.path(version)
        wanted = list(manifest["parts"]) if parts is None else list(parts)
        state: dict[str, Any] = {}
        for name in wanted:
            data = self._checked_bytes(version, manifest, name)
            try:
                loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:  # torch's own text advises weights_only=False: not here
                raise SnapshotError(
                    f"{where}: part {name!r} does not load: a weights-only load refuses it "
                    f"({_unpickler_reason(exc)})"
                ) from exc
            except Exception as exc:  # noqa: BLE001 - whatever the unpickler refuses, the part is unusable
                detail = f"{exc!r:.300}"
                raise SnapshotError(f"{where}: part {name!r} does not load ({detail})") from exc
            state[name] = unpack_bytes(loaded)
        return Snapshot(version, float(manifest["created_unix"]), manifest["meta"], state)

    # ------------------------------------------------------------------ writing
    def publish(self, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> int:
        """Write ``state`` (part name -> tensors/plain data) and ``meta`` (JSON) as the next version."""
        return self.write(self.prepare(state, meta))

    def prepare(self, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> PreparedSnapshot:
        """The first half of ``publish``: the parts serialised now (the caller may change ``state``
        afterwards) and the version they will take, the newest committed + 1. ``write`` makes it durable
        and visible; until then nothing is on disk, and a second ``prepare`` would take the same version
        (engine/checkpoint/writer.py writes one at a time)."""
        for name in state:
            if not _PART_RE.match(name):
                raise ValueError(f"bad snapshot part name {name!r}")
        parts: dict[str, io.BytesIO] = {}
        for name, value in state.items():
            buf = io.BytesIO()
            try:
                with _without_zip_crc():
                    torch.save(pack_bytes(value), buf, pickle_module=_CHECKED_PICKLE)
            except _NotWeightsOnly as exc:
                raise SnapshotError(f"snapshot part {name!r} {exc}") from None
            parts[name] = buf
        return PreparedSnapshot(self.next_version(), time.time(), dict(meta or {}), parts)

    def next_version(self) -> int:
        """The version the next snapshot takes: past the newest committed one, past the highest ever
        committed (``highest_version``: a rollback removes folders, not numbers) and past any other entry
        holding a version's name (``_names_taken``)."""
        return max([self.latest_version() or 0, self.highest_committed(), *self._names_taken()]) + 1

    def highest_committed(self) -> int:
        """The number in ``highest_version`` (0 when there is none yet). A file that does not read as
        one is an error naming it: guessing could give a number a second model."""
        path = self.root / HIGHEST_VERSION_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"{path} cannot be read ({exc})") from exc
        try:
            value = int(text.strip())
        except ValueError:
            value = -1
        if value < 0:
            raise SnapshotError(
                f"{path} should hold the highest version ever published here, and holds {text[:40]!r}: "
                "write that number into it (at least the newest v* folder's), or remove it if no "
                "version of this folder was ever removed"
            )
        return value

    def record_highest(self, version: int) -> None:
        """``highest_version`` = ``version`` unless it holds more, replaced in one rename (the caller
        fsyncs the folder)."""
        if self.highest_committed() >= version:
            return
        tmp = self.root / f".tmp-{HIGHEST_VERSION_FILE}-{uuid.uuid4().hex[:8]}"
        try:
            _write_durable(tmp, f"{version}\n".encode())
            os.replace(tmp, self.root / HIGHEST_VERSION_FILE)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, prepared: PreparedSnapshot) -> int:
        """The second half of ``publish``: checksums, files and directory fsynced, then one rename."""
        latest = self.latest_version()
        if self._last_written is not None and latest != self._last_written:
            # A second writer on this folder (two trainers overlapping, a zombie after a failover):
            # versions would alternate between two models, so the one that finds the other's stops.
            raise SnapshotError(
                f"{self.root} holds version {latest} that this writer did not write (its last: "
                f"{self._last_written}): another process publishes snapshots to the same folder"
            )
        self._remove_stale_temps()
        version = prepared.version
        if self.path(version).exists():
            raise SnapshotError(f"snapshot {version} already exists under {self.root} (two writers?)")
        tmp = self.root / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            parts = {}
            for name, buf in prepared.parts.items():
                with buf.getbuffer() as data:  # a view: no copy of a part that can be gigabytes
                    _write_durable(tmp / f"{name}.pt", data)
                    parts[name] = {"file": f"{name}.pt", "bytes": data.nbytes, "crc32c": _crc32c(data)}
            body = {
                "format": FORMAT,
                "version": version,
                "created_unix": prepared.created_unix,
                "meta": prepared.meta,
                "parts": parts,
            }
            manifest = dict(body, manifest_sha256=_sha256(_canonical(body)))
            _write_durable(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
            _fsync_dir(tmp)
            os.rename(tmp, self.path(version))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk must not keep the half-written copy
            raise
        # Visible from here on, and whole (every file and the folder fsynced): this writer's own, even if
        # the fsync below fails (a retry took it for another writer's and refused to write again).
        self._last_written = version
        self._sound.add(version)
        try:
            self.record_highest(version)
            _fsync_dir(self.root)
        except OSError as exc:
            # Older versions stay (no pruning): the rename may not survive a power loss.
            raise SnapshotError(
                f"snapshot {version} is in {self.root} but the folder's fsync or its {HIGHEST_VERSION_FILE} "
                f"failed ({exc}): it may not survive a power loss; the versions before it are kept"
            ) from exc
        self._retain()
        return version

    def fsync(self) -> None:
        """Make the folder's entries (renames, removals) durable."""
        _fsync_dir(self.root)

    def remove(self, version: int) -> None:
        """Take ``version`` out of the listing in one rename (a reader sees it whole or not at all), then
        delete it. Its number stays taken (``record_highest`` first when the folder may not hold it)."""
        hidden = self.root / f".tmp-removed-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(self.path(version), hidden)
        shutil.rmtree(hidden, ignore_errors=True)  # what is left is a .tmp-* the next publish removes

    def _retain(self) -> None:
        """Keep the newest ``keep`` versions that pass their checksums, and any newer that do not (for
        a look); remove everything older. A corrupt version does not count: pruning by count alone
        could leave no loadable snapshot behind one that rotted on disk. Each older version is read
        whole once per writer (the ones it wrote, it knows); a newer format counts as sound."""
        sound = 0
        versions = self.versions()
        for i, v in enumerate(reversed(versions)):
            if sound == self.keep:
                for old in versions[: len(versions) - i]:
                    shutil.rmtree(self.path(old), ignore_errors=True)
                    self._sound.discard(old)
                    self._unsound.discard(old)
                return
            if v == self._last_written or v in self._sound:
                sound += 1
                continue
            if v in self._unsound or i == len(versions) - 1:
                continue  # the oldest is not read: whether it counts removes nothing
            try:
                self.verify(v)
            except NewerFormat:
                pass
            except SnapshotError as exc:
                self._unsound.add(v)
                log.error("snapshot %d fails its checks; kept, not counted toward keep: %s", v, exc)
                continue
            self._sound.add(v)
            sound += 1

    def _remove_stale_temps(self) -> None:
        for entry in os.scandir(self.root):
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry.path, ignore_errors=True)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _crc32c(data: bytes | memoryview) -> str:
    return f"{crc32c.crc32c(data):08x}"


def _write_durable(path: Path, data: bytes | memoryview) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:  # a write or fsync error names no file: the caller's message should
        raise _naming(exc, path) from exc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _naming(exc, path) from exc


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` as an ``OSError`` of the same kind (errno) naming the file in its message (a log of
    ``repr(exc)`` drops an OSError's filename)."""
    return OSError(exc.errno, f"{exc.strerror or exc}: {exc.filename or path}")


def _unpickler_reason(exc: pickle.UnpicklingError) -> str:
    """The reason in torch's refusal, without its advice to load with ``weights_only=False``."""
    text = " ".join(str(exc).split())
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"the global {found.group(1)} is not allowed"
    found = re.search(r"WeightsUnpickler error: ([^.]{1,200})", text)
    return found.group(1) if found else "not a weights-only pickle"


class _NotWeightsOnly(TypeError):
    """A value in a part that ``torch.load(weights_only=True)`` would refuse."""


_GLOBAL_LOADS: dict[tuple[str, str], bool] = {}  # (module, qualname) -> whether a weights-only load takes it


def _loads_weights_only(obj: Any) -> bool:
    """Whether a weights-only load accepts ``obj`` (a class or function, pickled by name): asked of
    torch itself once per name, so that this check refuses exactly what the loader refuses."""
    if isinstance(obj, type) and issubclass(obj, torch.storage.TypedStorage | torch.UntypedStorage):
        return True  # a tensor's storage type, named in its record's id: the loader's own business
    key = (getattr(obj, "__module__", None) or "", getattr(obj, "__qualname__", None) or repr(obj))
    found = _GLOBAL_LOADS.get(key)
    if found is None:
        buf = io.BytesIO()
        try:
            torch.save({"global": obj}, buf)
            buf.seek(0)
            found = torch.load(buf, weights_only=True)["global"] is obj
        except Exception:  # noqa: BLE001 - refused by the unpickler, or not picklable by name at all
            found = False
        _GLOBAL_LOADS[key] = found
    return found


class _CheckedPickler(pickle.Pickler):
    """torch.save's pickler refusing, while it writes, what a weights-only load would refuse (a numpy
    scalar or array, a frozenset, a namedtuple, a dataclass ...): such a part was written, committed and
    counted against ``keep`` as a good snapshot, and failed only at the restore that needed it.
    Every class and function a pickle names (what the loader checks) passes through ``reducer_override``;
    plain ints, floats, strings, bytes and containers do not, so the check costs nothing on them."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType) and not _loads_weights_only(
            obj
        ):
            name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
            raise _NotWeightsOnly(
                f"holds a value that a weights-only load refuses (it pickles as {name}): use tensors and "
                "plain Python values (int(), float(), torch.from_numpy(...), tuple(...))"
            )
        return NotImplemented


_CHECKED_PICKLE = types.ModuleType("reloop_checked_pickle")
_CHECKED_PICKLE.Pickler = _CheckedPickler  # type: ignore[attr-defined]


def _without_zip_crc() -> contextlib.AbstractContextManager[Any]:
    """torch.save without the zip's CRC-32 of every record: each part's CRC32C is in the manifest and
    checked on load, so the zip's is a second pass over the same bytes (about half of torch.save's time
    for a table of embeddings)."""
    from torch.utils.serialization import config

    return config.patch({"save.compute_crc32": False})
