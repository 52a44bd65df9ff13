"""The simulator loop: ask the scoring service to rank candidates, let simulated users click the
shown items with their true probability, and send each click when its (random) delay has passed.

The service is reached through a ``score(body) -> response | None`` callable (HTTP in production,
an in-process call in unit tests); clicks go to one ``reloop.engine.streams.Sink`` per arm, keyed by
impression id, stamped with the click's event time.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Click
from reloop.engine.runtime.jsonlog import ThrottledWarning
from reloop.engine.simulate.stats import SimStats
from reloop.engine.simulate.world import World
from reloop.engine.streams import Sink

log = logging.getLogger(__name__)

ScoreFn = Callable[[dict[str, Any]], dict[str, Any] | None]


class NotReadyYet(Exception):
    """The service answered 503: no model loaded yet."""


class ClickSinkFailed(RuntimeError):
    """The clicks could not be sent (no broker at the start, refused credentials): the simulation stops;
    the clicks not sent stay queued and are counted as pending."""


class ClickQueue:
    """Clicks waiting for their event time, ordered by it."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, str, Click]] = []
        self._seq = 0
        self._lock = threading.Lock()

    def push(self, arm: str, click: Click) -> None:
        with self._lock:
            heapq.heappush(self._heap, (click.event_time_ms, self._seq, arm, click))
            self._seq += 1

    def pop_due(self, now_ms: int) -> list[tuple[str, Click]]:
        out = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now_ms:
                _, _, arm, click = heapq.heappop(self._heap)
                out.append((arm, click))
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._heap)


