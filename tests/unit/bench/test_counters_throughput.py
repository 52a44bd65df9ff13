"""bench/counters_throughput.py: the contenders read the counters' inputs and count as they train."""

from __future__ import annotations

import numpy as np
from reloop.bench import counters_throughput as ct
from reloop.bench.train_throughput import synthetic_criteo
from reloop.engine.features.spec import criteo_spec


def test_the_counter_contenders_read_eight_more_inputs_and_count_every_batch_they_train() -> None:
    spec = criteo_spec()
    data = synthetic_criteo(spec, 3_000)
    wide_spec, wide_data, counters = ct._with_counter_inputs(spec, data)
    assert len(wide_spec.dense_fields) == len(spec.dense_fields) + 8
    assert wide_data[0].num.shape == (3_000, len(spec.dense_fields) + 8)
    np.testing.assert_array_equal(wide_data[0].cat, data[0].cat)

    class Learner:
        steps = 0

        def learn_scored(self, batch, labels, y_last) -> None:
            assert batch.num.shape[1] == len(wide_spec.dense_fields)
            Learner.steps += 1

    rate = ct._step_fn(Learner(), wide_data, 256, 0.0, True, ct._counting(counters, wide_data[1]))()
    assert rate > 0 and Learner.steps == 3
    assert counters.total_shown == 3 * 256
    res = ct.measure(["lr"], batch_size=256, rounds=1, seconds=0.01, rows=3_000)
    assert set(res["lr"]) >= {"plain", "inputs", "counting", "inputs_ratio", "counting_ratio"}


def test_a_cross_adds_its_four_inputs_and_is_counted_per_pair_of_values() -> None:
    spec = criteo_spec()
    data = synthetic_criteo(spec, 1_000)
    wide_spec, wide_data, counters = ct._with_counter_inputs(spec, data, counted=("C1", "C2", "C1*C2"))
    assert len(wide_spec.dense_fields) == len(spec.dense_fields) + 12
    before = counters.values(wide_data[0], 0.0)
    count = ct._counting(counters, np.ones(1_000, dtype=np.float32))
    count(wide_data[0], slice(0, 1_000))
    after = counters.values(wide_data[0], 2_000.0)
    assert after.shape == (1_000, 12)
    # Every row was shown once: each row's own pair of values now reads as seen (column "C1*C2#seen").
    seen = [f.name for f in counters.spec_fields()].index("C1*C2#seen")
    assert np.all(after[:, seen] > before[:, seen])
