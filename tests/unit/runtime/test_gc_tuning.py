"""The garbage collector's settings of a stage process (engine/runtime/gc_tuning.py)."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
from reloop.engine.runtime.config import ConfigError, load_config_dict
from reloop.engine.runtime.gc_tuning import freeze_live_objects, set_young_threshold
from reloop.engine.runtime.stage_runner import StopRequest, run_supervised
from reloop.engine.runtime.synthetic import SPEC


def _config(**stages):
    return load_config_dict({"model": {"backbone": "lr", "spec": SPEC}, "stages": stages}, env={})


@pytest.fixture(autouse=True)
def _restore_gc():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_the_young_threshold_is_raised_and_the_older_ones_kept():
    gc.set_threshold(700, 11, 12)
    set_young_threshold(10_000)
    assert gc.get_threshold() == (10_000, 11, 12)
    set_young_threshold(None)  # Python's (or whatever the process set) stays
    assert gc.get_threshold() == (10_000, 11, 12)


def test_freezing_takes_what_is_alive_out_of_later_collections():
    gc.unfreeze()
    alive = [{"k": i} for i in range(1000)]
    freeze_live_objects()
    assert gc.get_freeze_count() >= len(alive)


def test_the_config_key_defaults_to_10000_accepts_null_and_refuses_zero():
    assert _config().stages.gc_young_threshold == 10_000
    assert _config(gc_young_threshold=None).stages.gc_young_threshold is None
    with pytest.raises(ConfigError, match="gc_young_threshold"):
        _config(gc_young_threshold=0)


class _OneStep:
    """A stage that records the collector's state when it runs, then asks to stop."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self.seen: tuple[tuple[int, int, int], int] | None = None

    def run(self, stop, on_step=None) -> None:
        self.seen = (gc.get_threshold(), gc.get_freeze_count())
        self.stop.event.set()


def test_a_supervised_stage_runs_with_the_configured_threshold_and_frozen_start_up_objects():
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    cfg = _config(gc_young_threshold=5_000)
    stop = StopRequest(cfg.recovery.stop_timeout_s)
    stages: list[_OneStep] = []

    def build() -> _OneStep:
        stages.append(_OneStep(stop))
        return stages[-1]

    code = run_supervised(  # close: the number of its final checkpoint (None: the save failed, exit 1)
        "test", cfg, build, close=lambda _: 1, describe=lambda _: {}, metrics_port=None, stop=stop
    )
    assert code == 0
    threshold, frozen = stages[0].seen
    assert threshold == (5_000, 10, 10) and frozen > 0


class _FailsOnce:
    """A stage in a reference cycle (as the real ones are: a stage and its checkpointer's bound method)
    whose first build fails when it runs; the rebuilt one stops."""

    def __init__(self, stop: StopRequest, fail: bool) -> None:
        self.stop = stop
        self.fail = fail
        self.me = self  # the cycle: only the collector frees it
        self.snapshots_written = 0
        self.state = bytearray(1 << 20)  # what a leaked stage holds (model, buffers, metric windows)

    def run(self, stop, on_step=None) -> None:
        if self.fail:
            raise RuntimeError("the broker went away")
        self.stop.event.set()

    def abort(self) -> None:
        pass


def test_a_stage_thrown_away_by_the_supervisor_is_collected_not_kept_frozen(monkeypatch):
    # Each build froze what was alive, the stage too; a collection never looks at frozen objects, so
    # every stage a failure threw away stayed in memory for the life of the process.
    gc.unfreeze()
    # pytest keeps the failure's log record, whose traceback holds the failed stage: no record here.
    monkeypatch.setattr(logging.getLogger("reloop.supervisor"), "disabled", True)
    cfg = load_config_dict(
        {"model": {"backbone": "lr", "spec": SPEC}, "recovery": {"backoff_initial_s": 0.001}}, env={}
    )
    stop = StopRequest(cfg.recovery.stop_timeout_s)
    built: list[weakref.ref[_FailsOnce]] = []

    def build() -> _FailsOnce:
        stage = _FailsOnce(stop, fail=len(built) < 3)
        built.append(weakref.ref(stage))
        return stage

    code = run_supervised(
        "test", cfg, build, close=lambda _: 1, describe=lambda _: {}, metrics_port=None, stop=stop
    )
    assert code == 0 and len(built) == 4
    gc.collect()
    assert [ref() is None for ref in built[:3]] == [True, True, True]
