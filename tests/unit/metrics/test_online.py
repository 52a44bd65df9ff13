"""Online metrics: exact rolling AUC against brute force, reverts included; LogLoss; calibration; the book."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reloop.engine.events.schema import LabeledSample
from reloop.engine.metrics.online import (
    Calibration,
    ExactAUC,
    LogLoss,
    OnlineMetricsBook,
    RollingBinaryMetrics,
)
from reloop.engine.metrics.rolling_batch import BatchRollingMetrics
from reloop.engine.metrics.stats import EngineStats


def brute_auc(window: list[tuple[int, float]]) -> float:
    pos = [p for y, p in window if y == 1]
    neg = [p for y, p in window if y == 0]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


class WindowModel:
    """The documented semantics, written the slow obvious way."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[tuple[int, float]] = []

    def update(self, y: int, p: float) -> None:
        self.items.append((y, p))
        if len(self.items) > self.size:
            self.items.pop(0)

    def revert(self, y: int, p: float) -> bool:
        for i in range(len(self.items) - 1, -1, -1):
            if self.items[i] == (y, p):
                del self.items[i]
                return True
        return False


# Scores from a small grid make ties common; the float strategy covers the general case.
scores = st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0))
kinds = st.sampled_from(["update", "update", "update", "revert", "late_click"])
ops = st.lists(st.tuples(kinds, st.integers(0, 1), scores), max_size=120)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


@settings(max_examples=300, deadline=None)
@given(window=st.integers(1, 12), ops=ops)
def test_rolling_auc_equals_brute_force_on_the_same_window(window, ops):
    m = RollingBinaryMetrics(window)
    model = WindowModel(window)
    emitted: list[float] = []
    for op, y, p in ops:
        if op == "update":
            m.update(y, p)
            model.update(y, p)
            if y == 0:
                emitted.append(p)
        elif op == "revert":
            assert m.revert(y, p) == model.revert(y, p)
        elif emitted:
            # A late click: the negative emitted earlier becomes a positive.
            p = emitted.pop(0)
            assert m.revert(0, p) == model.revert(0, p)
            m.update(1, p)
            model.update(1, p)
        assert m.window() == model.items
        assert len(m) == len(model.items)
        assert same(m.auc.get(), brute_auc(model.items))
        ys = [y for y, _ in model.items]
        expected_ctr = sum(ys) / len(ys) if ys else math.nan
        assert same(m.calibration.observed_ctr, expected_ctr)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), scores), max_size=60), st.integers(1, 30))
def test_restore_equals_original(samples, window):
    m = RollingBinaryMetrics(window)
    for y, p in samples:
        m.update(y, p)
    r = RollingBinaryMetrics.from_state_dict(m.state_dict())
    assert r.window() == m.window()
    for key, value in m.get().items():
        assert same(r.get()[key], value), key
    # And it keeps working identically after the restore.
    for y, p in [(1, 0.3), (0, 0.3), (0, 0.9)]:
        m.update(y, p)
        r.update(y, p)
    assert same(r.auc.get(), m.auc.get())


