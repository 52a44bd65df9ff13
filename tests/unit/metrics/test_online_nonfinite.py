"""An infinite score is refused like NaN: taken in, it left the window's mean prediction NaN for good
(the running sum becomes inf - inf when it is evicted), and the reloop_rolling_mean_prediction series
with it (publish leaves NaN out), which silenced ReloopMiscalibrated."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reloop.engine.metrics.online import Calibration, ExactAUC, LogLoss, RollingBinaryMetrics
from reloop.engine.metrics.rolling_batch import BatchRollingMetrics


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
@pytest.mark.parametrize("cls", [RollingBinaryMetrics, BatchRollingMetrics])
def test_rolling_metrics_refuse_an_infinite_score_and_stay_exact(cls, bad):
    m = cls(2)
    m.update(0, 0.1)
    with pytest.raises(ValueError, match="finite"):
        m.update(1, bad)
    for y, p in [(0, 0.2), (1, 0.3), (0, 0.4)]:
        m.update(y, p)
    got = m.get()
    assert got["mean_prediction"] == pytest.approx(0.35)
    assert got["auc"] == 0.0 and got["samples"] == 2.0


@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_batch_update_many_refuses_an_infinite_score_and_changes_nothing(bad):
    m = BatchRollingMetrics(3)
    m.update_many([0, 1], [0.2, 0.6])
    with pytest.raises(ValueError, match="not finite"):
        m.update_many([1, 0], [bad, 0.5])
    assert m.window() == [(0, 0.2), (1, 0.6)]
    assert m.get()["mean_prediction"] == pytest.approx(0.4)


@pytest.mark.parametrize("metric", [ExactAUC, LogLoss, Calibration])
def test_single_metrics_refuse_an_infinite_score(metric):
    with pytest.raises(ValueError, match="finite"):
        metric().update(1, math.inf)


def test_exact_auc_bulk_build_refuses_an_infinite_score():
    with pytest.raises(ValueError, match="finite"):
        ExactAUC.from_samples(np.array([0, 1]), np.array([0.1, math.inf]))
