"""Bad input refused before anything changes, state that survives a load, replay bookkeeping, period
boundaries against a brute-force reference, torn ledgers and the offline trainer's empty sets."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer, NumericField
from reloop.engine.models.registry import build_learner
from reloop.engine.train.ledger import Ledger
from reloop.engine.train.offline import ArrayDataset, OfflineConfig, OfflineTrainer
from reloop.engine.train.period import PeriodTrigger
from reloop.engine.train.replay_buffer import ReplayBuffer
from reloop.engine.train.stream import StreamTrainer, StreamTrainerConfig

SPEC = FeatureSpec(fields=(CategoricalField(name="user", buckets=50), NumericField(name="x")))


def _trainer(model: str = "lr", **cfg) -> StreamTrainer:
    learner = build_learner(model, SPEC, "reloop", 0.5, seed=0)
    return StreamTrainer(learner=learner, featurizer=Featurizer(SPEC), config=StreamTrainerConfig(**cfg))


def _samples(n: int, start: int = 0, version: int = 0, x: float = 0.5) -> list[LabeledSample]:
    rng = np.random.default_rng(start)
    return [
        LabeledSample(
            f"s{start + i}",
            {"user": f"u{rng.integers(20)}", "x": x},
            int(rng.random() < 0.4),
            float(rng.uniform(0.05, 0.95)),
            version,
            1000 + start + i,
        )
        for i in range(n)
    ]


def _snapshot(t: StreamTrainer) -> dict:
    return copy.deepcopy({**t.state_dict(), "window": t.progressive.window()})


def _assert_same(a: dict, b: dict) -> None:
    assert a["counters"] == b["counters"]
    assert a["window"] == b["window"]
    for name, ta in a["learner"]["model"].items():
        torch.testing.assert_close(b["learner"]["model"][name], ta, rtol=0, atol=0)
    if "replay" in a:
        assert {k: v for k, v in a["replay"].items() if k != "rows"} == {
            k: v for k, v in b["replay"].items() if k != "rows"
        }


@pytest.mark.parametrize(
    "bad",
    [
        {"label": 2},
        {"label": 0.5},  # cast to 0 by the metric: learnt as a soft label, counted as a negative
        {"label": math.nan},
        {"served_prediction": 1.5},
        {"served_prediction": -0.1},
        {"served_prediction": math.inf},
        {"weight": -1.0},
    ],
)
def test_bad_input_is_refused_before_the_model_or_any_counter_changes(bad):
    t = _trainer(replay_size=64)
    t.train_batch(_samples(8))
    t.on_snapshot(1)
    before = _snapshot(t)
    batch = _samples(8, start=8, version=0)  # a version mismatch too: counted only if the step happens
    batch[5] = replace(batch[5], **bad)
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        t.train_batch(batch)
    after = _snapshot(t)
    _assert_same(before, after)
    # The same trainer goes on with good input as if the bad batch had never come.
    ref = _trainer(replay_size=64)
    ref.train_batch(_samples(8))
    ref.on_snapshot(1)
    good = _samples(8, start=16)
    np.testing.assert_array_equal(t.train_batch(good).scores, ref.train_batch(good).scores)
    assert t.counters == ref.counters and t.progressive.window() == ref.progressive.window()


def test_a_nan_served_prediction_is_an_unknown_y_last_not_an_error():
    t = _trainer()
    batch = _samples(4)
    batch[0] = replace(batch[0], served_prediction=math.nan)
    assert math.isnan(t.train_batch(batch).y_last[0])


class _Failing:
    """A learner whose step fails (e.g. out of memory) after y_last was worked out."""

    def __init__(self, inner):
        self.inner = inner

    def predict_proba(self, batch):
        return self.inner.predict_proba(batch)

    def learn(self, *args, **kwargs):
        raise RuntimeError("step failed")

    def clone_frozen(self):
        return self.inner.clone_frozen()


@pytest.mark.parametrize("cfg", [{"y_last": "snapshot"}, {"version_mismatch": "skip_sc"}])
def test_a_step_that_fails_counts_nothing(cfg):
    t = _trainer(**cfg)
    t.on_snapshot(1)
    t.learner = _Failing(t.learner)
    counters = copy.deepcopy(t.counters)
    with pytest.raises(RuntimeError, match="step failed"):
        t.train_batch(_samples(6, version=0))  # served by version 0, previous snapshot 1
    assert t.counters == counters


def test_load_state_dict_leaves_nothing_of_the_loading_trainers_past():
    saved = _trainer(version_mismatch="recompute")
    saved.train_batch(_samples(8))
    state = copy.deepcopy(saved.state_dict())  # before any snapshot: no previous version
    other = _trainer(version_mismatch="recompute")
    other.train_batch(_samples(8, start=100))
    other.on_snapshot(9)
    other.load_state_dict(state)
    assert (other.prev_version, other.prev_model) == (None, None)
    batch = _samples(8, start=8, version=4)
    a, b = saved.train_batch(batch), other.train_batch(batch)
    np.testing.assert_array_equal(a.y_last, b.y_last)  # the logged value, as no snapshot was made yet
    assert saved.counters == other.counters


def test_rows_the_model_cannot_take_stay_out_of_the_replay_buffer():
    t = _trainer(replay_size=100, replay_ratio=1.0, batch_size=8)
    batch = _samples(8)
    batch[3] = replace(batch[3], features={"user": "u1", "x": 1e30})  # its logit is not finite
    r = t.train_batch(batch)
    assert r.unlearnt is not None and np.flatnonzero(r.unlearnt).tolist() == [3]
    assert t.replay is not None and t.replay.size == 7
    assert not np.any(np.abs(t.replay.state_dict()["rows"]["num"].numpy()) > 1e6)
    lost = t.counters.skipped_samples
    for k in range(1, 6):
        t.train_batch(_samples(8, start=8 * k))
    assert t.counters.replayed > 0
    assert t.counters.skipped_samples == lost  # no replayed draw trips over the dead-lettered row


def _batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [{"user": f"u{rng.integers(9)}", "x": float(rng.random())} for _ in range(n)]
    return Featurizer(SPEC).transform(rows), (rng.random(n) < 0.5).astype(np.float32)


def test_replay_owes_its_ratio_for_every_sample_even_those_the_ring_drops():
    buf = ReplayBuffer(capacity=4, ratio=1.5, batch_size=2)
    batch, labels = _batch(10)
    buf.add(batch, labels)
    assert (buf.size, buf.added, buf.debt) == (4, 10, 15.0)
    assert sum(len(d.labels) for d in buf.take()) == 14  # 1.5 per sample, in whole batches of 2


def test_replay_refuses_columns_of_another_length_and_keeps_its_rows():
    buf = ReplayBuffer(capacity=6, ratio=1.0, batch_size=2)
    batch, labels = _batch(6)
    buf.add(batch, labels)
    before = buf.state_dict()
    new, new_labels = _batch(3, seed=1)
    with pytest.raises(ValueError, match="labels"):
        buf.add(new, new_labels[:1])  # one label for three rows would broadcast
    with pytest.raises(ValueError, match="y_last"):
        buf.add(new, new_labels, y_last=np.array([0.5, 0.5]))
    after = buf.state_dict()
    for k, v in before["rows"].items():
        torch.testing.assert_close(after["rows"][k], v, rtol=0, atol=0, equal_nan=True)
    assert {k: v for k, v in after.items() if k != "rows"} == {k: v for k, v in before.items() if k != "rows"}
    fresh = ReplayBuffer(capacity=6, ratio=1.0, batch_size=2)
    with pytest.raises(ValueError):
        fresh.add(new, new_labels[:2])
    assert fresh.nbytes == 0 and "rows" not in fresh.state_dict()


# ---------------------------------------------------------------------------- period boundaries
def _reference_boundaries(events, every_samples=None, every_event_ms=None):
    """Brute force: the steps (index into ``events``) after which a boundary is due, each marked."""
    fired, last_samples, last_period, top = [], 0, None, None
    for i, (samples, t) in enumerate(events):
        if every_samples is not None:
            if samples - last_samples >= every_samples:
                fired.append(i)
                last_samples = samples
            continue
        top = t if top is None else max(top, t)  # what the pipelines give: the newest event time
        period = top // every_event_ms
        if last_period is None:
            last_period = period
        elif period > last_period:
            fired.append(i)
            last_period = period
    return fired


@pytest.mark.parametrize("seed", range(5))
def test_count_and_event_time_boundaries_match_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    steps = rng.integers(1, 40, size=200)
    samples = np.cumsum(steps)
    # Event times with gaps (whole periods skipped), out of order within a few periods.
    times = np.cumsum(rng.choice([0, 1, 5, 300, 2500], size=200)) + rng.integers(-900, 900, size=200) + 10_000
    events = list(zip(samples.tolist(), times.tolist(), strict=True))
    for kw in ({"every_samples": 100}, {"every_event_ms": 1000}):
        p = PeriodTrigger(**kw)
        got, top = [], None
        for i, (n, t) in enumerate(events):
            top = t if top is None else max(top, t)
            if p.due(samples=n, event_time_ms=top, now_ms=0):
                got.append(i)
                p.mark(samples=n, event_time_ms=top, now_ms=0)
        assert got == _reference_boundaries(events, **kw), kw
        assert got


def test_an_event_time_period_fires_once_even_when_marked_with_an_older_time():
    p = PeriodTrigger(every_event_ms=1000)
    assert not p.due(samples=1, event_time_ms=500, now_ms=0)
    assert p.due(samples=2, event_time_ms=2000, now_ms=0)
    p.mark(samples=2, event_time_ms=2000, now_ms=0)
    assert not p.due(samples=3, event_time_ms=1500, now_ms=0)  # a late sample
    p.mark(samples=3, event_time_ms=1500, now_ms=0)  # a boundary marked with that late sample's time
    assert not p.due(samples=4, event_time_ms=2500, now_ms=0)  # period 2 was published already
    assert p.due(samples=5, event_time_ms=3000, now_ms=0)


def test_a_wall_clock_stepped_back_does_not_hold_the_next_boundary_back():
    w = PeriodTrigger(every_wall_s=60)
    t0 = 1_700_000_000_000
    assert not w.due(samples=0, event_time_ms=None, now_ms=t0)
    back = t0 - 3_600_000  # NTP steps the clock back an hour
    assert not w.due(samples=1, event_time_ms=None, now_ms=back)
    assert not w.due(samples=1, event_time_ms=None, now_ms=back + 59_999)
    assert w.due(samples=1, event_time_ms=None, now_ms=back + 60_000)
    w.mark(samples=1, event_time_ms=None, now_ms=back + 60_000)
    assert not w.due(samples=2, event_time_ms=None, now_ms=back + 119_999)
    assert w.due(samples=2, event_time_ms=None, now_ms=back + 120_000)


# ---------------------------------------------------------------------------- ledger
def test_a_ledger_torn_by_a_crash_reads_its_complete_entries(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append(1, _samples(3))
    ledger.close()
    whole = Ledger.read(path)
    with open(path, "ab") as f:
        f.write(b'[2,"s9')  # the crash came in the middle of a line
    assert Ledger.read(path) == whole and len(whole) == 3


def test_truncating_a_ledger_to_more_than_it_holds_is_refused(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append(1, _samples(2))
    length = ledger.sync()
    content = path.read_bytes()
    with pytest.raises(ValueError, match="entries lost"):
        ledger.truncate(length + 10)
    ledger.close()
    assert path.read_bytes() == content  # not padded with NUL bytes


# ---------------------------------------------------------------------------- offline
def test_offline_fit_refuses_an_empty_validation_set():
    featurizer = Featurizer(SPEC)
    rows = [{"user": f"u{i % 4}", "x": 0.5} for i in range(64)]
    data = ArrayDataset(
        featurizer.transform(rows), np.array([i % 4 == 0 for i in range(64)], dtype=np.float32)
    )
    learner = build_learner("lr", SPEC, "ce", 0.0, seed=0)
    with pytest.raises(ValueError, match="0 to validate"):
        OfflineTrainer(OfflineConfig(epochs=3, batch_size=16)).fit(
            learner, data, valid=data.take(slice(0, 0))
        )