def test_exact_auc_matches_rank_formula_on_random_data():
    rng = np.random.default_rng(7)
    ys = rng.integers(0, 2, 2000)
    ps = np.round(rng.random(2000), 2)  # rounding forces many ties
    auc = ExactAUC()
    for y, p in zip(ys, ps, strict=True):
        auc.update(int(y), float(p))
    # Mann-Whitney with mid-ranks.
    order = np.argsort(ps, kind="mergesort")
    ranks = np.empty(len(ps))
    sorted_ps = ps[order]
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and sorted_ps[j + 1] == sorted_ps[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos = int(ys.sum())
    n_neg = len(ys) - n_pos
    expected = (ranks[ys == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert auc.get() == pytest.approx(expected, abs=1e-12)
    assert ExactAUC.from_samples(ys, ps).get() == pytest.approx(expected, abs=1e-12)


def test_auc_undefined_with_one_class_and_revert_of_unknown_sample_raises():
    auc = ExactAUC()
    auc.update(1, 0.4)
    assert math.isnan(auc.get())
    with pytest.raises(ValueError):
        auc.revert(0, 0.4)
    with pytest.raises(ValueError):
        auc.update(2, 0.4)
    with pytest.raises(ValueError):
        auc.update(1, float("nan"))


def test_logloss_values_and_revert():
    ll = LogLoss()
    ll.update(1, 0.8)
    ll.update(0, 0.3)
    assert ll.get() == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    ll.revert(0, 0.3)
    assert ll.get() == pytest.approx(-math.log(0.8))
    ll.revert(1, 0.8)
    assert math.isnan(ll.get())
    with pytest.raises(ValueError):
        ll.revert(1, 0.8)
    # Clipping keeps a confident mistake finite.
    ll.update(1, 0.0)
    assert ll.get() == pytest.approx(-math.log(1e-15))


def test_calibration_mean_prediction_vs_observed_ctr():
    cal = Calibration()
    for y, p in [(1, 0.2), (0, 0.2), (0, 0.2), (0, 0.2)]:
        cal.update(y, p)
    assert cal.mean_prediction == pytest.approx(0.2)
    assert cal.observed_ctr == pytest.approx(0.25)
    assert cal.get() == pytest.approx(0.8)  # under-predicts by 20%
    cal.revert(1, 0.2)
    assert cal.observed_ctr == 0.0
    assert math.isnan(cal.get())


def sample(arm: str, version: int, y: int, p: float, correction: bool = False) -> LabeledSample:
    return LabeledSample(
        sample_id="s", features={}, label=y, served_prediction=p, served_version=version,
        event_time_ms=0, arm=arm, is_correction=correction,
    )


def test_book_keeps_newest_versions_and_ignores_older_ones():
    book = OnlineMetricsBook(window_size=10, max_versions=2)
    assert book.update("a", 1, 1, 0.9)
    assert book.update("a", 2, 1, 0.9)
    assert book.update("a", 3, 0, 0.1)
    assert book.versions("a") == [3, 2]
    assert not book.update("a", 1, 0, 0.5)  # a late label for a retired version
    assert book.versions("a") == [3, 2]
    assert book.update("b", 1, 0, 0.5)
    assert book.arms() == ["a", "b"]


def test_book_correction_replaces_the_negative():
    book = OnlineMetricsBook(window_size=10, max_versions=2)
    book.update_many([sample("a", 1, 0, 0.8), sample("a", 1, 0, 0.3), sample("a", 1, 1, 0.6)])
    assert book.get("a", 1)["auc"] == pytest.approx(0.5)
    book.update_sample(sample("a", 1, 1, 0.8, correction=True))
    got = book.get("a", 1)
    assert got["samples"] == 3
    assert got["auc"] == pytest.approx(1.0)
    assert got["observed_ctr"] == pytest.approx(2 / 3)


def test_book_state_roundtrip_is_plain_data_that_loads_without_unpickling():
    import io

    import torch

    book = OnlineMetricsBook(window_size=5, max_versions=2)
    rng = np.random.default_rng(1)
    for i in range(40):
        book.update(["a", "b"][i % 2], 1 + i // 15, int(rng.integers(0, 2)), float(rng.random()))
    buf = io.BytesIO()
    torch.save(book.state_dict(), buf)  # how a snapshot part is stored
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = OnlineMetricsBook.from_state_dict(state)
    got, want = restored.report(), book.report()
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            assert same(g[key], value) if isinstance(value, float) else g[key] == value, key
    smaller = OnlineMetricsBook.from_state_dict(state, max_versions=1)
    assert all(len(smaller.versions(arm)) == 1 for arm in smaller.arms())
    with pytest.raises(ValueError):
        OnlineMetricsBook.from_state_dict({"window_size": 5})


def test_bind_publishes_bounded_series_at_collect_time():
    stats = EngineStats()
    book = OnlineMetricsBook(window_size=50, max_versions=2)
    book.bind(stats)
    for v in (1, 2):
        book.update("a", v, 1, 0.9)
        book.update("a", v, 0, 0.1)

    def series() -> dict[tuple, float]:
        stats.run_hooks()
        return dict(stats.rolling_auc.items())

    got = series()
    # The arm's window (slot "all", no version label) holds every version's samples.
    assert got == {("a", "2", "current"): 1.0, ("a", "1", "previous"): 1.0, ("a", "", "all"): 1.0}
    assert dict(stats.rolling_samples.items()) == {
        ("a", "2", "current"): 2, ("a", "1", "previous"): 2, ("a", "", "all"): 4
    }  # fmt: skip
    book.update("a", 3, 1, 0.2)  # version 1 retires; version 3 has one class only -> no AUC yet
    got = series()
    assert got == {("a", "2", "previous"): 1.0, ("a", "", "all"): 1.0}
    assert dict(stats.rolling_samples.items()) == {
        ("a", "3", "current"): 1, ("a", "2", "previous"): 2, ("a", "", "all"): 5
    }  # fmt: skip


# The batch-fed numpy version must match the same model, batch boundaries anywhere.
_sample = st.tuples(st.integers(0, 1), scores)
_batch_op = st.tuples(st.just("batch"), st.lists(_sample, max_size=15))
_revert_op = st.tuples(st.just("revert"), _sample)
_late_click_op = st.tuples(st.just("late_click"), st.none())
batch_ops = st.lists(st.one_of(_batch_op, _revert_op, _late_click_op), max_size=40)


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 12), flush=st.integers(1, 4), ops=batch_ops)
def test_batch_rolling_metrics_equal_brute_force(window, flush, ops):
    m = BatchRollingMetrics(window, flush_size=flush)
    model = WindowModel(window)
    emitted: list[float] = []
    for op, arg in ops:
        if op == "batch":
            m.update_many([y for y, _ in arg], [p for _, p in arg])
            for y, p in arg:
                model.update(y, p)
                if y == 0:
                    emitted.append(p)
        elif op == "revert":
            assert m.revert(*arg) == model.revert(*arg)
        elif emitted:
            p = emitted.pop(0)
            assert m.revert(0, p) == model.revert(0, p)
            m.update(1, p)
            model.update(1, p)
        assert m.window() == model.items
        got = m.get()
        assert same(got["auc"], brute_auc(model.items))
        ys = [y for y, _ in model.items]
        ll = [-math.log(min(max(p, 1e-15), 1 - 1e-15)) if y else -math.log1p(-min(max(p, 1e-15), 1 - 1e-15))
              for y, p in model.items]
        assert same(got["observed_ctr"], sum(ys) / len(ys) if ys else math.nan)
        assert got["logloss"] == pytest.approx(sum(ll) / len(ll), rel=1e-9, abs=1e-9) if ll else math.isnan(
            got["logloss"]
        )


def test_batch_and_sorted_versions_agree_and_share_the_snapshot_format():
    rng = np.random.default_rng(3)
    ys = rng.integers(0, 2, 5000)
    ps = np.round(rng.random(5000), 3)
    a, b = RollingBinaryMetrics(700), BatchRollingMetrics(700)
    for y, p in zip(ys.tolist(), ps.tolist(), strict=True):
        a.update(y, p)
    for start in range(0, 5000, 333):
        b.update_many(ys[start : start + 333], ps[start : start + 333])
    assert a.window() == b.window()
    for key, value in a.get().items():
        assert b.get()[key] == pytest.approx(value, rel=1e-9), key
    assert BatchRollingMetrics.from_state_dict(a.state_dict()).window() == a.window()
    assert RollingBinaryMetrics.from_state_dict(b.state_dict()).window() == b.window()
    with pytest.raises(ValueError):
        b.update_many([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        b.update_many([0], [float("nan")])


def test_batch_version_survives_ring_compaction_with_reverted_entries():
    rng = np.random.default_rng(11)
    m, model = BatchRollingMetrics(5, flush_size=7), WindowModel(5)
    for step in range(4000):  # ~4x the ring's capacity: compaction runs many times
        y, p = int(rng.integers(0, 2)), float(rng.integers(0, 20)) / 20
        m.update(y, p)
        model.update(y, p)
        if step % 3 == 0:
            ry, rp = int(rng.integers(0, 2)), float(rng.integers(0, 20)) / 20
            assert m.revert(ry, rp) == model.revert(ry, rp)
        if step % 50 == 0:
            assert m.window() == model.items
            assert same(m.get()["auc"], brute_auc(model.items))
    assert m.window() == model.items


def test_book_columnar_feed_matches_per_sample_feed():
    rng = np.random.default_rng(5)
    ys, ps = rng.integers(0, 2, 3000), np.round(rng.random(3000), 3)
    a, b = OnlineMetricsBook(window_size=1000), OnlineMetricsBook(window_size=1000)
    for y, p in zip(ys.tolist(), ps.tolist(), strict=True):
        a.update("x", 4, y, p)
    assert b.update_arrays("x", 4, ys[:1700], ps[:1700])
    assert b.update_arrays("x", 4, ys[1700:], ps[1700:])
    assert a.get("x", 4) == b.get("x", 4) or all(
        same(a.get("x", 4)[k], v) for k, v in b.get("x", 4).items()
    )
    assert a.get("x", 4)["samples"] == 1000


def test_a_window_saved_as_bytes_is_compact_and_the_old_list_form_still_loads():
    m = BatchRollingMetrics(window_size=1000)
    rng = np.random.default_rng(3)
    m.update_many(rng.integers(0, 2, 1500), rng.random(1500))
    state = m.state_dict()
    assert isinstance(state["y"], bytes) and len(state["p"]) == 8 * 1000  # one object, not 1000 floats
    old = {"window_size": 1000, "y": np.frombuffer(state["y"], "<i1").tolist(),
           "p": np.frombuffer(state["p"], "<f8").tolist()}  # fmt: skip
    for restored in (BatchRollingMetrics.from_state_dict(state), BatchRollingMetrics.from_state_dict(old)):
        assert restored.window() == m.window()
    assert RollingBinaryMetrics.from_state_dict(state).window() == m.window()


_one_op, _read_op = st.tuples(st.just("one"), _sample), st.tuples(st.just("read"), st.none())
queued_ops = st.lists(st.one_of(_batch_op, _one_op, _revert_op, _read_op), max_size=60)


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 12), flush=st.integers(1, 40), ops=queued_ops)
def test_queued_batches_read_as_if_applied_at_once(window, flush, ops):
    # update_many queues until flush_size samples; samples of update() and update_many() keep their
    # order, and every read (and revert) sees all of them.
    m = BatchRollingMetrics(window, flush_size=flush)
    model = WindowModel(window)
    for op, arg in [*ops, ("read", None)]:
        if op == "batch":
            ys = np.array([y for y, _ in arg], dtype=np.int64)
            ps = np.array([p for _, p in arg], dtype=np.float64)
            m.update_many(ys, ps)
            ys[:] = 1 - ys  # the caller reuses its buffers: the queued batch must not change
            ps[:] = 0.5
            for y, p in arg:
                model.update(y, p)
        elif op == "one":
            m.update(*arg)
            model.update(*arg)
        elif op == "revert":
            assert m.revert(*arg) == model.revert(*arg)
        else:
            assert m.window() == model.items
            assert same(m.get()["auc"], brute_auc(model.items))
            assert len(m) == len(model.items)


def test_a_bad_batch_raises_when_queued_and_changes_nothing():
    m = BatchRollingMetrics(10)
    m.update_many([1, 0], [0.9, 0.1])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        m.update_many([1, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        m.update_many([1, 0], [0.5, float("nan")])
    assert m.window() == [(1, 0.9), (0, 0.1)]


def test_arms_beyond_max_arms_are_counted_not_tracked_and_the_bound_survives_a_restore(caplog):
    # An arm is any string an impression carries: one per request (a producer's bug) grew a window and
    # five series per value without bound.
    stats = EngineStats()
    book = OnlineMetricsBook(window_size=10, max_arms=2)
    book.bind(stats)
    assert book.update("a", 1, 1, 0.9) and book.update("b", 1, 0, 0.1)
    assert not book.update("c", 1, 1, 0.5)
    n = book.update_columns(
        np.array(["a", "d", "d", "b"]), np.array([1, 1, 1, 1]), np.array([0, 1, 0, 1]),
        np.array([0.2, 0.3, 0.4, 0.5]), np.zeros(4, dtype=bool),
    )  # fmt: skip
    assert n == 2 and book.untracked_samples == 3 and book.arms() == ["a", "b"]
    assert sum(1 for r in caplog.records if "max_arms" in r.getMessage()) == 1
    stats.run_hooks()
    assert stats.rolling_untracked_samples.get() == 3
    assert {k[0] for k, _ in stats.rolling_samples.items()} == {"a", "b"}
    again = OnlineMetricsBook.from_state_dict(book.state_dict())
    assert again.max_arms == 2 and not again.update("e", 1, 1, 0.5) and again.arms() == ["a", "b"]
    with pytest.raises(ValueError, match="max_arms"):
        OnlineMetricsBook(max_arms=0)


def test_the_arms_window_spans_its_versions_and_survives_a_restore():
    # With a version every few seconds no version's window reached the 1000 samples an alert judges:
    # the arm's window (slot "all") counts every version's samples, corrections included.
    book = OnlineMetricsBook(window_size=6, max_versions=2)
    for v in range(1, 5):  # four versions, two samples each: only the last two versions kept
        book.update("a", v, 1, 0.8)
        book.update("a", v, 0, 0.3)
    assert book.versions("a") == [4, 3]
    whole = book.get_arm("a")
    assert whole["samples"] == 6 and whole["auc"] == pytest.approx(1.0)  # the newest 6 of 8
    book.update_sample(sample("a", 4, 0, 0.9))
    book.update_sample(sample("a", 4, 1, 0.9, correction=True))  # replaces the negative in both
    assert book.get_arm("a")["observed_ctr"] == pytest.approx(3 / 6)  # 2 / 6 had the negative stayed
    assert book.get("a", 4)["observed_ctr"] == pytest.approx(2 / 3)
    restored = OnlineMetricsBook.from_state_dict(book.state_dict())
    [got], [want] = restored.arm_report(), book.arm_report()
    assert got == pytest.approx(want)  # the sums rebuilt from the window: last-digit differences
    old = {k: v for k, v in book.state_dict().items() if k != "all"}  # written before the arms' windows
    assert OnlineMetricsBook.from_state_dict(old).get_arm("a")["samples"] == 0
