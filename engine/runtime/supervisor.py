"""Keep a stream processor running through failures without ever skipping input.

A failure that is not about one record (the broker is down at a snapshot, a sink refuses to flush, a
bug) leaves the Pipeline's memory half-updated: records polled, samples taken off the buffer, positions
moved. Going on with that state is how data used to be lost silently. The supervisor instead throws the
Pipeline away (``abort``: nothing saved, sinks released without flushing) and builds a new one, which
restores the last snapshot and re-reads everything after it: the same path a process restart takes,
already proven exact by the kill-and-resume tests. The sinks are new objects too (a Kafka producer that
went through a long outage is never reused).

Retries back off exponentially (``backoff_initial_s`` doubling up to ``backoff_max_s``). When failures
have gone on for ``give_up_after_s`` without a single snapshot written in between, the supervisor gives
up: it raises, the process exits non-zero, and an orchestrator restarts it (where a human can see it).
Errors that retrying cannot fix (a snapshot made with another config, no usable snapshot, a Kafka login
the cluster refused) are raised at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from reloop.engine.metrics.stats import STATS, EngineStats
from reloop.engine.models.finite import TrainingDiverged
from reloop.engine.runtime.config import ConfigError
from reloop.engine.runtime.restore import NoUsableSnapshot, SnapshotMismatch
from reloop.engine.streams import AuthenticationFailed, MissingTopic, TopicNotFound

log = logging.getLogger("reloop.supervisor")


class ProcessFatal(RuntimeError):
    """A failure a rebuild inside this process cannot fix (a data-parallel rank whose group broke): the
    process exits 1 and its orchestrator (torchrun, Kubernetes) restarts it with its peers."""


class PlannedRebuild(RuntimeError):
    """A stage asking to be rebuilt from its last save, not failing (the train stage seeing the samples
    topic grown): one INFO line, no back-off, not counted as a restart. Logged as a pipeline failure with
    its traceback, it counted towards ReloopPipelineRestarting after the growth the docs prescribe."""


# What retrying cannot fix because the settings or the snapshots are wrong: the process exits 2.
REFUSED: tuple[type[BaseException], ...] = (
    SnapshotMismatch,
    NoUsableSnapshot,
    ConfigError,
    AuthenticationFailed,
    # A model that diverged diverges again from the same snapshot and samples: rebuilding it retried for
    # recovery.give_up_after_s. The last snapshot stays the production model and the restart point.
    TrainingDiverged,
)
FATAL: tuple[type[BaseException], ...] = (*REFUSED, ProcessFatal)


class Stage(Protocol):
    """What the supervisor runs: the v1 Pipeline, the join stage or the train stage."""

    snapshots_written: int  # durable saves by THIS object (progress: resets the give-up clock)

    def run(self, stop: threading.Event, on_step: Callable[[Any], None] | None = None) -> None: ...
    def abort(self) -> None: ...


class GaveUp(RuntimeError):
    """Failures went on for longer than the retry budget without any snapshot being written."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    give_up_after_s: float = 900.0

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, attempt - 1))


