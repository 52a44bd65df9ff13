"""The streaming protocol with real torch learners: it scores like the stream trainer (learn_scored) and a
replay buffer run is reproducible."""

from __future__ import annotations

import numpy as np
import torch
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.replay.backtest import RunSpec, Strategy, period_bounds_by_count, prepare, run_streaming

SPEC = FeatureSpec(fields=(CategoricalField(name="u", buckets=30), CategoricalField(name="i", buckets=30)))


def _data(n: int = 600):
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(n // 20), 20)  # bursts of 20 events per user
    taste = rng.random(n // 20) < 0.5
    samples = [
        LabeledSample(
            f"s{k}",
            {"u": f"u{u}", "i": f"i{rng.integers(10)}"},
            int(rng.random() < (0.85 if taste[u] else 0.15)),
            served_prediction=0.5,
            served_version=0,
            event_time_ms=k,
        )
        for k, u in enumerate(users)
    ]
    return prepare(samples, SPEC, lambda t: period_bounds_by_count(len(t), 3))


def _run(data, optimizer, replay=0):
    torch.set_num_threads(1)
    spec = RunSpec(
        "streaming", "dcn", Strategy("reloop", 0.5), 0, batch_size=100,
        model_options=(("hidden_units", (8,)), ("embedding_dim", 4)), optimizer=optimizer, replay_size=replay,
    )  # fmt: skip
    return run_streaming(data, spec)


def test_the_per_event_wide_part_learns_user_bursts_that_batches_miss():
    data = _data()
    new = _run(data, (("wide", "bayes"),))
    old = _run(data, (("embedding_optimizer", "adam"),))
    assert np.mean([r["auc"] for r in new]) > np.mean([r["auc"] for r in old]) + 0.1


def test_streaming_with_replay_is_reproducible_and_differs_from_without():
    data = _data()
    wide = (("wide", "bayes"),)
    a, b, c = _run(data, wide, 300), _run(data, wide, 300), _run(data, wide, 0)
    assert [r["auc"] for r in a] == [r["auc"] for r in b]
    assert [r["logloss"] for r in a] != [r["logloss"] for r in c]


def test_by_time_the_per_event_wide_part_scores_a_moment_before_learning_any_of_it(monkeypatch):
    # Two identical events a second: learn_scored's wide part scored the second after learning the first
    # (another score), though --batch-by time promises a moment is scored whole before any of it is learned.
    from reloop.engine.replay import backtest

    torch.set_num_threads(1)
    spec = FeatureSpec(fields=(CategoricalField(name="x", buckets=8),))
    samples = [
        LabeledSample(f"s{k}", {"x": "a"}, int((k // 2) % 3 > 0), 0.5, 0, event_time_ms=1000 * (k // 2))
        for k in range(24)
    ]
    data = prepare(samples, spec, lambda t: period_bounds_by_count(len(t), 2))
    scored: list[np.ndarray] = []
    row = backtest._row
    monkeypatch.setattr(
        backtest, "_row", lambda run, t, y, p, **kw: scored.append(p.copy()) or row(run, t, y, p, **kw)
    )
    run = RunSpec(
        "streaming", "fm", Strategy("ce"), 0, batch_size=512, batch_by="time",
        model_options=(("embedding_dim", 4),), optimizer=(("wide", "bayes"),),
    )  # fmt: skip
    run_streaming(data, run)
    (probs,) = scored
    np.testing.assert_array_equal(probs[0::2], probs[1::2])
    assert len(set(probs.tolist())) > 1  # (the model learns from moment to moment)
