"""The two backtest protocols, checked with a recording learner whose predictions encode its state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.spec import CategoricalField, FeatureSpec, NumericField
from reloop.engine.metrics.offline import logloss
from reloop.engine.replay.backtest import (
    PublishedScorer,
    RunSpec,
    Strategy,
    period_bounds_by_count,
    period_bounds_by_time,
    prepare,
    run_periodic,
    run_river_baseline,
    run_streaming,
    strategy_grid,
    stream_batches,
    with_label_noise,
)

SPEC = FeatureSpec(fields=(CategoricalField(name="x", buckets=50),))


class Recorder:
    """Predicts ``0.1 + 0.01 * steps`` (so a prediction tells which state made it) and logs every call."""

    def __init__(self, log: list, steps: int = 0) -> None:
        self.log, self.steps, self.frozen = log, steps, False

    def predict_proba(self, batch):
        self.log.append(("predict", self.frozen, self.steps, len(batch)))
        return np.full(len(batch), 0.1 + 0.01 * self.steps)

    def learn(self, batch, labels, y_last=None, weights=None):
        assert not self.frozen
        self.log.append(
            ("learn", self.steps, None if y_last is None else np.asarray(y_last).copy(), len(batch))
        )
        self.steps += 1

        class Stats:
            sc_active_fraction = 0.0

        return Stats()

    def clone_frozen(self):
        clone = Recorder(self.log, self.steps)
        clone.frozen = True
        return clone


def _data(n: int = 12, per: int = 4):
    samples = [
        LabeledSample(f"s{i}", {"x": str(i % 5)}, i % 2, served_prediction=0.5 + i / 100, served_version=0,
                      event_time_ms=1000 * i)
        for i in range(n)
    ]  # fmt: skip
    return prepare(samples, SPEC, lambda t: period_bounds_by_count(len(t), n // per))


def _factory(log):
    return lambda run, spec: Recorder(log)


def test_periodic_evaluates_before_training_and_uses_its_own_last_model() -> None:
    log: list = []
    data = _data()
    rows = run_periodic(
        data, RunSpec("periodic", "fake", Strategy("reloop", 0.5), 0, epochs=2, batch_size=2), _factory(log)
    )
    assert [r["period"] for r in rows] == [1, 2]
    learns = [e for e in log if e[0] == "learn"]
    # 4 samples per period, batch 2, 2 epochs -> 4 steps per period
    assert len(learns) == 12
    assert all(e[2] is None for e in learns[:4])  # period 0: no last model
    # period 1 is scored by the model after 4 steps, and those scores are its y_last for every step
    preds = [e for e in log if e[0] == "predict"]
    assert [p[2] for p in preds] == [4, 8]
    for e in learns[4:8]:
        assert np.allclose(e[2], 0.1 + 0.01 * 4)
    for e in learns[8:]:
        assert np.allclose(e[2], 0.1 + 0.01 * 8)
    assert rows[0]["n"] == 4 and rows[0]["strategy"] == "reloop@0.5"


def test_periodic_logged_y_last_and_same_shuffle_for_every_strategy() -> None:
    data = _data()
    logs = []
    for strategy in (Strategy("ce"), Strategy("kd", 0.2)):
        log: list = []
        run_periodic(
            data, RunSpec("periodic", "f", strategy, 3, y_last="logged", batch_size=1), _factory(log)
        )
        logs.append(log)
    learned = [[e[2] for e in log if e[0] == "learn"] for log in logs]
    for a, b in zip(learned[0], learned[1], strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
    # logged y_last values are the samples' served predictions of periods 1 and 2, in shuffled order
    seen = sorted(float(v[0]) for v in learned[0][4:])
    assert seen == pytest.approx(sorted(data.logged[4:]))


def test_streaming_predicts_then_learns_with_the_serving_snapshot() -> None:
    log: list = []
    data = _data()
    rows = run_streaming(
        data, RunSpec("streaming", "f", Strategy("reloop", 0.2), 0, batch_size=2), _factory(log)
    )
    assert [r["period"] for r in rows] == [1, 2]
    kinds = [(e[0], e[1]) if e[0] == "predict" else ("learn",) for e in log]
    # period 0: predict (live model) then learn, twice; no snapshot yet
    assert kinds[:4] == [("predict", False), ("learn",), ("predict", False), ("learn",)]
    learns = [e for e in log if e[0] == "learn"]
    assert learns[0][2] is None and learns[1][2] is None
    # period 1's y_last comes from the snapshot frozen after 2 steps, period 2's after 4
    assert np.allclose(learns[2][2], 0.12) and np.allclose(learns[3][2], 0.12)
    assert np.allclose(learns[4][2], 0.14) and np.allclose(learns[5][2], 0.14)
    frozen_steps = [e[2] for e in log if e[0] == "predict" and e[1]]
    assert frozen_steps == [2, 2, 4, 4]


def test_period_bounds() -> None:
    t = np.array([0, 1, 2, 10, 11, 25, 26, 27, 28], dtype=np.int64)
    assert period_bounds_by_time(t, 10) == (0, 3, 5, 9)
    # the middle period (2 samples) is merged into the one before it
    assert period_bounds_by_time(t, 10, min_size=3) == (0, 5, 9)
    assert period_bounds_by_count(10, 3) == (0, 3, 7, 10)
    with pytest.raises(ValueError):
        period_bounds_by_time(t[::-1].copy(), 10)
    # a stray early row was a first period (the warm-up) of its own whatever min_size said
    early = np.array([-400, 0, 1, 2, 10, 11, 12, 25, 26, 27, 28], dtype=np.int64)
    assert period_bounds_by_time(early, 10, min_size=3) == (0, 4, 7, 11)
    assert period_bounds_by_time(np.array([0, 1], dtype=np.int64), 10, min_size=3) == (0, 2)


def test_strategy_grid_needs_ce() -> None:
    grid = strategy_grid(["ce", "kd", "reloop"], [0.2, 0.5])
    assert [s.name for s in grid] == ["ce", "kd@0.2", "kd@0.5", "reloop@0.2", "reloop@0.5"]
    with pytest.raises(ValueError, match="include ce"):
        strategy_grid(["reloop"], [0.2])


def test_strategy_grid_per_strategy_alphas() -> None:
    # KD at 0.5 alone while ReLoop runs the --alphas grid: asking for one no longer runs the other's.
    grid = strategy_grid(["ce", "kd@0.5", "reloop"], [0.2, 0.5])
    assert [s.name for s in grid] == ["ce", "kd@0.5", "reloop@0.2", "reloop@0.5"]
    grid = strategy_grid(["ce", "kd@0.5", "reloop@0.2", "reloop@0.5", "kd@0.50"], [0.8])
    assert [s.name for s in grid] == ["ce", "kd@0.5", "reloop@0.2", "reloop@0.5"]  # a repeat runs once
    for bad, match in (("ce@0.5", "no alpha"), ("kd@x", "STRATEGY@ALPHA"), ("mse", "unknown strategy")):
        with pytest.raises(ValueError, match=match):
            strategy_grid(["ce", bad], [0.2])


def test_label_noise_trains_on_flipped_labels_and_judges_on_the_true_ones() -> None:
    data = _data(n=400, per=100)
    noisy = with_label_noise(data, 0.2, seed=3)
    flipped = noisy.labels != data.labels
    assert 0.15 < flipped.mean() < 0.25  # about the rate
    np.testing.assert_array_equal(noisy.true_labels, data.labels)
    np.testing.assert_array_equal(with_label_noise(data, 0.2, seed=3).labels, noisy.labels)  # same flips
    assert (with_label_noise(data, 0.2, seed=4).labels != noisy.labels).any()
    seen: list[np.ndarray] = []

    class Learner(Recorder):
        def learn(self, batch, labels, y_last=None, weights=None):
            seen.append(np.asarray(labels).copy())
            return super().learn(batch, labels, y_last, weights)

    for run_protocol in (run_streaming, run_periodic):
        seen.clear()
        run = RunSpec("streaming" if run_protocol is run_streaming else "periodic", "x", Strategy("ce"), 0)
        rows = run_protocol(noisy, run, lambda run, spec: Learner([]))
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(noisy.labels))  # learns noisy
        differs = [r for r in rows if noisy.labels[noisy.period(r["period"])].mean() != r["ctr"]]
        assert differs  # the noisy click rates are not the ones reported
        for r in rows:  # every period is judged on its true click rate
            assert r["ctr"] == pytest.approx(float(data.labels[noisy.period(r["period"])].mean()))
    with pytest.raises(ValueError, match="label noise"):
        with_label_noise(data, 0.5)


def test_batches_by_time_never_hold_two_event_times() -> None:
    t = np.array([5, 5, 5, 7, 8, 8, 8, 8, 8, 9], dtype=np.int64)
    spans = lambda by, size: [(b.start, b.stop) for b in stream_batches(t, size, by)]  # noqa: E731
    assert spans("count", 4) == [(0, 4), (4, 8), (8, 10)]
    assert spans("time", 512) == [(0, 3), (3, 4), (4, 9), (9, 10)]
    assert spans("time", 2) == [(0, 2), (2, 3), (3, 4), (4, 6), (6, 8), (8, 9), (9, 10)]  # at most 2
    assert spans("time", 512)[-1] == (9, 10) and list(stream_batches(t[:0], 8, "time")) == []
    with pytest.raises(ValueError, match="unknown batching"):
        list(stream_batches(t, 4, "rows"))


def test_streaming_by_time_scores_each_moment_before_learning_it() -> None:
    # The live learner's predictions tell how many steps it had taken, so a sample scored after a
    # same-time sample was learned would show it.
    seconds = [0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 5, 5]
    samples = [
        LabeledSample(f"s{i}", {"x": str(i % 5)}, i % 2, 0.5, 0, event_time_ms=1000 * s)
        for i, s in enumerate(seconds)
    ]
    data = prepare(samples, SPEC, lambda t: period_bounds_by_count(len(t), 2))
    log: list = []
    run_streaming(data, RunSpec("streaming", "f", Strategy("ce"), 0, batch_size=512, batch_by="time"),
                  _factory(log))  # fmt: skip
    sizes = [e[3] for e in log if e[0] == "learn"]
    assert sizes == [2, 3, 1, 3, 1, 2]  # one batch per second, periods [0, 6) and [6, 12)
    predicts = [e for e in log if e[0] == "predict" and not e[1]]
    assert [e[3] for e in predicts] == sizes  # each moment scored whole, before its learn
    assert [e[2] for e in predicts] == list(range(len(sizes)))


def test_river_peer_by_time_learns_a_moment_only_after_scoring_all_of_it() -> None:
    # Two identical events at one moment: per event, the second is scored by a model that learned the
    # first's click; by time, both get the untouched model's 0.5.
    samples = [LabeledSample(f"s{i}", {"x": "a"}, 1, 0.5, 0, event_time_ms=1000 * (i // 2)) for i in range(8)]
    data = prepare(samples, SPEC, lambda t: period_bounds_by_count(len(t), 2))

    def scores(**batching) -> list[float]:
        from river import linear_model

        seen: list[float] = []
        original = linear_model.LogisticRegression.predict_proba_one

        def spy(self, x):
            p = original(self, x)
            seen.append(p.get(True, 0.0))
            return p

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(linear_model.LogisticRegression, "predict_proba_one", spy)
            run_river_baseline(data, **batching)
        return seen

    per_event, by_time = scores(), scores(batch_by="time", batch_size=512)
    assert per_event[0] == by_time[0] == by_time[1] == pytest.approx(0.5)
    assert per_event[1] > 0.5  # learned the first click before scoring the second
    assert by_time[2] == pytest.approx(per_event[2])  # the same model once the moment is learned
    assert all(by_time[i] == by_time[i + 1] for i in range(0, 8, 2))
    assert all(per_event[i] < per_event[i + 1] for i in range(7))


def _steps_logloss(data, steps: list[int], period: int) -> float:
    """The LogLoss of period ``period`` when sample i is scored by a Recorder that took ``steps[i]``."""
    sl = data.period(period)
    return logloss(data.labels[sl], 0.1 + 0.01 * np.array(steps[sl.start : sl.stop], dtype=np.float64))


def test_streaming_published_scores_with_the_snapshot_of_the_last_boundary() -> None:
    # Samples 1 s apart, batches of 2, a snapshot every 3 s: sample i is served by the learner that had
    # learned every batch completed before its boundary 3 * (i // 3) s. Batch [2, 3] completes at 3 s, so
    # the 3 s snapshot holds one step, not two; the live learner would have taken i // 2 steps.
    data = _data()
    served = [0, 0, 0, 1, 1, 1, 3, 3, 3, 4, 4, 4]
    live = [i // 2 for i in range(12)]

    def run(publish_every_ms: int) -> tuple[list, list]:
        log: list = []
        spec = RunSpec(
            "streaming", "f", Strategy("reloop", 0.2), 0, batch_size=2, publish_every_ms=publish_every_ms
        )
        rows = run_streaming(data, spec, _factory(log))
        learns = [(e[1], None if e[2] is None else e[2].tolist(), e[3]) for e in log if e[0] == "learn"]
        return rows, learns

    (published, learned), (live_rows, live_learned) = run(3000), run(0)
    for row in published:
        assert row["logloss"] == pytest.approx(_steps_logloss(data, served, row["period"]))
    for row in live_rows:
        assert row["logloss"] == pytest.approx(_steps_logloss(data, live, row["period"]))
    assert learned == live_learned  # the same steps, with the same y_last: only the scores moved
    # A snapshot taken once and never replaced (the interval outlasts the stream) serves the untrained
    # learner throughout.
    never, _ = run(10**9)
    for row in never:
        assert row["logloss"] == pytest.approx(_steps_logloss(data, [0] * 12, row["period"]))


def test_published_scorer_takes_at_most_one_snapshot_per_batch_and_none_within_a_boundary() -> None:
    state = {"n": 0}
    scorer = PublishedScorer(10, lambda: state["n"])
    pairs = lambda t: [((p.start, p.stop), m) for p, m in scorer.models(np.array(t))]  # noqa: E731
    assert pairs([0, 3]) == [((0, 2), 0)]
    state["n"] = 1
    assert pairs([5, 12, 25]) == [((0, 1), 0), ((1, 3), 1)]  # 12 and 25 cross two boundaries: one snapshot
    state["n"] = 2
    assert pairs([27, 29]) == [((0, 2), 1)]  # still the 20 s boundary's
    assert pairs([]) == [] and scorer.snapshots == 2
    with pytest.raises(ValueError, match="publish_every_ms"):
        PublishedScorer(0, lambda: None)


def test_river_peer_published_is_scored_by_a_copy_from_the_last_boundary() -> None:
    # Every event a click on the same feature, 1 s apart, a snapshot every 3 s: event i is scored by the
    # model that learned events 0 .. 3 * (i // 3) - 1, which a fresh model replays to tell.
    from river import linear_model, optim

    samples = [LabeledSample(f"s{i}", {"x": "a"}, 1, 0.5, 0, event_time_ms=1000 * i) for i in range(9)]
    data = prepare(samples, SPEC, lambda t: period_bounds_by_count(len(t), 3))
    rows = run_river_baseline(data, publish_every_ms=3000)
    expected = []
    for i in range(9):
        model = linear_model.LogisticRegression(optimizer=optim.SGD(0.05))
        for _ in range(3 * (i // 3)):
            model.learn_one({"x=a": 1.0}, True)
        expected.append(model.predict_proba_one({"x=a": 1.0})[True])
    for row in rows:
        sl = data.period(row["period"])
        assert row["logloss"] == pytest.approx(logloss(data.labels[sl], np.array(expected[sl])))
    live = run_river_baseline(data)
    assert [r["logloss"] for r in live] != pytest.approx([r["logloss"] for r in rows])


def test_the_river_peer_reads_dense_counts_standardised_by_the_rows_so_far() -> None:
    from reloop.engine.replay.backtest import RiverInputs

    inputs = RiverInputs()
    first = inputs({"c": 5.0, "u": "a", "g": ["x", "y"]})
    assert first == {"c": 0.0, "u=a": 1.0, "g=x": 0.5, "g=y": 0.5}  # nothing to scale by yet
    second = inputs({"c": 1000.0})
    z = [math.log1p(5.0), math.log1p(1000.0)]
    assert second["c"] == pytest.approx((z[1] - np.mean(z)) / np.std(z, ddof=1))
    # Criteo-like counts decide the label: unscaled, SGD's steps on 13 such values overshot (LogLoss 0.92
    # on Criteo); standardised the peer learns them.
    rng = np.random.default_rng(3)
    counts = rng.lognormal(6.0, 2.0, size=(3000, 13))
    samples = [
        LabeledSample(f"s{i}", {f"I{j}": float(c) for j, c in enumerate(row)}, int(row[0] > 400), 0.5, 0,
                      event_time_ms=1000 * i)
        for i, row in enumerate(counts)
    ]  # fmt: skip
    spec = FeatureSpec(fields=tuple(NumericField(name=f"I{j}") for j in range(13)))
    data = prepare(samples, spec, lambda t: period_bounds_by_count(len(t), 3))
    rows = run_river_baseline(data)
    assert all(r["logloss"] < 0.45 and r["auc"] > 0.9 for r in rows), rows
