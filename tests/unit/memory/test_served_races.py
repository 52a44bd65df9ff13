"""The error memory saved while its feed thread writes: ``SamplesFeed.close`` saves after a join that
timed out (a feed thread still in a re-key or a poll), and ``ServingStack`` closes every feed so."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from reloop.engine.features.featurizer import FeatureBatch, Featurizer
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.memory.served import ServedMemory
from reloop.engine.memory.sketch import SketchConfig
from reloop.engine.serve.bundle import ModelBundle

# A spec of the size of a real one: its JSON, made on each write, keeps the feed thread busy between
# the sketch's lock and the ring (where a save that came in between read a ring being changed).
SPEC = FeatureSpec(fields=tuple(CategoricalField(name=f"f{i}", buckets=40) for i in range(40)))
CONFIG = SketchConfig(n_tables=2, n_bits=6, lam=1.0)


class _Learner:
    """Cheap scores and keys: the feed thread's time goes to the memory, not to a model."""

    def predict_proba(self, batch: FeatureBatch) -> np.ndarray:
        return np.full(len(batch), 0.5)

    def hidden(self, batch: FeatureBatch) -> np.ndarray:
        return batch.cat[:, :4].astype(np.float32)


@pytest.fixture
def fast_switches() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_a_save_while_the_feed_writes_keeps_each_label_with_its_sample(tmp_path, fast_switches) -> None:
    bundle = ModelBundle(version=1, learner=_Learner(), featurizer=Featurizer(SPEC))
    click, skip = (bundle.featurizer.transform([{"f0": v}]) for v in ("clicked", "skipped"))
    clicked_id = int(click.cat[0, 0])
    size = 1000
    mem = ServedMemory(CONFIG, buffer=size)
    for i in range(size):  # a full ring: a clicked sample (label 1) and a skipped one (label 0) in turn
        mem.write(bundle, *((click, np.ones(1)) if i % 2 else (skip, np.zeros(1))))
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.is_set():
            mem.write(bundle, *((click, np.ones(1)) if i % 2 else (skip, np.zeros(1))))
            i += 1

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    path = tmp_path / "arm.npz"
    torn = saves = 0
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline and not torn:
            mem.save(path)
            saves += 1
            back = ServedMemory(CONFIG, buffer=size)
            back.load(path)
            kept = back.ring.read()
            assert kept is not None
            features, labels = kept
            torn += not np.array_equal(labels, (features.cat[:, 0] == clicked_id).astype(np.float64))
    finally:
        stop.set()
        writer.join(5)
    # The ring read its parts twice (features, then labels): a write in between shifted every label by
    # one sample, saved as is (the lengths matched) and restored at the next start.
    assert torn == 0, f"{torn} of {saves} saves paired labels with other samples"
