"""The serving bundle: a model version's weights alone, for the scoring service, beside the snapshot.

A training snapshot (``SnapshotRegistry.publish({"model": learner.state_dict(), "state": ...})``) holds
the weights AND the optimizer moments, RNG, joiner state: ~3x the weights for a sparse-Adam table. The
scoring service read all of it (read, checksum, unpickle) to keep a third, then built the model with a
random init it overwrote (``normal_`` on a 10^6-row table: a quarter of the load time). Publish-to-
serving at 10^6 rows was 1.15 s (docs/benchmarks.md).

The bundle is one safetensors file per version (tensors: the model's parameters and buffers, the wide
part's mean/var; metadata: the learner config) with a JSON manifest holding its CRC32C, under
``<registry root>/serving/``::

    serving/v000000000007.safetensors
    serving/v000000000007.json          {"format", "version", "file", "bytes", "crc32c", "created_unix"}

* written by the trainer at publish time, BEFORE the training snapshot of the same version (so serving
  does not wait for the optimizer state to be written): ``publish_serving_bundle(registry, learner)``,
  one call in ``Pipeline.snapshot``; file then manifest are renamed into place (a manifest always
  names a whole file), not fsynced (a torn bundle fails its checksum and the version loads from its
  fsynced snapshot); the newest ``keep`` are kept, and what a killed writer left is removed at the next
  write;
* read by the service: the file memory-mapped, its checksum checked against the manifest, the tensors
  views of the mapping (safetensors layout: tensors only, nothing is unpickled, nothing copied), the
  model built on the meta device (no init, no memory) and given those tensors; the optimizer state is
  never read;
* a version without a bundle (snapshots of older trainers, a river/FTRL learner) is loaded from the
  training snapshot's learner part as before (``reloop.engine.serve.loader``).

Versions (a serving fleet older than its trainer, in a rolling upgrade or a rollback): ``FORMAT``, in the
manifest and in the file's metadata, is what a reader must understand to serve the bundle as it was
meant. A reader refuses a bundle of another format, and one holding anything it does not know (a tensor
or a metadata key of a newer writer, which might change what the model computes), naming the file and
what it did not know; the service then loads the version from its training snapshot, as for a torn
bundle. A writer that adds anything to the bundle bumps ``FORMAT`` unless old readers may ignore it.
A learner config holding a model option this reloop does not know is refused the same way (the
snapshot's copy of it is then refused too: the version is not served, the older one stays).

The checksum guards against torn and corrupted files, which is all a checksum kept next to its file
can do (whoever can rewrite the file can rewrite the manifest). CRC32C (hardware, ~6 GB/s here, the
checksum of Kafka's own records) plus the exact length does that job; sha256 (~1 GB/s) cost ~70 ms on
each side of a 78 MB bundle, half of publish-to-serving at 10^6 rows (docs/benchmarks.md, figure 5).
Manifests written with a ``sha256`` (before) are still verified with it.

Limit: the version number is the training registry's next one at the time of the call; if the trainer
dies between the bundle and its snapshot, the restarted trainer publishes that version number again
with other weights, and a service that had loaded the orphan keeps it until the next version.
"""

from __future__ import annotations

import copy
import hashlib
import json
import mmap
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import orjson
import torch
from reloop.engine.checkpoint.registry import ChecksumError, SnapshotError

FORMAT = 1
DIR = "serving"
_FILE_RE = re.compile(r"^v(\d{12})\.json$")


def serving_dir(registry_root: str | os.PathLike[str]) -> Path:
    return Path(registry_root) / DIR


