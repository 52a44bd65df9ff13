"""The replay buffer (bounded, plain-data state) and exact resume of the stream trainer with the per-event
wide part on and the replay buffer on."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer, MultiCategoricalField
from reloop.engine.models.config import OptimizerConfig
from reloop.engine.models.registry import build_learner
from reloop.engine.train.replay_buffer import ReplayBuffer
from reloop.engine.train.stream import StreamTrainer, StreamTrainerConfig

SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="user", buckets=40),
        CategoricalField(name="item", buckets=40),
        MultiCategoricalField(name="tags", buckets=16, max_len=3),
    )
)


@pytest.fixture
def deterministic():
    threads = torch.get_num_threads()
    was = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)
    torch.set_num_threads(threads)


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _samples(n: int, start: int = 0, seed: int = 0) -> list[LabeledSample]:
    rng = np.random.default_rng([seed, start])
    return [
        LabeledSample(
            sample_id=f"s{start + i}",
            features={
                "user": f"u{rng.integers(12)}",
                "item": f"i{rng.integers(25)}",
                "tags": [f"t{k}" for k in range(int(rng.integers(0, 3)))],
            },
            label=int(rng.random() < 0.4),
            served_prediction=0.3,
            served_version=0,
            event_time_ms=1000 + start + i,
            weight=1.0 if i % 5 else 2.0,
        )
        for i in range(n)
    ]


def _batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [{"user": f"u{rng.integers(9)}", "item": f"i{rng.integers(9)}", "tags": ["a"]} for _ in range(n)]
    return Featurizer(SPEC).transform(rows), (rng.random(n) < 0.5).astype(np.float32)


def test_replay_buffer_is_a_bounded_ring_with_plain_state():
    buf = ReplayBuffer(capacity=10, ratio=2.0, batch_size=4, seed=3)
    batch, labels = _batch(7)
    buf.add(batch, labels)
    draws = buf.take()  # 14 owed -> 3 draws of 4, 2 left owed
    assert len(draws) == 3 and buf.debt == 2.0 and buf.size == 7
    assert all(len(d.labels) == 4 and d.y_last is None and d.weights is None for d in draws)
    batch2, labels2 = _batch(6, seed=1)
    y_last = np.linspace(0.1, 0.6, 6)
    buf.add(batch2, labels2, y_last=y_last, weights=np.full(6, 2.0))
    assert buf.size == 10 and buf.head == 3 and buf.added == 13  # the 3 oldest were overwritten
    assert buf.counters()["replay_bytes"] == buf.nbytes > 0
    state = _round_trip(buf.state_dict())
    assert state["rows"]["labels"].shape == (10,)
    # Oldest first: the last 4 of the first batch, then the second batch.
    np.testing.assert_array_equal(state["rows"]["cat"].numpy(), np.concatenate([batch.cat[3:], batch2.cat]))
    restored = ReplayBuffer(capacity=10, ratio=2.0, batch_size=4, seed=3)
    restored.load_state_dict(state)
    a, b = buf.take(), restored.take()
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.batch.cat, y.batch.cat)
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.y_last, y.y_last)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(capacity=11, ratio=1.0, batch_size=4).load_state_dict(state)


def _trainer(replay_size: int) -> StreamTrainer:
    learner = build_learner(
        "dcn",
        SPEC,
        "reloop",
        0.5,
        seed=5,
        hidden_units=(16,),
        dropout=0.1,
        optimizer=OptimizerConfig.per_event(),
    )
    cfg = StreamTrainerConfig(batch_size=32, y_last="snapshot", replay_size=replay_size, replay_ratio=1.5)
    return StreamTrainer(learner=learner, featurizer=Featurizer(SPEC), config=cfg)


def _assert_same_learner(a, b) -> None:
    sa, sb = a.learner.state_dict(), b.learner.state_dict()
    for k, v in sa["model"].items():
        torch.testing.assert_close(sb["model"][k], v, rtol=0, atol=0, msg=k)
    np.testing.assert_array_equal(a.learner.wide.mean, b.learner.wide.mean)
    np.testing.assert_array_equal(a.learner.wide.var, b.learner.wide.var)
    for name, opt in sa["optimizers"].items():
        for pid, st in opt["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(sb["optimizers"][name]["state"][pid][k], v, rtol=0, atol=0)


@pytest.mark.parametrize("replay_size", [0, 100])
def test_resume_from_a_snapshot_equals_the_uninterrupted_run(deterministic, replay_size):
    batches = [_samples(32, 32 * k) for k in range(10)]
    straight = _trainer(replay_size)
    for k, b in enumerate(batches):
        if k == 4:
            straight.on_snapshot(1)
        straight.train_batch(b)
    first = _trainer(replay_size)
    for b in batches[:4]:
        first.train_batch(b)
    # What the pipeline snapshots (learner and trainer state), through weights_only.
    trainer_state = _round_trip(first.state_dict())
    if replay_size:
        assert trainer_state["replay"]["size"] == min(replay_size, 4 * 32)
    resumed = _trainer(replay_size)
    resumed.load_state_dict(trainer_state)
    resumed.on_snapshot(1)
    for b in batches[4:]:
        resumed.train_batch(b)
    _assert_same_learner(straight, resumed)
    assert resumed.counters == straight.counters
    assert (resumed.counters.replayed > 0) == bool(replay_size)
    assert resumed.progressive.window() == straight.progressive.window()


def test_a_trainer_with_replay_restores_a_snapshot_made_without_it():
    t = _trainer(0)
    t.train_batch(_samples(32))
    u = _trainer(50)
    u.load_state_dict(t.state_dict())
    u.on_snapshot(1)
    assert u.replay is not None and u.replay.size == 0
    u.train_batch(_samples(32, 32))
    assert u.replay.size == 32 and u.counters.replayed == 32  # ratio 1.5 -> 48 owed, one batch of 32


def test_replayed_samples_are_exported_apart_from_the_trained_ones():
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.train_metrics import TrainerMetrics

    stats = EngineStats()
    metrics = TrainerMetrics(stats, wall_period_s=None)
    trainer = _trainer(100)
    for k in range(4):
        metrics.trained(trainer.train_batch(_samples(32, 32 * k)))
    assert trainer.counters.replayed > 0
    assert stats.train_replayed_samples.get() == trainer.counters.replayed
    assert stats.train_samples.get() == 4 * 32


def test_a_negative_seed_draws_like_any_other():
    # model.seed takes torch's range (down to -2**63); numpy's generator refused a negative one, so the
    # first replayed step of such a run raised "expected non-negative integer", at every restart.
    batch, labels = _batch(8)
    draws = {}
    for seed in (-1, -(2**63), 3):
        buf = ReplayBuffer(capacity=10, ratio=1.0, batch_size=4, seed=seed)
        buf.add(batch, labels)
        draws[seed] = [d.batch.cat for d in buf.take()]
        assert len(draws[seed]) == 2
    again = ReplayBuffer(capacity=10, ratio=1.0, batch_size=4, seed=-1)
    again.add(batch, labels)
    for x, y in zip(draws[-1], [d.batch.cat for d in again.take()], strict=True):
        np.testing.assert_array_equal(x, y)  # deterministic for a negative seed too