class Simulator:
    SINK_RETRY_S = 5.0  # between tries to make an arm's click sink again while the broker is down

    def __init__(
        self,
        *,
        world: World,
        score: ScoreFn,
        click_sink: Callable[[str], Sink],
        stats: SimStats | None = None,
        top_k: int = 10,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.world = world
        self.score = score
        self.click_sink = click_sink
        self.stats = stats or SimStats()
        self.top_k = top_k
        self.clock_ms = clock_ms
        self.start_ms = clock_ms()
        self.clicks = ClickQueue()
        self._sinks: dict[str, Sink] = {}
        # Arms whose sink can say which record it gave up on (KafkaSink's on_failure), and those records:
        # a broker down past the producer's delivery timeout expired them. Without this the clicks were
        # lost unseen (counted as sent), and the producer that went through it sent nothing more.
        self._tracked: dict[str, bool] = {}
        self._undelivered: list[tuple[str, Click, BaseException]] = []
        self._undelivered_lock = threading.Lock()
        # Sinks made again after a failure, on a thread per arm (each try can wait a whole bootstrap
        # timeout: on the request loop it stalled the requests once per SINK_RETRY_S of an outage).
        self._remade: dict[str, Sink] = {}
        self._remaking: set[str] = set()
        self._remake_lock = threading.Lock()
        self._closing = threading.Event()
        self._request_failed = ThrottledWarning(log, "simulate: request failed: %s")
        self._sink_waiting = ThrottledWarning(
            log, "simulate: the clicks of arm %s wait for the broker (a new producer failed: %r)"
        )
        self._n = 0
        # The world's random generator is not thread-safe; HTTP calls happen outside this lock.
        self._world_lock = threading.Lock()
        self._emit_lock = threading.Lock()
        self._in_hand = 0  # clicks the thread sending them has taken off the queue
        # The first click-sink failure: every thread stops, and nothing tries the broker again (each try
        # could wait a whole bootstrap timeout).
        self.failure: ClickSinkFailed | None = None

    def t_s(self, now_ms: int) -> float:
        return (now_ms - self.start_ms) / 1000.0

    def step(self) -> dict[str, Any] | None:
        """One page view: get a ranking, draw clicks on the shown items, queue them; returns the response."""
        with self._world_lock:
            now = self.clock_ms()
            t = self.t_s(now)
            request = self.world.sample_request(t)
            self._n += 1
            n = self._n
        context = self.world.context_features(request)
        body = {
            "request_id": f"sim-{self.start_ms}-{n}",
            "user_id": context["user_id"],
            "context": context,
            "candidates": [
                {"item_id": World.item_id(i), "features": self.world.item_features(i)}
                for i in request.candidates.tolist()
            ],
            "top_k": self.top_k,
            "event_time_ms": now,
        }
        try:
            response = self.score(body)
        except NotReadyYet:
            with self.stats.lock:
                self.stats.not_ready += 1
            return None
        except Exception as exc:  # noqa: BLE001 - a failed request is counted, the simulation goes on
            with self.stats.lock:
                self.stats.errors += 1
            self._request_failed(exc)  # once in 10 s: each request of a service that is down failed
            return None
        try:  # a 200 of another shape (not the scoring service) is a failed request, not a dead thread
            arm, version, shown = str(response["arm"]), int(response["model_version"]), response["ranking"]
            items = np.array([World.parse_item_id(r["item_id"]) for r in shown], dtype=np.int64)
            served = np.array([r["score"] for r in shown], dtype=np.float64)
            impression_ids = [str(r["impression_id"]) for r in shown]
            true_p = self.world.click_probability(request, t, items)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            with self.stats.lock:
                self.stats.errors += 1
            log.warning("simulate: unexpected answer: %r", exc)
            return None
        outcomes = self.world.outcome_rng(n)  # this request's own: the same whatever the answer order
        clicked = self.world.draw_clicks(true_p, outcomes)
        delays = self.world.draw_delays_s(int(clicked.sum()), outcomes)
        window = self.world.config.attribution_window_s
        clicked_ids = [i for i, c in zip(impression_ids, clicked.tolist(), strict=True) if c]
        for impression_id, delay in zip(clicked_ids, delays.tolist(), strict=True):
            self.clicks.push(arm, Click(impression_id=impression_id, event_time_ms=now + int(delay * 1000)))
        with self.stats.lock:
            self.stats.clicks_late += int((delays > window).sum())
            self.stats.arm(arm).record(version, served, true_p, clicked, user=context["user_id"])
        return response

    def emit_due_clicks(self, now_ms: int | None = None) -> int:
        """Send the clicks due by now; raises ``ClickSinkFailed`` (then and at every later call) when a
        sink fails, with the clicks it did not take back in the queue."""
        with self._emit_lock:
            if self.failure is not None:
                raise self.failure
            self._requeue_undelivered()
            due = self.clicks.pop_due(self.clock_ms() if now_ms is None else now_ms)
            self._in_hand = len(due)  # (close counts them if this thread is stuck with them)
            sent = done = 0
            try:
                for arm, click in due:
                    sink = self._sinks.get(arm)
                    if sink is None:
                        sink = self._new_sink(arm)
                    if sink is None:  # made again after a failure, and the broker is not back yet
                        self.clicks.push(arm, click)
                    else:
                        on_failure = functools.partial(self._gave_up, arm, click)
                        sink.send(
                            encode(click),
                            key=click.impression_id.encode(),
                            timestamp_ms=click.event_time_ms,
                            **({"on_failure": on_failure} if self._tracked[arm] else {}),
                        )
                        sent += 1
                    done += 1
            except Exception as exc:  # noqa: BLE001 - any sink error: stop, count what is left
                for arm, click in due[done:]:
                    self.clicks.push(arm, click)
                self.failure = ClickSinkFailed(f"sending clicks failed: {exc!r}")
                raise self.failure from exc
            finally:
                self._in_hand = 0
                if sent:
                    with self.stats.lock:
                        self.stats.clicks_sent += sent
        return len(due)

    def _new_sink(self, arm: str) -> Sink | None:
        """The arm's click sink. A first one that cannot be made stops the simulation (no broker, refused
        credentials: raised). One made again after a delivery failure is made on a thread that waits for
        the broker (a try every ``SINK_RETRY_S``): None until it is there."""
        if arm in self._tracked:
            with self._remake_lock:
                sink = self._remade.pop(arm, None)
                if sink is None:
                    if arm not in self._remaking:
                        self._remaking.add(arm)
                        threading.Thread(
                            target=self._remake, args=(arm,), name=f"simulate-sink-{arm}", daemon=True
                        ).start()
                    return None
        else:
            sink = self.click_sink(arm)
        self._sinks[arm] = sink
        self._tracked[arm] = "on_failure" in inspect.signature(sink.send).parameters
        return sink

    def _remake(self, arm: str) -> None:
        sink: Sink | None = None
        try:
            while sink is None and not self._closing.is_set() and self.failure is None:
                try:
                    sink = self.click_sink(arm)
                except Exception as exc:  # noqa: BLE001 - the broker is not back yet: try again
                    self._sink_waiting(arm, exc)
                    self._closing.wait(self.SINK_RETRY_S)
        finally:
            with self._remake_lock:
                self._remaking.discard(arm)
                if sink is not None and not self._closing.is_set():
                    self._remade[arm] = sink
                    sink = None
        if sink is not None:  # made as the simulation closed: nothing will send through it
            sink.close()

    def _gave_up(self, arm: str, click: Click, error: BaseException) -> None:
        with self._undelivered_lock:
            self._undelivered.append((arm, click, error))

    def _requeue_undelivered(self) -> None:
        """The clicks a sink gave up on back in the queue, due at once; that sink is dropped (a producer
        that went through the outage is not reused) and the next send makes a new one."""
        with self._undelivered_lock:
            failed, self._undelivered = self._undelivered, []
        if not failed:
            return
        for arm in {arm for arm, _, _ in failed}:
            sink = self._sinks.pop(arm, None)
            if sink is not None:
                (getattr(sink, "abort", None) or sink.close)()
        for arm, click, _ in failed:
            self.clicks.push(arm, click)
        with self.stats.lock:
            self.stats.clicks_sent -= len(failed)
            self.stats.clicks_resent += len(failed)
        log.warning(
            "simulate: %d click(s) were not delivered (%r): sending them again with a new producer",
            len(failed),
            failed[0][2],
        )

    def run(
        self,
        *,
        rate: float,
        duration_s: float | None = None,
        stop: threading.Event | None = None,
        concurrency: int = 1,
    ) -> None:
        """Send ``rate`` requests per second (paced, not bursty) until ``duration_s`` or ``stop``, from
        ``concurrency`` threads (each at rate / concurrency) so one slow answer does not stall the rest."""
        stop = stop or threading.Event()
        # On threads even when there is one: this thread must be free to end the run at a stop while a
        # request thread is stuck making a click producer (kafka-python waits up to 30 s for a broker
        # that is down): `reloop simulate` ignored every signal until that wait gave up.
        workers = [
            threading.Thread(
                target=self._worker,
                args=(rate / concurrency, duration_s, stop),
                name=f"simulator-{i}",
                daemon=True,
            )
            for i in range(concurrency)
        ]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            if stop.wait(0.1):
                self._join_after_stop(workers)
                break
        if self.failure is not None:
            raise self.failure

    # How long a stop waits for the request threads (and close for the one sending clicks).
    STOP_GRACE_S = 2.0

    def _join_after_stop(self, workers: list[threading.Thread]) -> None:
        deadline = time.monotonic() + self.STOP_GRACE_S
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        busy = sum(w.is_alive() for w in workers)
        if busy:
            log.warning(
                "simulate: %d request thread(s) still busy %g s after the stop (making a click producer "
                "while the broker is down?): not waited for",
                busy,
                self.STOP_GRACE_S,
            )

    def _worker(self, rate: float, duration_s: float | None, stop: threading.Event) -> None:
        with contextlib.suppress(ClickSinkFailed):  # kept in self.failure: run() raises it once
            self._paced(rate, duration_s, stop)

    def _paced(self, rate: float, duration_s: float | None, stop: threading.Event) -> None:
        interval = 1.0 / rate
        start = time.monotonic()
        next_at = start
        while not stop.is_set() and self.failure is None:  # a sink failure stops every thread
            now = time.monotonic()
            if duration_s is not None and now - start >= duration_s:
                break
            if now < next_at:
                stop.wait(min(next_at - now, 0.05))
                self.emit_due_clicks()
                continue
            self.step()
            self.emit_due_clicks()
            # Behind schedule (slow service) we do not try to catch up in a burst.
            next_at = max(next_at + interval, time.monotonic() - interval)

    def close(self) -> None:
        """Send the clicks already due, flush the sinks; clicks still in the future (or not sent after a
        sink failure) are counted, not sent. Raises ``ClickSinkFailed`` after a sink failure."""
        error: ClickSinkFailed | None = None
        # A request thread stuck sending (making a producer for a broker that is down) holds the send:
        # its clicks are counted as pending, not waited for.
        stuck = not self._emit_lock.acquire(timeout=self.STOP_GRACE_S)
        if not stuck:
            self._emit_lock.release()
            try:
                self.emit_due_clicks()
            except ClickSinkFailed as exc:
                error = exc
        with self.stats.lock:
            self.stats.clicks_pending_at_end = len(self.clicks) + (self._in_hand if stuck else 0)
        with self._remake_lock:
            self._closing.set()  # a sink still being made is closed by its thread
            remade, self._remade = list(self._remade.values()), {}
        sinks, self._sinks = [*self._sinks.values(), *remade], {}
        for sink in sinks:
            try:
                sink.flush(timeout_s=10.0)
                sink.close()
            except Exception as exc:  # noqa: BLE001 - every sink gets its close
                error = error or ClickSinkFailed(f"flushing clicks failed: {exc!r}")
        if error is not None:
            raise error
