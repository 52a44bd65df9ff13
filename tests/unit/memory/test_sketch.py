"""The LSH error sketch: buckets, read/write sums, both correction forms, reset and state round trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
from reloop.engine.memory.sketch import EPS, ErrorSketch, SketchConfig


def _keys(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_same_key_same_buckets_and_far_keys_differ() -> None:
    s = ErrorSketch(8, SketchConfig(n_tables=4, n_bits=8))
    k = _keys(2)
    s.write(k, [1.0, 0.0], [0.5, 0.5])  # fixes the centre at the mean of these two
    b = s.buckets(k)
    assert b.shape == (2, 4)
    assert (b == s.buckets(k.copy())).all()
    # table t's buckets live in [t * 256, (t + 1) * 256)
    assert ((b >= np.arange(4) * 256) & (b < (np.arange(4) + 1) * 256)).all()
    assert (b[0] != b[1]).any()  # opposite sides of the centre: they differ in some table


def test_read_is_the_sum_over_the_tables_of_what_was_written() -> None:
    s = ErrorSketch(8, SketchConfig(n_tables=3, n_bits=4))
    k = _keys(1)
    s.write(np.repeat(k, 2, 0), [1.0, 0.0], [0.2, 0.4])
    y, b, n = s.read(k)
    # each of the 3 tables holds both writes in the key's bucket
    assert y.tolist() == [3.0] and b == pytest.approx([1.8]) and n.tolist() == [6.0]


def test_residual_correction_hand_computed() -> None:
    s = ErrorSketch(8, SketchConfig(n_tables=2, n_bits=6, lam=0.5, prior_count=2.0))
    k = _keys(1)
    s.write(np.repeat(k, 3, 0), [1.0, 1.0, 0.0], [0.3, 0.5, 0.4])
    # Y = 2 tables * 2 = 4, B = 2 * 1.2 = 2.4, N = 6: 0.4 + 0.5 * (4 - 2.4) / (6 + 2) = 0.5
    assert s.correct(np.array([0.4]), k) == pytest.approx([0.5])
    assert s.correct(np.array([0.4]), k, lam=0.0) == pytest.approx([0.4])


def test_label_correction_hand_computed() -> None:
    s = ErrorSketch(8, SketchConfig(n_tables=2, n_bits=6, lam=0.5, prior_count=2.0, form="label"))
    k = _keys(1)
    s.write(np.repeat(k, 3, 0), [1.0, 1.0, 0.0], [0.3, 0.5, 0.4])
    # 0.5 * 0.4 + 0.5 * (4 + 2 * 0.4) / (6 + 2) = 0.2 + 0.3 = 0.5
    assert s.correct(np.array([0.4]), k) == pytest.approx([0.5])


def test_empty_neighbourhood_leaves_the_base_and_output_is_clipped() -> None:
    s = ErrorSketch(8, SketchConfig(n_tables=1, n_bits=16, lam=1.0))
    assert s.correct(np.array([0.3]), _keys(1)) == pytest.approx([0.3])  # nothing written yet
    k = _keys(1)
    s.write(np.vstack([k, -k]), [0.0, 0.0], [0.9, 0.9])  # centre 0: -k is on the other side of every plane
    assert s.correct(np.array([0.5]), k) == pytest.approx([EPS])  # 0.5 + (0 - 0.9) clipped
    other = _keys(1, seed=5)  # one of 65,536 buckets: not k's, not -k's
    assert s.read(other)[2].tolist() == [0.0]
    assert s.correct(np.array([0.3]), other) == pytest.approx([0.3])


def test_reset_forgets_and_recentres() -> None:
    s = ErrorSketch(8)
    s.write(_keys(10), np.ones(10), np.zeros(10))
    s.reset()
    assert s.written == 0 and s.center is None and not s.counts.any()
    assert s.correct(np.array([0.2]), _keys(1)) == pytest.approx([0.2])


def test_state_round_trips_through_npz_without_pickle() -> None:
    cfg = SketchConfig(n_tables=4, n_bits=5, seed=3)
    s = ErrorSketch(8, cfg)
    s.write(_keys(50), np.random.default_rng(1).integers(0, 2, 50), np.full(50, 0.4))
    buf = io.BytesIO()
    np.savez(buf, **s.state_dict())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        state = {k: f[k] for k in f.files}
    t = ErrorSketch(8, cfg)
    t.load_state_dict(state)
    q = _keys(20, seed=9)
    assert np.array_equal(t.correct(np.full(20, 0.4), q), s.correct(np.full(20, 0.4), q))
    with pytest.raises(ValueError, match="dim, tables, bits, seed"):
        ErrorSketch(8, SketchConfig(n_tables=4, n_bits=5, seed=4)).load_state_dict(state)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        SketchConfig(lam=1.5)
    with pytest.raises(ValueError):
        SketchConfig(n_bits=0)
    with pytest.raises(ValueError, match="keys must be"):
        ErrorSketch(8).buckets(np.zeros((2, 7)))
