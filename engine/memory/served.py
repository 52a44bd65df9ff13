"""The error memory of one serving arm: corrects the live bundle's scores, learns from joined samples.

* Scoring (request threads): one forward pass gives the base prediction AND the hidden layer (the
  key); the sketch corrects the prediction. A memory that belongs to another model version than the
  bundle scoring the request does not correct (its keys and residuals are the old model's).
* Writing (the samples feed's thread, engine/memory/feed.py): each joined sample is keyed and its base
  prediction recomputed with the LIVE bundle (the logged served prediction includes the memory's own
  correction, and may come from an older version), then written.
* A new snapshot re-keys the memory: the last ``buffer`` samples written (their features and labels,
  kept in a ring) are keyed and predicted again by the new model into a fresh sketch, which replaces
  the old one in one assignment; with ``buffer = 0`` the memory is simply emptied.
* ``save``/``load``: one ``.npz`` (numpy arrays only, read with ``allow_pickle=False``): the sketch,
  the version it belongs to, the ring, the feed's positions and the samples it wrote (their
  identities), so a restarted service goes on where it stopped (and re-keys if the snapshot changed
  meanwhile).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from reloop.engine.appending import replace_whole
from reloop.engine.features.featurizer import FeatureBatch
from reloop.engine.memory.seen import SeenSeqs
from reloop.engine.memory.sketch import ErrorSketch, SketchConfig

STATE_FORMAT = 1


def predict_and_hidden(learner: Any, batch: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
    """(P(click) float64 [B], hidden float32 [B, H]) in ONE forward pass for a frozen torch learner
    without a wide part (the serving default); two calls otherwise. The probabilities are computed
    exactly as ``FrozenTorchLearner.predict_proba`` does (a test checks they are equal)."""
    model = getattr(learner, "model", None)
    if isinstance(model, torch.nn.Module) and getattr(learner, "wide", None) is None:
        device = getattr(learner, "device", torch.device("cpu"))
        with torch.inference_mode():
            out = model(batch.to_torch(device))
        probs = torch.sigmoid(out["logit"].double()).cpu().numpy()
        return probs, out["hidden"].float().cpu().numpy().reshape(len(batch), -1)
    if not hasattr(learner, "hidden"):
        raise TypeError(f"{type(learner).__name__} has no hidden layer to key an error memory with")
    probs = np.asarray(learner.predict_proba(batch), dtype=np.float64)
    return probs, np.asarray(learner.hidden(batch), dtype=np.float32).reshape(len(batch), -1)


class _Ring:
    """The last ``size`` written samples (featurised) and their labels, oldest first when read.

    ``spec`` is the JSON of the feature spec that featurised them (None: unknown, a state saved before
    it was recorded): the rows are embedding ids of that spec, meaningless (or out of range, an
    IndexError in the model) for a model with another spec."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.parts: list[tuple[FeatureBatch, np.ndarray]] = []
        self.count = 0
        self.spec: str | None = None

    def add(self, batch: FeatureBatch, labels: np.ndarray, spec: str | None = None) -> None:
        if self.size == 0:
            return
        if spec != self.spec:  # rows of another spec cannot be mixed with these: start over
            self.parts, self.count, self.spec = [], 0, spec
        self.parts.append((batch, labels))
        self.count += len(labels)
        while self.parts and self.count - len(self.parts[0][1]) >= self.size:
            self.count -= len(self.parts.pop(0)[1])

    def read(self) -> tuple[FeatureBatch, np.ndarray] | None:
        if not self.parts:
            return None
        batch = FeatureBatch.concat([b for b, _ in self.parts])
        labels = np.concatenate([y for _, y in self.parts])
        keep = min(self.size, len(labels))
        return batch.take(slice(len(labels) - keep, None)), labels[-keep:]


