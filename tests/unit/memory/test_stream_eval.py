"""The error memory inside the streaming backtest: it never changes the base model's rows, adds one
row per variant, corrects with what was written BEFORE the batch, and resets with each snapshot."""

from __future__ import annotations

import numpy as np
import pytest
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.memory.stream_eval import MemorySpec, StreamMemory
from reloop.engine.replay.backtest import RunSpec, Strategy, period_bounds_by_count, prepare, run_streaming

SPEC = FeatureSpec(fields=(CategoricalField(name="x", buckets=50), CategoricalField(name="y", buckets=50)))


def _data(n: int = 600):
    rng = np.random.default_rng(0)
    samples = [
        LabeledSample(
            f"s{i}",
            {"x": str(i % 7), "y": str(i % 3)},
            int(rng.random() < 0.2 + 0.1 * (i % 3)),
            served_prediction=0.3,
            served_version=0,
            event_time_ms=1000 * i,
        )  # fmt: skip
        for i in range(n)
    ]
    return prepare(samples, SPEC, lambda t: period_bounds_by_count(len(t), 3))


def _run(memory=()) -> RunSpec:
    return RunSpec("streaming", "dcn", Strategy("ce"), 0, batch_size=50,
                   model_options=(("hidden_units", (8,)), ("embedding_dim", 4)), memory=memory)  # fmt: skip


def test_memory_rows_leave_the_base_rows_unchanged() -> None:
    data = _data()
    plain = run_streaming(data, _run())
    specs = (MemorySpec(n_bits=4, lams=(0.1, 0.5)), MemorySpec(n_bits=4, lams=(0.3,), key="snapshot"))
    rows = run_streaming(data, _run(specs))
    names = [r["strategy"] for r in rows if r["period"] == 1]
    assert names == ["ce", "ce+snapshot", "ce+mem4x4@0.1", "ce+mem4x4@0.5", "ce+snapshot+mem4x4@0.3"]
    base = [r for r in rows if r["strategy"] == "ce"]
    assert [(r["auc"], r["logloss"]) for r in base] == [(r["auc"], r["logloss"]) for r in plain]
    assert any(r["auc"] != base[0]["auc"] for r in rows if r["period"] == 1 and "mem" in r["strategy"])


class _Const:
    """A learner double: hidden = its one-hot id column, prediction fixed."""

    def __init__(self, p: float) -> None:
        self.p = p

    def hidden(self, batch):
        return np.eye(3, dtype=np.float32)[batch.cat[:, 0] % 3] - 0.5

    def predict_proba(self, batch):
        return np.full(len(batch), self.p)


def test_predict_with_memory_then_write_and_reset_on_snapshot() -> None:
    data = _data(6)
    batch = data.batch.take(slice(0, 2))
    mem = StreamMemory((MemorySpec(n_tables=1, n_bits=8, lams=(1.0,)),))
    mem.start_period(4)
    learner = _Const(0.5)
    mem.before(batch, learner, None)
    mem.after(slice(0, 2), np.array([1.0, 1.0]), np.array([0.5, 0.5]))
    ((_, probs),) = mem.variants()
    assert probs[:2] == pytest.approx([0.5, 0.5])  # the first batch is scored before it is written
    mem.before(batch, learner, None)
    mem.after(slice(2, 4), np.array([0.0, 0.0]), np.array([0.5, 0.5]))
    assert probs[2:4] == pytest.approx([1.0 - 1e-4] * 2)  # 0.5 + 1.0 * (1 - 0.5), clipped
    mem.on_snapshot()
    mem.start_period(2)
    mem.before(batch, learner, None)
    mem.after(slice(0, 2), np.array([0.0, 0.0]), np.array([0.5, 0.5]))
    assert mem.variants()[0][1] == pytest.approx([0.5, 0.5])  # emptied by the snapshot


def test_snapshot_memory_must_reset_with_each_snapshot() -> None:
    with pytest.raises(ValueError, match="reset"):
        MemorySpec(key="snapshot", reset="never")


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"lams": (0.3, 1.5)}, "lam"),  # was accepted: corrections past the neighbours' mean error
        ({"lams": (float("nan"),)}, "lam"),
        ({"lams": ()}, "lams"),  # no variant at all
        ({"n_bits": 40}, "n_bits"),  # was refused only at the backtest's first batch
        ({"n_tables": 0}, "n_tables"),
        ({"prior_count": -1.0}, "prior_count"),
        ({"form": "residuals"}, "form"),
        ({"reset": "period"}, "reset"),  # was accepted: never reset, silently
        ({"key": "live-model"}, "key"),
    ],
)
def test_a_bad_memory_spec_fails_at_once_naming_the_key(options, key) -> None:
    with pytest.raises(ValueError, match=key):
        MemorySpec(**options)
