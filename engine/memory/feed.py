"""Joined samples into a serving arm's labelled state: a consumer of the arm's samples topic on a thread.

``reloop serve`` learns nothing else from Kafka, so what it keeps from labels needs its own path: the
join stage already publishes every joined sample (label, features, served prediction) on the samples
topic (docs/data-plane.md), and this feed reads it. It decodes each message, featurises it with the
LIVE bundle's featurizer and writes it into its target: ReLoop2's error memory (engine/memory/served.py),
which keys it and recomputes its base prediction with that bundle, or the arm's click counters
(engine/memory/served_counters.py), which count its clicks. A reload is noticed on the next poll (at most
``poll_timeout_s`` later) and re-keys the target there, off the request path. Each target has a feed of
its own (its own consumer, positions and state file): the two keep independent state.

Positions: a feed that starts without saved state begins at the END of the topic (history was
labelled for older models); with state it resumes from the saved positions, saved with the target
every ``save_every_s`` and on close. An undecodable message is skipped and counted (the train stage
dead-letters it already). In a message holding values the live model's spec cannot read, the rows are
featurised one at a time, as the train stage does: such a sample is skipped and counted (``refused``),
the others of its message are still written. A message that fails in any other way (the model raising
on it, say) is skipped and counted in ``write_failures``, and the rest of its poll is still written: the
source has moved past the poll, so a failure that ended the step lost every message after it. A re-key
after a reload runs before the poll, so when it fails the step ends having read nothing, and is
retried. A sample whose identity (join task, incarnation, seq) was written before, re-emitted by a join
task resumed from its checkpoint, is skipped and counted (``duplicates``; engine/memory/seen.py). A
sample flagged ``is_correction`` (a late click re-emitted as a positive) is written as one
more positive: a memory then holds its earlier negative too, the same small duplication the join's
correction policy gives the trainer.

A counters feed given ``shown_topic`` (``arms[].counters.shown_from: impressions``) reads the arm's
impression log too, on the same consumer: each impression of the arm is featurised with the live bundle
and counted as shown (``count_logged``), so the counts and the positions of both topics are saved
together, in one state. An undecodable impression, or one the live spec cannot read, is skipped and
counted as the samples are (``undecodable``, ``refused``); those counted are ``shown``.

``caught_up`` is set once the source is open and the feed has read what its topics held when it opened
(from saved positions: what came after the last save; with none, what the impression log got since the
feed was made): the serving stack waits for it before serving an arm that counts its impression log.
A feed with no saved positions opens the impression log at the first record stamped at or after its own
creation (where the source can say, ``positions_at``), not at the end: what the process (or another)
shows before the open completes is still counted, however late the open (a broker down at start, a
topic that the first impression creates).

``reloop_serve_feed_lag_records{arm, target, topic}``: how far the feed is behind each topic's end (alert
``ReloopServeFeedBehind``), brought up to date once per ``LAG_EVERY_S``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from reloop.engine.events.codec import decode_impressions
from reloop.engine.events.sample_batch import SampleBatch, decode_batch
from reloop.engine.exit_guard import native_work
from reloop.engine.features.featurizer import FeatureBatch, FeatureError
from reloop.engine.memory.seen import SeenSeqs
from reloop.engine.metrics.stats import STATS
from reloop.engine.runtime.jsonlog import ThrottledWarning
from reloop.engine.serve.bundle import ModelHolder
from reloop.engine.streams import Source, TopicNotFound, positions_from_json, positions_to_json

log = logging.getLogger(__name__)

TARGET_LABELS = {"ServedMemory": "memory", "ServedCounters": "counters"}
OUTCOMES = ("written", "duplicate", "undecodable", "refused", "failed")
TOPIC_WAIT_LOG_S = 60.0  # "waiting for a topic" at most this often per feed
SHOWN = "shown"  # impressions of the arm's log counted (a counters feed given a shown_topic)
POLL_MAX_RECORDS = 64  # samples messages (1,024 samples each, at most) per poll
# With the impression log (one impression per record): featurising 256 rows at once costs 3.2 us a row
# against 6.1 at 64 (9 fields and 8 counter inputs, 2026-12-06).
SHOWN_POLL_MAX_RECORDS = 256
LAG_EVERY_S = 1.0  # how often the feed's lag gauge is brought up to date


class LabelTarget(Protocol):
    """What a feed writes into (ServedMemory, ServedCounters)."""

    version: int | None
    positions: dict[str, int]
    seen: SeenSeqs  # saved with the positions
    written: int
    rekeys: int

    def rekey(self, bundle: Any) -> None: ...
    def write(self, bundle: Any, batch: FeatureBatch, labels: np.ndarray, times_ms: np.ndarray) -> None: ...
    def save(self, path: str | os.PathLike[str]) -> None: ...
    def load(self, path: str | os.PathLike[str]) -> None: ...


class SamplesFeed:
    def __init__(
        self,
        *,
        name: str,
        source: Source,
        target: LabelTarget,
        holder: ModelHolder,
        state_path: str | os.PathLike[str] | None = None,
        save_every_s: float = 30.0,
        poll_timeout_s: float = 0.2,
        poll_max_records: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        shown_topic: str | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.target = target
        self.shown_topic = shown_topic  # the arm's impression log, counted as shown (module doc)
        self.kind = type(target).__name__  # in log lines
        # reloop_serve_feed_samples_total{arm, target, outcome}: the feed's thread is their only writer
        label = TARGET_LABELS.get(self.kind, self.kind)
        outcomes = (*OUTCOMES, SHOWN) if shown_topic is not None else OUTCOMES
        self._tally = {o: STATS.serve_feed_samples.child(name, label, o) for o in outcomes}
        self._lag, self._label = STATS.serve_feed_lag, label  # reloop_serve_feed_lag_records
        self.holder = holder
        self.state_path = state_path
        self.save_every_s = save_every_s
        self.poll_timeout_s = poll_timeout_s
        if poll_max_records is None:
            poll_max_records = SHOWN_POLL_MAX_RECORDS if shown_topic is not None else POLL_MAX_RECORDS
        self.poll_max_records = poll_max_records
        self.clock = clock
        self.undecodable = 0
        self.duplicates = 0
        self.refused = 0
        self.write_failures = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened = False
        self.created_ms = time.time_ns() // 1_000_000  # a fresh feed counts the impression log from here
        # Set once the source is open and the feed has read what its topics held then (ServingStack.start
        # waits on it where the counts must be whole before serving: shown_topic).
        self.caught_up = threading.Event()
        self._waiting = ThrottledWarning(
            log,
            "%s %s: waiting for a topic (%s); retrying every %.0f s (said once a minute)",
            every_s=TOPIC_WAIT_LOG_S,
        )
        self.problem: str | None = None  # why the last step failed (None once one succeeds): said at start
        self._backlog_end: dict[Any, int] | None = None
        self._restored = False
        self._saved_at = clock()
        self._lag_at = float("-inf")

    def restore(self) -> None:
        """Load the saved target (if any), once. ``start`` does it before the feed's thread starts, so
        the first requests already read it (loaded on the thread, they were served an empty target)."""
        if self._restored:
            return
        self._restored = True
        if self.state_path is not None and os.path.exists(self.state_path):
            try:
                self.target.load(self.state_path)
            except (OSError, ValueError, KeyError) as exc:
                log.error("%s %s: saved state %s refused (%s); starting empty", self.kind, self.name,
                          self.state_path, exc)  # fmt: skip

    def open(self) -> None:
        """Restore the saved target (if any) and open the source where it stopped (else at the end). A
        saved topic this feed no longer reads is left out; a topic it reads that the state does not name
        (``shown_from`` switched to ``impressions``, say) is read from its end, as a fresh feed's topics
        are: from its beginning it would count the log's whole retention as shown now."""
        self.restore()
        positions = positions_from_json(self.target.positions) if self.target.positions else None
        ends = getattr(self.source, "end_positions", None)
        if positions is None:
            self.source.open(None)
            if ends is not None:
                end_then = dict(ends())
                start = dict(end_then)  # KafkaSource: reopen at the log end
                at = getattr(self.source, "positions_at", None)
                if self.shown_topic is not None and at is not None:
                    # The impression log from when this feed was made, however late the open (a broker
                    # down at start, a topic created by the first impression): none shown since is missed.
                    since = at(self.created_ms)
                    start.update({tp: o for tp, o in since.items() if tp.topic == self.shown_topic})
                    self._backlog_end = end_then  # caught up once read from there to the end then
                self.source.open(start)
        else:
            reads = self.source.partitions()
            kept = {tp: offset for tp, offset in positions.items() if tp in reads}
            if len(kept) < len(positions):
                log.warning("%s %s: saved positions of %s left out (not read any more)", self.kind, self.name,
                            sorted({tp.topic for tp in positions if tp not in kept}))  # fmt: skip
            self.source.open(kept)  # a new partition of a saved topic: from its beginning
            if ends is not None:
                self._backlog_end = dict(ends())  # what was there then: caught up once read to here
                saved_topics = {tp.topic for tp in positions}
                new = [tp for tp in reads if tp.topic not in saved_topics]
                if new:
                    self.source.open({**kept, **{tp: self._backlog_end[tp] for tp in new}})
        self._opened = True
        self._check_caught_up()

    def step(self) -> int:
        """One poll: write what came; re-key after a reload; save when due. Returns samples written."""
        if not self._opened:
            self.open()
        bundle = self.holder.current
        if bundle is not None and self.target.version != bundle.version:
            # The model's torch calls: the process's exit waits for them (this thread outlives close()'s
            # wait; inside torch then it aborted the process: engine/exit_guard.py).
            with native_work():
                self.target.rekey(bundle)  # before the poll: a failure here costs no record (module doc)
        records = self.source.poll(self.poll_max_records, self.poll_timeout_s)
        if bundle is not None:
            with native_work():
                written = self._write(bundle, records)
        else:
            written = 0
        # Samples that came before any model was loaded are skipped: there is nothing to key them with.
        self.target.positions = positions_to_json(self.source.position())
        if not self.caught_up.is_set():
            self._check_caught_up()
        if self.clock() - self._lag_at >= LAG_EVERY_S:
            self._lag_at = self.clock()
            self._observe_lag()
        if self.state_path is not None and self.clock() - self._saved_at >= self.save_every_s:
            self.save()
        return written

    def _observe_lag(self) -> None:
        """``reloop_serve_feed_lag_records``: the log end minus the position, per topic, from the ends the
        last fetches reported (else asked for: once per ``LAG_EVERY_S`` at most); unknown ends leave it."""
        ends = None
        fetched = getattr(self.source, "fetched_ends", None)
        asked = getattr(self.source, "end_positions", None)
        try:
            ends = fetched() if fetched is not None else None
            if ends is None and asked is not None:
                ends = asked()
        except Exception:  # noqa: BLE001 - a broker hiccup: the next step tries again
            return
        if not ends:
            return
        now = self.source.position()
        behind: dict[str, int] = {}
        for tp, end in ends.items():
            if tp in now:
                behind[tp.topic] = behind.get(tp.topic, 0) + max(0, int(end) - int(now[tp]))
        for topic, records in behind.items():
            self._lag.set(float(records), self.name, self._label, topic)

    def _check_caught_up(self) -> None:
        """Set ``caught_up`` once every partition is read up to where it ended when the feed opened."""
        end = self._backlog_end
        if end is not None:
            now = self.source.position()
            if any(now.get(tp, 0) < offset for tp, offset in end.items()):
                return
        self._backlog_end = None
        self.caught_up.set()

    def _write(self, bundle: Any, records: list[Any]) -> int:
        """Decode, featurise and write ``records`` into the target; returns the samples written."""
        if self.shown_topic is not None:
            shown = [r for r in records if r.topic == self.shown_topic]
            if shown:
                self._count_shown(bundle, shown)
                records = [r for r in records if r.topic != self.shown_topic]
        written = 0
        for record in records:
            try:
                batch = decode_batch(record.value)
            except Exception:  # noqa: BLE001 - the train stage dead-letters it; here it is skipped
                self.undecodable += 1
                self._tally["undecodable"].add()
                continue
            new = self.target.seen.new_rows(batch)
            if not new.all():  # re-emitted by a join task resumed from its checkpoint: written already
                self.duplicates += int((~new).sum())
                self._tally["duplicate"].add(int((~new).sum()))
                batch = batch.take(np.flatnonzero(new))
            if not len(batch):
                continue
            self.target.seen.mark(batch)  # (a message that fails below is lost to the target, not retried)
            try:
                features, labels, times = self._featurize(bundle, batch)
                if len(labels):
                    before = self.target.written
                    self.target.write(bundle, features, labels, times)
                    self._tally["written"].add(self.target.written - before)  # counters: clicks only
            except Exception:  # noqa: BLE001 - this message is lost to the target, not the poll's rest
                self.write_failures += 1
                self._tally["failed"].add()
                if self.write_failures & (self.write_failures - 1) == 0:  # the 1st, 2nd, 4th, ...
                    log.exception("%s %s: writing a samples message failed (%d so far); "
                                  "skipped", self.kind, self.name, self.write_failures)  # fmt: skip
                continue
            written += len(labels)
        return written

    def _count_shown(self, bundle: Any, records: list[Any]) -> None:
        """Count the arm's impressions among ``records`` (its impression log) as shown."""
        impressions, bad = decode_impressions([r.value for r in records])  # never raises on bad data
        if bad:  # what the join stage dead-letters; here it is skipped
            self.undecodable += len(bad)
            self._tally["undecodable"].add(len(bad))
        # (an impression of another arm in the topic is not this arm's to count)
        rows = [i.features for i in impressions if i.arm == self.name]
        if not rows:
            return
        transform = bundle.featurizer.transform
        batch, _ = self._readable(len(rows), lambda: transform(rows), lambda i: transform([rows[i]]))
        if batch is None:
            return
        self.target.count_logged(bundle, batch)  # type: ignore[attr-defined]
        self._tally[SHOWN].add(len(batch))

    def _featurize(self, bundle: Any, batch: SampleBatch) -> tuple[FeatureBatch, np.ndarray, np.ndarray]:
        """The rows of ``batch`` the live spec can read, their labels and event times."""
        featurize = bundle.featurizer.transform_columns
        labels = batch.numpy("label").astype(np.float64)
        times = batch.numpy("event_time_ms").astype(np.float64)
        got, keep = self._readable(
            len(batch),
            lambda: featurize(batch.features(), rows=len(batch)),
            lambda i: featurize(batch.take(slice(i, i + 1)).features(), rows=1),
        )
        if got is None:
            return featurize({}, rows=0), labels[:0], times[:0]
        return (got, labels, times) if keep is None else (got, labels[keep], times[keep])

    def _readable(
        self, n: int, whole: Callable[[], FeatureBatch], row: Callable[[int], FeatureBatch]
    ) -> tuple[FeatureBatch | None, list[int] | None]:
        """The ``n`` rows featurised at once (``whole``), else (a value the live spec cannot read: slow,
        and rare) one at a time (``row``), each one it cannot read counted as refused. Returns the batch
        (None: no row readable) and the rows kept (None: all of them)."""
        try:
            return whole(), None
        except FeatureError:
            pass
        keep: list[int] = []
        rows: list[FeatureBatch] = []
        for i in range(n):
            try:
                rows.append(row(i))
            except FeatureError:
                self.refused += 1
                self._tally["refused"].add()
                continue
            keep.append(i)
        return (FeatureBatch.concat(rows) if rows else None), keep

    def save(self) -> None:
        if self.state_path is not None:
            self.target.save(self.state_path)
            self._saved_at = self.clock()

    def start(self) -> SamplesFeed:
        self.restore()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"samples-feed-{self.name}", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self.step()
                backoff = 1.0
                self.problem = None
            except TopicNotFound as exc:  # not created yet, or misnamed: no traceback, once a minute
                self.failures += 1
                self.problem = f"waiting for a topic ({exc})"
                # The service is started before the trainer creates the samples topic (the documented
                # order): a line a second per feed was 100 lines in the first 40 s.
                self._waiting(self.kind, self.name, exc, backoff)
                self._stop.wait(backoff)
            except Exception as exc:  # noqa: BLE001 - a broker hiccup or a bad batch must not kill serving
                self.failures += 1
                self.problem = f"its steps fail ({exc!r:.200})"
                log.exception("%s %s: feed step failed; retrying in %.0fs", self.kind, self.name, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            if self._opened:
                self.save()
        finally:
            self.source.close()

    def stats(self) -> dict[str, Any]:
        m = self.target
        return {"written": m.written, "rekeys": m.rekeys, "version": m.version,
                "undecodable": self.undecodable, "duplicates": self.duplicates, "refused": self.refused,
                "write_failures": self.write_failures, "failures": self.failures}  # fmt: skip
