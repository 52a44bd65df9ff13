"""A join stage whose samples sink refuses every message (a compacted samples topic, an ACL, a size
limit) fails and is rebuilt until the supervisor gives up: the checkpoint each rebuild writes when it
restores or starts its tasks is no progress. It was counted as one, so the give-up clock was reset at
every rebuild and the stage crash-looped for as long as the process ran (always "attempt 1")."""

from __future__ import annotations

import threading

import pytest
from reloop.connectors.memory.memory import MemoryGroupSource, MemorySink
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.build import build_join_stage
from reloop.engine.runtime.clock import ManualClock
from reloop.engine.runtime.supervisor import GaveUp, RetryPolicy, Supervisor
from reloop.engine.runtime.synthetic import generate

from .test_stages import BATCH, START, _config, _log


class _Refusing(MemorySink):
    def send(self, value, **kwargs):
        raise RuntimeError("Compacted topic cannot accept message without key")


def test_a_join_stage_whose_samples_are_all_refused_makes_the_supervisor_give_up(tmp_path):
    synth = generate(600, seed=4, pad_to_multiple=4 * BATCH)
    log = _log(synth)
    cfg = _config(tmp_path)
    builds = []

    def build():
        builds.append(1)
        return build_join_stage(
            cfg,
            source=MemoryGroupSource(log, ["impressions", "clicks"]),
            samples_sink=_Refusing(log, "samples"),
            dead_letter_sink=MemorySink(log, "dead"),
            clock=ManualClock(START),
            stats=EngineStats(),
            checkpoint_dir=tmp_path / "join-ckpt",
        )

    stop = threading.Event()
    policy = RetryPolicy(backoff_initial_s=0.05, backoff_max_s=0.05, give_up_after_s=0.5)
    supervisor = Supervisor(build, stop=stop, policy=policy, stats=EngineStats())
    outcome: list[BaseException | None] = []

    def run():
        try:
            supervisor.run()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            outcome.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    stop.set()  # (the old code never gave up: stopped here)
    t.join(10)
    assert len(builds) >= 2  # it was rebuilt, and a rebuild restores the tasks from their checkpoints
    assert outcome and isinstance(outcome[0], GaveUp), outcome
    with pytest.raises(GaveUp, match="Compacted topic"):
        raise outcome[0]
