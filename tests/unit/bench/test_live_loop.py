"""The live-stream probe's readings off the stages' progress lines (bench/live_loop.py)."""

from __future__ import annotations

import orjson
import pytest
from reloop.bench.live_loop import LiveRun, _at, _progress, _rate


def test_counts_between_progress_lines_are_interpolated():
    points = [(10.0, 0), (10.5, 1000), (11.0, 1000), (11.5, 3000)]
    assert _at(points, 10.25) == 500
    assert _at(points, 11.0) == 1000
    assert _at(points, 11.25) == 2000
    assert _at(points, 9.0) is None and _at(points, 12.0) is None  # outside the lines: unknown


def test_a_rate_is_taken_between_two_moments_not_two_lines():
    points = [(0.0, 0), (1.0, 100), (2.0, 300), (3.0, 600)]
    assert _rate(points, 0.5, 2.5) == pytest.approx((450 - 50) / 2.0)
    assert _rate(points, 0.5, 4.0) is None


def test_progress_lines_of_one_stage_are_read():
    lines = [
        {"ts": 1.0, "msg": "progress", "stage": "join", "samples_sent": 10},
        {"ts": 1.2, "msg": "progress", "stage": "train", "samples_trained": 4},
        {"ts": 1.4, "msg": "started", "stage": "train"},
        {"ts": 1.7, "msg": "progress", "stage": "train", "samples_trained": 9},
    ]
    log = "\n".join(orjson.dumps(x).decode() for x in lines) + "\nnot json\n"
    assert _progress(log) == [(1.2, 4), (1.7, 9)]
    assert _progress(log, "join", "samples_sent") == [(1.0, 10)]


@pytest.mark.parametrize(("trained", "kept"), [(9_800.0, True), (9_600.0, False), (None, False)])
def test_kept_up_is_within_three_percent_of_the_input(trained, kept):
    assert LiveRun(10_000, 1, 300_000, 9_990.0, trained, 1024).kept_up is kept