def serving_tensors(learner: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a torch learner's predictive state; None for other learners."""
    model = getattr(learner, "model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    tensors: dict[str, torch.Tensor] = {}
    # Parameters and ALL buffers (non-persistent ones too: a model built on the meta device has none).
    for name, t in model.named_parameters():
        tensors[f"model.{name}"] = t.detach().to("cpu").contiguous()
    for name, t in model.named_buffers():
        tensors[f"buffer.{name}"] = t.detach().to("cpu").contiguous()
    wide = getattr(learner, "wide", None)
    if wide is not None:
        tensors["wide.mean"] = torch.from_numpy(np.ascontiguousarray(wide.mean))
        tensors["wide.var"] = torch.from_numpy(np.ascontiguousarray(wide.var))
    meta = {"format": str(FORMAT), "config_json": learner.config.to_json()}
    return tensors, meta


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


_NAMES = {v: k for k, v in {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}.items()}  # fmt: skip


# Every tensor's data starts at a multiple of this in the file, so at that alignment in the mapping
# (mmap is page-aligned): torch's own allocations are 64-byte aligned, and its CPU kernels can take
# another path, rounding differently, on less aligned memory (a served DCN's score once differed from
# the trainer's in the 8th digit with its MLP weights at 4-byte alignment).
_ALIGN = 64
_PAD = "__pad"  # names of the uint8 filler entries that align the next tensor (safetensors has no holes)


def _write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[int, str]:
    """Write ``tensors`` in the safetensors layout straight from their memory (no serialised copy of
    the whole file first), checksumming as it goes; returns (bytes, crc32c hex). Each tensor starts
    ``_ALIGN``-aligned, after a filler entry where needed (``read_bundle`` drops them), so the reader
    maps it without copying and the model computes on it exactly as on the trainer's tensors."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": metadata}
    chunks: list[torch.Tensor] = []
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        gap = -offset % _ALIGN if size else 0
        if gap:
            header[f"{_PAD}{len(chunks)}__"] = {
                "dtype": "U8",
                "shape": [gap],
                "data_offsets": [offset, offset + gap],
            }
            chunks.append(torch.zeros(gap, dtype=torch.uint8))
            offset += gap
        header[name] = {
            "dtype": _NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        chunks.append(t)
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % _ALIGN)  # the data starts aligned too
    digest = crc32c.CRC32CHash()
    total = 0
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            digest.update(chunk)
            f.write(chunk)
            total += len(chunk)
        for t in chunks:
            t = t.contiguous()
            if t.numel() == 0:
                continue
            # reshape first: a 0-dim tensor (batch norm's num_batches_tracked) cannot change dtype size
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            digest.update(view)
            f.write(view)
            total += len(view)
    return total, digest.hexdigest()


def write_bundle(
    directory: str | os.PathLike[str], version: int, learner: Any, *, keep: int = 3
) -> Path | None:
    """Write the serving bundle of ``learner`` as ``version`` under ``directory``; returns the manifest
    path (None when the learner has no torch model: serving then reads the snapshot)."""
    found = serving_tensors(learner)
    if found is None:
        return None
    tensors, meta = found
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    # What a writer killed mid-write left (one writer per folder, as for the snapshots): a file the size
    # of the weights per kill, never read and never pruned otherwise.
    for entry in os.scandir(root):
        if entry.name.startswith(".tmp-") and not entry.is_dir(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
    name = f"v{version:012d}"
    tag = uuid.uuid4().hex[:8]
    tmp_data, tmp_manifest = root / f".tmp-{name}-{tag}.safetensors", root / f".tmp-{name}-{tag}.json"
    try:
        # Not fsynced: the bundle is a cache of the snapshot's weights. A bundle torn by a power loss
        # fails its checksum and the version is served from its (fsynced) training snapshot instead.
        size, checksum = _write_safetensors(tmp_data, tensors, meta)
        manifest = {
            "format": FORMAT,
            "version": version,
            "file": f"{name}.safetensors",
            "bytes": size,
            "crc32c": checksum,
            "created_unix": time.time(),
        }
        _write(tmp_manifest, json.dumps(manifest, sort_keys=True).encode())
        os.replace(tmp_data, root / manifest["file"])
        os.replace(tmp_manifest, root / f"{name}.json")  # last: a manifest always names a whole file
    finally:
        for p in (tmp_data, tmp_manifest):
            p.unlink(missing_ok=True)
    for old in bundle_versions(root)[:-keep]:
        for suffix in (".json", ".safetensors"):
            (root / f"v{old:012d}{suffix}").unlink(missing_ok=True)
    return root / f"{name}.json"


def publish_serving_bundle(registry: Any, learner: Any, *, keep: int = 3) -> int | None:
    """The call for ``Pipeline.snapshot``, just before ``registry.publish`` of a period snapshot: writes
    the bundle of the version that publish is about to take (``registry.next_version()``: newest + 1,
    past any stray entry holding a version's name, exactly as publish counts). Returns that version, or
    None when the learner has no torch model."""
    version = registry.next_version()
    written = write_bundle(serving_dir(registry.root), version, learner, keep=keep)
    return None if written is None else version


def serving_parts(learner: Any) -> dict[str, Any]:
    """Nothing to add to the snapshot's own parts: the bundle is its own file (publish_serving_bundle)."""
    return {}


def bundle_versions(directory: str | os.PathLike[str]) -> list[int]:
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for e in os.scandir(root) if (m := _FILE_RE.match(e.name)))


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_bundle(
    directory: str | os.PathLike[str], version: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a bundle, checksummed; SnapshotError/ChecksumError when unusable.

    The file is memory-mapped and the tensors are views of the mapping (read-only, shared with the page
    cache): no copy, so a loaded version costs its weights once in resident memory. A file replaced or
    pruned later does not change a mapping already made (a new version is a new file)."""
    root = Path(directory)
    where = root / f"v{version:012d}.json"
    try:
        manifest = json.loads(where.read_text())
        # Its own file, in this folder, not through a link: a manifest naming "../x" or "/x" had the
        # service map and serve any file it could read.
        if manifest["file"] != f"v{version:012d}.safetensors":
            raise ValueError(f"its manifest names file {manifest['file']!r:.100}, not this version's")
        fd = os.open(root / manifest["file"], os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"serving bundle {version} under {root} cannot be read ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"serving bundle {where}: {_format_problem(manifest.get('format'))}")
    if manifest.get("version") != version:
        raise SnapshotError(f"serving bundle {where}: its manifest names version {manifest.get('version')!r}")
    kind = "crc32c" if "crc32c" in manifest else "sha256"  # sha256: manifests written before
    digest = crc32c.CRC32CHash(mapped) if kind == "crc32c" else hashlib.sha256(mapped)
    if size != manifest.get("bytes") or digest.hexdigest() != manifest.get(kind):
        raise ChecksumError(f"serving bundle {version}: fails its {kind} checksum")
    try:
        n = int.from_bytes(mapped[:8], "little")
        header = json.loads(bytes(mapped[8 : 8 + n]))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a {type(header).__name__}, not an object")
        metadata = dict(header.get("__metadata__") or {})
        start = 8 + n
        tensors: dict[str, torch.Tensor] = {}
        with warnings.catch_warnings():
            # The mapping is read-only and torch says so; serving never writes the weights.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            for name, info in header.items():
                if name == "__metadata__" or name.startswith(_PAD):
                    continue
                dtype = _DTYPES[info["dtype"]]
                lo, hi = info["data_offsets"]
                count = (hi - lo) // dtype.itemsize
                offset = start + lo
                if count == 0:
                    t = torch.empty(0, dtype=dtype)
                elif offset % dtype.itemsize:  # unaligned: copy (never for what write_bundle writes)
                    t = torch.frombuffer(bytearray(mapped[offset : hi + start]), dtype=dtype)
                else:
                    t = torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset)
                tensors[name] = t.reshape(info["shape"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise SnapshotError(f"serving bundle {version} does not load ({exc!r:.300})") from exc
    return tensors, metadata


def _format_problem(found: object) -> str:
    """Why a bundle of format ``found`` (from its manifest or metadata) is not read here."""
    try:
        newer = int(str(found)) > FORMAT
    except ValueError:
        newer = False
    if newer:
        return (
            f"format {found}, written by a newer reloop; this one reads format {FORMAT} "
            "(the version is loaded from its training snapshot)"
        )
    return f"format {found!r}, this reloop reads format {FORMAT}"


# What a bundle of this FORMAT may hold; anything else was written by a newer writer (see the module doc).
_META_KEYS = frozenset({"format", "config_json"})
_TENSOR_PREFIXES = ("model.", "buffer.")
_WIDE = ("wide.mean", "wide.var")


_SHELLS: dict[str, tuple[Any, torch.nn.Module]] = {}
_SHELLS_KEEP = 4


def _shell(config_json: str) -> tuple[Any, torch.nn.Module]:
    """(config, a fresh model on the meta device) for a learner config. Building one runs the model's
    constructors and their inits on meta (~3.5 ms of Python for the benchmark's DCN, holding the GIL
    that requests need); a version with the same config as the last ones deep-copies a cached shell
    instead (~0.7 ms). Bounded: the newest few configs."""
    from reloop.engine.models.registry import (
        UnknownBackbone,
        config_from_dict,
        learner_from_config,
        not_registered_here,
    )

    cached = _SHELLS.get(config_json)
    if cached is None:
        try:
            config = config_from_dict(orjson.loads(config_json))
        except UnknownBackbone as exc:
            raise SnapshotError(not_registered_here(exc)) from exc
        except ValueError as exc:  # orjson's JSONDecodeError is one
            raise SnapshotError(
                f"its learner config does not load in this reloop ({exc}): a model option or backbone of "
                "a newer reloop?"
            ) from exc
        with torch.device("meta"):
            shell = learner_from_config(config)
        model = getattr(shell, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise SnapshotError(f"backbone {config.backbone!r} is not a torch model")
        cached = _SHELLS[config_json] = (config, model)
        while len(_SHELLS) > _SHELLS_KEEP:
            del _SHELLS[next(iter(_SHELLS))]
    config, model = cached
    return config, copy.deepcopy(model)


def learner_from_bundle(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], *, name: str = "serving bundle"
) -> Any:
    """A predict-only learner from bundle tensors: the model is built on the meta device (no random
    init, no memory) and takes the loaded tensors as they are; every parameter and buffer must be there
    with its shape, nothing else (else SnapshotError, its message starting with ``name``)."""
    try:
        return _learner_from_bundle(tensors, meta)
    except SnapshotError as exc:
        raise SnapshotError(f"{name}: {exc}") from exc


def _learner_from_bundle(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Any:
    from reloop.engine.models.learner import FrozenTorchLearner, _make_wide

    if meta.get("format") != str(FORMAT):
        raise SnapshotError(_format_problem(meta.get("format")))
    if "config_json" not in meta:
        raise SnapshotError("no learner config in its metadata")
    unknown = sorted(set(meta) - _META_KEYS) + sorted(
        k for k in tensors if not k.startswith(_TENSOR_PREFIXES) and k not in _WIDE
    )
    if unknown:
        raise SnapshotError(
            f"it holds what format {FORMAT} does not have ({unknown[:5]}): written by a newer reloop that "
            "did not change the format?"
        )
    config, model = _shell(meta["config_json"])
    expected = {f"model.{n}": t for n, t in model.named_parameters()}
    expected.update({f"buffer.{n}": t for n, t in model.named_buffers()})
    given = {k: v for k, v in tensors.items() if k.startswith(("model.", "buffer."))}
    if set(given) != set(expected):
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        raise SnapshotError(f"it does not fit its model: missing {missing[:5]}, extra {extra[:5]}")
    for key, value in given.items():
        if tuple(value.shape) != tuple(expected[key].shape) or value.dtype != expected[key].dtype:
            raise SnapshotError(f"{key} is {tuple(value.shape)} {value.dtype}")
        kind, _, path = key.partition(".")
        owner_name, _, leaf = path.rpartition(".")
        owner = model.get_submodule(owner_name)
        if kind == "model":
            # requires_grad as the learner's own parameters: some CPU kernels differ without it
            owner._parameters[leaf] = torch.nn.Parameter(value)
        else:
            owner._buffers[leaf] = value
    wide = _make_wide(config)
    if wide is not None:
        if "wide.mean" not in tensors or "wide.var" not in tensors:
            raise SnapshotError("the learner has a wide part, the bundle does not")
        mean, var = tensors["wide.mean"].numpy(), tensors["wide.var"].numpy()
        if mean.shape != (wide.size,) or var.shape != (wide.size,):
            raise SnapshotError(f"wide part of {mean.shape[0]} rows, the spec needs {wide.size}")
        wide.mean, wide.var = mean.astype(np.float64, copy=False), var.astype(np.float64, copy=False)
    elif any(k in tensors for k in _WIDE):
        raise SnapshotError("it holds a wide part, its learner config has none")
    return FrozenTorchLearner(model=model, config=config, wide=wide)