class Supervisor:
    """Runs ``build()``'s stage until ``stop`` is set; rebuilds it after a failure (see module doc).

    ``on_pipeline`` is called with every new stage (e.g. to bind its metrics); ``on_step`` after each
    step; ``close`` ends a stage that stopped cleanly (its final save) and returns what it saved.
    """

    def __init__(
        self,
        build: Callable[[], Any],
        *,
        stop: threading.Event,
        policy: RetryPolicy | None = None,
        on_pipeline: Callable[[Any], None] | None = None,
        on_step: Callable[[Any], None] | None = None,
        close: Callable[[Any], int | None] = lambda stage: stage.close(final="checkpoint"),
        monotonic: Callable[[], float] = time.monotonic,
        stats: EngineStats = STATS,
    ) -> None:
        self.build = build
        self.stop = stop
        self.policy = policy or RetryPolicy()
        self.on_pipeline = on_pipeline
        self.on_step = on_step
        self.close = close
        self.monotonic = monotonic
        self.pipeline: Any = None
        self.building = False  # within build(): no stage runs (a stop has nothing to save)
        self.restarts = 0
        self.final_number: Any = None  # what close returned: a checkpoint number, or one per join task
        self.closed = False  # a stage ran until the stop and was closed (its final save was attempted)
        self._failing_since: float | None = None
        self._attempt = 0
        # The last failure while no stage has written a snapshot since (None once one has, or while only
        # waiting for a topic): a stop then ended a stage that was not working, which exit 0 hid.
        self.failure: str | None = None
        # At zero from the start: ReloopPipelineRestarting (3 in 15 minutes) counted a series that first
        # appeared at the first restart as 2.
        self._restarts_metric = stats.pipeline_restarts
        self._restarts_metric.child()

    def run(self) -> None:
        while not self.stop.is_set():
            pipeline: Any = None
            try:
                self.building = True
                try:
                    pipeline = self.build()
                finally:
                    self.building = False
                self.pipeline = pipeline
                if self.on_pipeline is not None:
                    self.on_pipeline(pipeline)
                pipeline.run(stop=self.stop, on_step=self._stepped)
            except FATAL:
                if pipeline is not None:
                    pipeline.abort()
                raise
            except Exception as exc:  # noqa: BLE001 - not about one record: rebuild from the snapshot
                if pipeline is not None:
                    pipeline.abort()
                    # A snapshot written in the step that failed (or by the write in flight, which abort
                    # waits for) is progress too: no step after it ran to tell _stepped.
                    self._progress(pipeline)
                if isinstance(exc, PlannedRebuild):
                    log.info("rebuilding from the last save", extra={"fields": {"reason": str(exc)}})
                    continue
                self._failed(exc)
                continue
            self.final_number = self.close(pipeline)
            self.closed = True
            return

    def _stepped(self, pipeline: Any) -> None:
        self._progress(pipeline)
        if self.on_step is not None:
            self.on_step(pipeline)

    def _progress(self, pipeline: Any) -> None:
        """Restart the give-up clock and the back-off once ``pipeline`` wrote a snapshot."""
        if pipeline.snapshots_written and self._failing_since is not None:
            log.info("recovered", extra={"fields": {"after_restarts": self._attempt}})
            self._failing_since = None
            self._attempt = 0
            self.failure = None

    def _failed(self, exc: Exception) -> None:
        now = self.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        self._attempt += 1
        waiting = isinstance(exc, TopicNotFound | MissingTopic)
        if not waiting:  # a wait for a topic is no rebuild: ReloopPipelineRestarting fired on a train stage
            self.restarts += 1  # that only waited for the join stage to create the samples topic
            self._restarts_metric.add()
        failing_for = now - self._failing_since
        if failing_for >= self.policy.give_up_after_s:
            log.critical(
                "giving up",
                extra={"fields": {"failing_for_s": round(failing_for, 1), "error": repr(exc)}},
            )
            raise GaveUp(
                f"the stream processor failed for {failing_for:.0f} s without writing a snapshot "
                f"({self._attempt} attempts); last error: {exc!r}"
            ) from exc
        wait = self.policy.backoff(self._attempt)
        if waiting:  # not a failure of ours: one line, no traceback
            self.failure = None
            log.warning(
                "waiting for a topic",
                extra={"fields": {"error": str(exc), "attempt": self._attempt, "retry_in_s": wait}},
            )
            self.stop.wait(wait)
            return
        self.failure = repr(exc)
        log.error(
            "pipeline failed; rebuilding from the last snapshot",
            extra={
                "fields": {
                    "error": repr(exc),
                    "attempt": self._attempt,
                    "retry_in_s": wait,
                    "failing_for_s": round(failing_for, 1),
                }
            },
            exc_info=exc,
        )
        self.stop.wait(wait)