class ServedMemory:
    """Thread-safe: requests read while the feed thread writes and re-keys."""

    def __init__(self, config: SketchConfig, buffer: int = 20_000, rekey_chunk: int = 4096) -> None:
        self.config = config
        self.ring = _Ring(buffer)
        self.rekey_chunk = rekey_chunk
        self.sketch: ErrorSketch | None = None
        self.version: int | None = None
        self.positions: dict[str, int] = {}
        self.seen = SeenSeqs()  # the feed's: samples written already (engine/memory/seen.py)
        self.written = 0
        self.rekeys = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ request path
    def score(self, bundle: Any, batch: FeatureBatch) -> np.ndarray:
        """The bundle's probabilities for ``batch``, corrected when the memory is of this version."""
        base, keys = predict_and_hidden(bundle.learner, batch)
        with self._lock:
            # The sketch and its version are read together: a re-key between two unlocked reads gave
            # the old model's sketch with the new version, i.e. corrections keyed by another model.
            sketch, version = self.sketch, self.version
            if sketch is None or version != bundle.version or sketch.dim != keys.shape[1]:
                return base
            return sketch.correct(base, keys)

    # ------------------------------------------------------------------ feed path
    def write(
        self, bundle: Any, batch: FeatureBatch, labels: np.ndarray, times_ms: np.ndarray | None = None
    ) -> None:
        """Key and predict joined samples with the live ``bundle``, then write them (``times_ms``, when
        each was shown, is not used: a memory keys samples by what the model makes of them)."""
        if self.version != bundle.version:
            self.rekey(bundle)
        y = np.asarray(labels, dtype=np.float64)
        base, keys, scored_y = _finite(*predict_and_hidden(bundle.learner, batch), y)
        spec = _spec_json(bundle)
        with self._lock:
            if self.sketch is None or self.sketch.dim != keys.shape[1]:
                self.sketch = ErrorSketch(keys.shape[1], self.config)
            self.sketch.write(keys, scored_y, base)
            self.written += len(scored_y)
            # all of them: the next model may score what this one could not. Under the lock: save() reads
            # the ring under it (close() saves while this thread may still write), and a ring changed
            # between its reads of the features and of the labels saved labels beside other samples.
            self.ring.add(batch, y, spec)

    def rekey(self, bundle: Any) -> None:
        """A fresh sketch for ``bundle``'s model, filled with the ring's samples keyed by it."""
        sketch: ErrorSketch | None = None
        fits = _ring_fits(self.ring, bundle)
        with self._lock:  # the ring changes under the lock (save() reads it under it; see write)
            if not fits:
                # Rows of another feature spec (a snapshot whose spec changed): ids this model cannot read;
                # re-keying them failed with an IndexError at every poll, the memory dead for good.
                self.ring = _Ring(self.ring.size)
            self.ring.spec = _spec_json(bundle)
        kept = self.ring.read()  # outside the lock: only this (the feed's) thread changes the ring
        if kept is not None:
            batch, y = kept
            for s in range(0, len(y), self.rekey_chunk):
                part = batch.take(slice(s, s + self.rekey_chunk))
                base, keys, part_y = _finite(
                    *predict_and_hidden(bundle.learner, part), y[s : s + self.rekey_chunk]
                )
                if sketch is None:
                    sketch = ErrorSketch(keys.shape[1], self.config)
                sketch.write(keys, part_y, base)
        with self._lock:
            self.sketch, self.version = sketch, bundle.version
        self.rekeys += 1

    # ------------------------------------------------------------------ state
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state atomically (temporary file, then rename)."""
        path = Path(path)
        with self._lock:
            arrays: dict[str, np.ndarray] = {
                "format": np.array(STATE_FORMAT),
                "version": np.array(-1 if self.version is None else self.version, dtype=np.int64),
                "position_keys": np.array(sorted(self.positions), dtype=np.str_),
                "position_values": np.array(
                    [self.positions[k] for k in sorted(self.positions)], dtype=np.int64
                ),
                **self.seen.arrays(),
            }
            if self.sketch is not None:
                arrays.update({f"sketch.{k}": v for k, v in self.sketch.state_dict().items()})
            kept, ring_spec = self.ring.read(), self.ring.spec
        if kept is not None:
            batch, y = kept
            arrays.update(
                {
                    "ring.cat": batch.cat,
                    "ring.num": batch.num,
                    "ring.multi": batch.multi,
                    "ring.multi_mask": batch.multi_mask,
                    "ring.labels": y,
                }  # fmt: skip
            )
            if ring_spec is not None:
                arrays["ring.spec"] = np.array(ring_spec, dtype=np.str_)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary name of its own: two saves at once (close() while the feed thread, not yet
        # joined, saves too) shared one ".tmp" and interleaved their bytes, or renamed it away under
        # the other one.
        replace_whole(path, lambda f: np.savez(f, **arrays))

    def load(self, path: str | os.PathLike[str]) -> None:
        """Restore a ``save``d state (no pickle); a state of another sketch layout is refused. An
        unreadable file (empty, truncated, corrupt) is a ValueError too, so callers can start empty."""
        try:
            with np.load(path, allow_pickle=False) as f:
                a: Mapping[str, np.ndarray] = {k: f[k] for k in f.files}
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - EOFError, BadZipFile, TokenError...: all "unreadable"
            why = f"{type(exc).__name__}: {exc}"
            raise ValueError(f"error memory state {path} is unreadable ({why})") from exc
        try:
            found = int(a["format"]) if "format" in a else None
        except (TypeError, ValueError):
            found = None
        if found != STATE_FORMAT:
            newer = " (written by a newer reloop)" if found is not None and found > STATE_FORMAT else ""
            raise ValueError(
                f"error memory state {path}: format {found}{newer}, this reloop reads {STATE_FORMAT}"
            )
        missing = [k for k in ("version", "position_keys", "position_values") if k not in a]
        if missing:
            raise ValueError(f"error memory state {path} lacks {missing}")
        sketch = None
        if "sketch.shape" in a:
            try:
                sketch = ErrorSketch(int(a["sketch.shape"][0]), self.config)
                sketch.load_state_dict(
                    {k[len("sketch.") :]: v for k, v in a.items() if k.startswith("sketch.")}
                )
            except (KeyError, TypeError, IndexError) as exc:  # a sketch state of another shape
                raise ValueError(f"error memory state {path}: its sketch does not load ({exc!r})") from exc
        ring = _Ring(self.ring.size)
        if "ring.labels" in a:
            rows = {len(a[f"ring.{k}"]) for k in ("cat", "num", "multi", "multi_mask", "labels")}
            if len(rows) != 1:  # labels would be paired with other samples' features
                raise ValueError(f"error memory state {path}: ring arrays of lengths {sorted(rows)}")
            ring.add(
                FeatureBatch(
                    cat=a["ring.cat"],
                    num=a["ring.num"],
                    multi=a["ring.multi"],
                    multi_mask=a["ring.multi_mask"],
                ),  # fmt: skip
                a["ring.labels"],
                str(a["ring.spec"]) if "ring.spec" in a else None,
            )
        version = int(a["version"])
        with self._lock:
            self.sketch, self.ring = sketch, ring
            self.version = None if version < 0 else version
            self.positions = dict(
                zip(a["position_keys"].tolist(), a["position_values"].tolist(), strict=True)
            )
            self.seen.load_arrays(a)


def _spec_json(bundle: Any) -> str | None:
    spec = getattr(bundle.featurizer, "spec", None)
    return spec.to_json() if hasattr(spec, "to_json") else None


def _ring_fits(ring: _Ring, bundle: Any) -> bool:
    """Whether the ring's rows can be read by ``bundle``'s model: rows of the same spec; for a ring
    of unknown spec, rows of the spec's shape with ids inside its table."""
    mine = _spec_json(bundle)
    if ring.spec is not None or mine is None:
        return ring.spec == mine
    spec = bundle.featurizer.spec
    for batch, _ in ring.parts:
        n = len(batch)
        if (
            batch.cat.shape != (n, len(spec.cat_fields))
            or batch.num.shape != (n, len(spec.dense_fields))
            or batch.multi.shape != (n, len(spec.multi_fields), spec.max_multi_len)
            or batch.multi_mask.shape != batch.multi.shape
            or (batch.cat.size and not 0 <= batch.cat.min() <= batch.cat.max() < spec.total_rows)
            or (batch.multi.size and not 0 <= batch.multi.min() <= batch.multi.max() < spec.total_rows)
        ):
            return False
    return True


def _finite(base: np.ndarray, keys: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The samples the model could score (a value it cannot take gives NaN): a NaN key or prediction
    in the sketch would spread NaN corrections, and NaN scores, to every request hashed near it."""
    ok = np.isfinite(base) & np.isfinite(keys).all(axis=1)
    if ok.all():
        return base, keys, y
    return base[ok], keys[ok], y[ok]
