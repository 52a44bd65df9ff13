"""`reloop train`: the train stage. Columnar sample batches in, model versions out.

It reads the samples topic (engine/events/sample_batch.py), one Arrow message per batch of samples:
no Python object per sample anywhere on the way (features are read from the Arrow buffers by the
featurizer, labels and served predictions as numpy columns). Messages from several partitions are
merged by record timestamp (exact, with the log end offsets), so the training order is a function of
the topic's content.

Exactly once: per join task the stage keeps the highest ``seq`` it has taken; rows at or below it are
dropped (a join task resumed from its checkpoint sends again what it had sent after it). A seq that
jumps (a gap) would mean samples never reached the topic: counted in ``seq_gaps`` and logged, never
silently. The highest seq is kept per numbering of the task (its incarnation, see
engine/runtime/join_stage.py): a task that started again at 0 without its checkpoint is a new
numbering, trained from its first sample, logged as an error and counted (``task_restarts``), instead of
dropped as copies until its seqs passed the old ones. Its snapshot holds the model, optimizer, trainer
state, the samples taken but not trained yet, the positions in the samples topic and the per-task seqs,
so a restart resumes exactly; period snapshots and graceful-stop checkpoints work as in the
single-process pipeline (engine/runtime/restore.py), and a bad message goes to the dead-letter topic
with its reason while the rest of its partition is trained. A sample whose features this stage's spec
cannot read (the join stage checked its own spec, which may be another) is not trained: its message is
dead-lettered (``bad_feature``) and the message's other samples train.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from time import monotonic
from typing import Any, NamedTuple

import numpy as np
from reloop.engine.checkpoint.registry import Snapshot, SnapshotError, SnapshotRegistry
from reloop.engine.checkpoint.writer import SnapshotWriter
from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.events.sample_batch import SampleBatch, decode_batch, encode_batch
from reloop.engine.events.validation import EventError
from reloop.engine.exit_guard import native_work
from reloop.engine.features.featurizer import FeatureBatch, FeatureError
from reloop.engine.join.joiner import step_free
from reloop.engine.metrics.lag import ConsumerLag
from reloop.engine.metrics.online import OnlineMetricsBook
from reloop.engine.metrics.stats import STATS, EngineStats
from reloop.engine.runtime.checkpointer import Checkpointer
from reloop.engine.runtime.config import (
    CheckpointSection,
    ConfigError,
    ConsumerSection,
    RecoverySection,
    StagesSection,
    default_of,
)
from reloop.engine.runtime.dead_letter_reasons import KNOWN_REASONS
from reloop.engine.runtime.jsonlog import ThrottledWarning
from reloop.engine.runtime.merge import RecordMerger
from reloop.engine.runtime.restore import (
    RestorePoint,
    SaveKind,
    check_train_fingerprint,
    restore_newest,
    take_over,
)
from reloop.engine.runtime.state_layout import one_process_message
from reloop.engine.runtime.supervisor import PlannedRebuild
from reloop.engine.runtime.train_metrics import TrainerMetrics
from reloop.engine.runtime.train_state import (
    STATE_FORMAT,
    ledger_lengths,
    merged_positions,
    merged_taken,
    numberings_of,
    numberings_to_state,
    rank_parts,
    samples_trained,
    share_of,
)
from reloop.engine.serve.bundle_format import publish_serving_bundle
from reloop.engine.streams import (
    PartitionShare,
    Positions,
    Record,
    Source,
    TopicPartition,
    merge_ends,
    positions_from_json,
    positions_to_json,
)
from reloop.engine.train.ledger import Ledger
from reloop.engine.train.period import PeriodTrigger
from reloop.engine.train.stream import SampleColumns, StepResult, StreamTrainer
from reloop.engine.train.unlearnt import dead_letter_unlearnt, learnt

log = logging.getLogger("reloop.train")

# Numberings kept per join task: each is a start without its checkpoint folder; the oldest beyond this go
# (a batch of one gone would count as a new numbering again: trained, nothing lost).
_NUMBERINGS_KEPT = 16


@dataclass(frozen=True, slots=True)
class TrainStageSettings:
    """What the train stage takes from the config (engine/runtime/build.py); the defaults are the config's."""

    samples_topic: str = default_of(StagesSection, "samples_topic")
    # messages (each ~ one batch of samples)
    poll_max_records: int = default_of(StagesSection, "train_poll_messages")
    poll_timeout_s: float = default_of(ConsumerSection, "poll_timeout_s")
    merge_idle_ms: int = default_of(ConsumerSection, "merge_idle_ms")
    merge_lookahead: int = default_of(ConsumerSection, "merge_lookahead")
    fingerprint: str = ""
    allow_fingerprint_change: bool = False
    flush_timeout_s: float = default_of(RecoverySection, "flush_timeout_s")
    background_writes: bool = default_of(CheckpointSection, "background_writes")
    prefetch: int = 4  # messages decoded and featurised ahead on a thread while the model trains (0: off)
    # A step on a partial batch once the oldest untrained sample waited this long (wall clock), so a slow
    # stream is learned within about this delay instead of when a full batch has gathered. None: full
    # batches only, what deterministic runs and replays need (build.py passes train.max_wait_ms otherwise).
    max_wait_ms: int | None = None
    # With event-time periods: once no sample arrived for this long (wall clock), the period clock goes on
    # from the newest event time trained with the wall clock, as the join's watermark does when its input
    # stops (the join's idle_timeout_ms), so a quiet stream still reaches its boundaries: the version of
    # what was trained comes out, and the stale alert sees a boundary. None: the clock moves with the
    # samples alone, what deterministic runs and replays need (build.py passes join.idle_timeout_ms).
    idle_timeout_ms: int | None = None
    # How often the stage asks the broker whether the samples topic has more partitions than it opened
    # with (a join task added by growing the input topics): it then rebuilds to read them too.
    partition_check_s: float = 30.0


class _Prepared(NamedTuple):
    """One released message: decoded and featurised (or the error that refused it). ``refused`` marks
    the rows whose features the spec cannot read (``error`` is then the first such error): their
    ``features`` rows are placeholders, never trained."""

    record: Record
    batch: SampleBatch | None
    features: FeatureBatch | None
    error: EventError | FeatureError | None
    refused: np.ndarray | None = None


class SamplesTopicGrew(PlannedRebuild):
    """The samples topic has partitions the stage did not open: the supervisor rebuilds the stage, which
    resumes from its last save and reads them from their beginning (they were silently never read)."""


class _Fetcher:
    """Owns the source (a Kafka consumer is not thread-safe) on a background thread: poll, the merge,
    decode and featurise the next messages while the stage trains, handed over in order through a
    bounded queue. The order is the merge's, so what the stage trains is what it would train without
    the thread; an error on the thread is raised by ``take`` (the supervisor then rebuilds the stage)."""

    CLOSE_TIMEOUT_S = 10.0

    def __init__(self, stage: TrainStage) -> None:
        self.stage = stage
        self._out: queue.Queue[_Prepared] = queue.Queue(maxsize=max(1, stage.settings.prefetch))
        # One pending commit, not a queue: each checkpoint's positions supersede the last ones, and a
        # queue grew by one commit per checkpoint while the broker was down, each then waited on in turn.
        self._pending: Positions | None = None
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="train-fetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        st = self.stage
        try:
            while not self._stop.is_set():
                pending = self.take_commit()
                if pending is not None:
                    st._commit_now(pending)
                for r in st._poll_released():
                    # pyarrow and torch: the process's exit waits for it (a thread that outlived close()
                    # inside them aborted the process: engine/exit_guard.py).
                    with native_work():
                        item = st._prepare(r)
                    while not self._stop.is_set():
                        try:
                            self._out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # noqa: BLE001 - handed to the stage's thread
            self._error = exc

    def take(self, timeout_s: float) -> list[_Prepared]:
        items: list[_Prepared] = []
        try:
            items.append(self._out.get(timeout=timeout_s))
            while True:
                items.append(self._out.get_nowait())
        except queue.Empty:
            pass
        if not items and self._error is not None:
            raise self._error
        return items

    def commit(self, positions: Positions) -> None:
        with self._pending_lock:
            self._pending = {**(self._pending or {}), **positions}

    def take_commit(self) -> Positions | None:
        """The positions to commit that this thread has not committed yet (the newest of each partition),
        taken: the stage commits the last ones itself once the thread has stopped."""
        with self._pending_lock:
            pending, self._pending = self._pending, None
        return pending

    def close(self) -> bool:
        """Stop the thread; False when it still runs after ``CLOSE_TIMEOUT_S`` (stuck in the client: it
        still owns the consumer, so nobody else may use it)."""
        self._stop.set()
        self._thread.join(self.CLOSE_TIMEOUT_S)
        return not self._thread.is_alive()


class TrainStage:
    def __init__(
        self,
        *,
        source: Source,
        trainer: StreamTrainer,
        registry: SnapshotRegistry,
        period: PeriodTrigger,
        settings: TrainStageSettings,
        clock: Callable[[], int],
        dead_letters: DeadLetterSink | None = None,
        served_metrics: OnlineMetricsBook | None = None,
        ledger: Ledger | None = None,
        commit: Callable[[Positions], None] | None = None,
        meta: Mapping[str, Any] | None = None,
        stats: EngineStats = STATS,
        share: PartitionShare | None = None,
    ) -> None:
        self.source = source
        # Which rank of how many this is (engine/runtime/train_ranks.py); one process is rank 0 of 1.
        self.share = share or PartitionShare(0, 1)
        self.trainer = trainer
        self.registry = registry
        self.period = period
        self.settings = settings
        self.clock = clock
        self.dead_letters = dead_letters or DeadLetterSink()
        self.served_metrics = served_metrics or OnlineMetricsBook()
        self.ledger = ledger
        self.commit = commit
        # Period snapshots are written on a thread while training goes on (engine/checkpoint/writer.py);
        # with ranks every save stays in step (rank 0's version is agreed on before the next batch).
        self.writer = SnapshotWriter(background=settings.background_writes and self.share.count == 1)
        self.checkpointer = Checkpointer(
            [self.dead_letters],
            commit=self._commit_positions,
            ledger=ledger,
            flush_timeout_s=settings.flush_timeout_s,
            writer=self.writer,
        )
        self.meta = dict(meta or {})
        self.version: int | None = None
        self.snapshots_written = 0
        self.restore_fallbacks = 0
        self.restored_from: str | None = None
        self.records_processed = 0
        self.duplicates_dropped = 0
        self.samples_missing = 0  # seqs jumped over (reloop_train_samples_missing_total)
        self.samples_refused = 0
        self.seq_gaps = 0
        # A range replayed from the middle of the topic (reloop replay --from-samples with a start): each
        # numbering's first samples read are where it starts, not a gap ("samples missing", an ERROR).
        self.starts_mid_topic = False
        self.task_restarts = 0  # new numberings of tasks taken before (reloop_train_join_task_restarts_total)
        # join task -> incarnation -> highest seq taken (trained or buffered), the numbering taken last last
        self._numberings: dict[int, dict[str, int]] = {}
        self._buffer: list[tuple[SampleBatch, FeatureBatch]] = []
        self._buffered = 0
        self._waiting_since: float | None = None  # monotonic s: when the oldest untrained sample was seen
        self.partial_steps = 0  # steps on a partial batch (train.max_wait_ms)
        self._positions: Positions = {}
        self._ledger_lengths: dict[int, int] = {}  # rank -> ledger bytes at the last save
        self._event_time_ms: int | None = None  # newest event time trained: drives event-time periods
        self._merger: RecordMerger | None = None
        self._read: set[TopicPartition] = set()  # the partitions opened (SamplesTopicGrew)
        self._next_partition_check = 0.0
        self._fetcher: _Fetcher | None = None
        self._ends_unavailable = ThrottledWarning(log, "end offsets unavailable")
        # New samples of a numbering after another one's: two join processes with different checkpoint
        # folders taking the task in turn (each numbering is deduplicated on its own: nothing is lost).
        self._earlier_numbering = ThrottledWarning(
            log, "new samples of an earlier numbering of a join task (two checkpoint folders?)"
        )
        self._opened = False
        self.final_saved: int | None = None  # the stop's final save, once durable (the stop watchdog)
        # The idle period clock: the wall clock moved on by its steady clock (as the joiner's idleness),
        # and when the last samples message came by it.
        self._now_ms = step_free(clock)
        self._last_input_ms = self._now_ms()
        self._metrics = _TrainMetrics(
            stats, wall_period_s=period.every_wall_s, event_period_s=period.length_s
        )
        period.on_idle = self._metrics.idle_boundary
        self._restore_latest()

    # ------------------------------------------------------------------ restore
    def _restore_latest(self) -> None:
        def refused(point: RestorePoint, exc: BaseException) -> None:
            self.restore_fallbacks += 1
            self._metrics.fallbacks.add()

        if restore_newest(self.registry, self._restore, refused) is None and self.ledger is not None:
            self.ledger.truncate(0)
            self._trim_other_ledgers()
        take_over(self.registry, bundles=self.share.index == 0)  # rank 0 is the one writer

    def _recreated_samples_topic(self, meta: Mapping[str, Any]) -> None:
        """Read a samples topic deleted and created again since the save (its id differs) from its oldest
        record: the save's positions are the old topic's. Read on from them, the new topic's samples
        below them were skipped and counted as missing from the topic, while they were in it (the train
        stage drops what it trained already by (task, seq), so reading from the start loses nothing)."""
        was, now = meta.get("samples_topic_id"), self.meta.get("samples_topic_id")
        if was and now and was != now and self._positions:
            log.warning(
                "samples topic created again since the save: read from its oldest record",
                extra={
                    "fields": {
                        "positions": positions_to_json(self._positions),
                        "topic_id_was": was,
                        "topic_id": now,
                    }
                },
            )
            self._positions = {}

    def _restore(self, point: RestorePoint, snap: Snapshot) -> None:
        meta = snap.meta
        check_train_fingerprint(
            point, meta, self.meta, self.settings.fingerprint, allow=self.settings.allow_fingerprint_change
        )
        state = snap.state["state"]
        if state.get("stage") != "train":
            if "stage" not in meta:  # the CLI refuses such a folder before starting (state_layout.py)
                raise SnapshotError(one_process_message(f"{point} under {self.registry.root}"))
            raise SnapshotError(f"{point}: not a train-stage state")
        try:
            parts = rank_parts(state, meta)
            mine = share_of(parts, self.share)
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{point}: bad train-stage state: {exc!r}") from exc
        learner = self.trainer.learner
        previous = None
        base = point.base_version  # None: a checkpoint from before the first snapshot (no previous model)
        if point.kind == "checkpoint" and base is not None and self.trainer.config.needs_previous_model:
            learner.load_state_dict(self.registry.load(base, parts=["model"]).state["model"])
            previous = learner.clone_frozen()
        self.trainer.load_state_dict({**mine["trainer"], "learner": snap.state["model"]})
        buffer = [self._with_features(decode_batch(data)) for data in mine["buffer"]]
        book = self.served_metrics
        served = (
            OnlineMetricsBook.from_state_dict(mine["served_metrics"], **book.settings())
            if mine["served_metrics"] is not None
            else OnlineMetricsBook(**book.settings())
        )
        if base is not None:
            self.trainer.on_snapshot(base)
        if previous is not None:
            self.trainer.prev_model = previous
        self.period.load_state_dict(state["period"])
        self.served_metrics = served
        self._buffer = buffer
        self._buffered = sum(len(b) for b, _ in buffer)
        self._numberings = numberings_of(mine)
        self._event_time_ms = mine["event_time_ms"]
        self._positions = positions_from_json(mine["positions"])
        self._recreated_samples_topic(meta)
        self._ledger_lengths = ledger_lengths(state)
        if self.ledger is not None:
            self.ledger.truncate(self._ledger_lengths.get(self.share.index, 0))
        self._restored_parts(parts)
        self.version = base
        self.restored_from = str(point)
        # The last model version's number and time, at once: a restored process that then stalls must
        # trip the snapshot-stale alert without ever writing a snapshot.
        if base is not None:
            self._metrics.restored(self.registry, base)
        log.info("restored", extra={"fields": {"from": self.restored_from, **samples_fields(self)}})

    # ------------------------------------------------------------------ the loop
    def open(self) -> None:
        if self._opened:
            return
        if self.share.count > 1 and not self.source.partitions():
            raise ConfigError(
                f"train rank {self.share.index} of {self.share.count} owns no partition of the samples "
                f"topic {self.settings.samples_topic!r} (rank r reads the partitions p with p % "
                f"{self.share.count} == r): give the topic a multiple of {self.share.count} partitions, "
                "or run fewer ranks"
            )
        self.source.open(self._positions or None)
        if not self._positions:
            self._positions = dict(self.source.position())
        self._read = set(self.source.partitions())
        self._next_partition_check = monotonic() + self.settings.partition_check_s
        self._merger = RecordMerger(
            self.source.partitions(),
            idle_ms=self.settings.merge_idle_ms,
            clock=self.clock,
            lookahead=self.settings.merge_lookahead,
        )
        self._opened = True
        if self.settings.prefetch > 0:
            self._fetcher = _Fetcher(self)

    def run(self, stop: threading.Event, on_step: Callable[[TrainStage], None] | None = None) -> None:
        self.open()
        while not stop.is_set():
            self.step()
            if on_step is not None:
                on_step(self)

    def step(self) -> int:
        items = self._fetch()
        self._train_waited()
        if self.period.every_wall_s is not None or self._idle_clock:
            self._maybe_snapshot()
        self._metrics.publish(self)
        return len(items)

    def _fetch(self) -> list[_Prepared]:
        """Open if needed, then take in what the fetch thread (or one poll here) has ready."""
        self.open()
        if self._fetcher is not None:
            items = self._fetcher.take(self.settings.poll_timeout_s)
        else:
            items = [self._prepare(r) for r in self._poll_released()]
        for item in items:
            self._take(item)
        if items:
            self._last_input_ms = self._now_ms()
        return items

    @property
    def _idle_clock(self) -> bool:
        return self.period.every_event_ms is not None and self.settings.idle_timeout_ms is not None

    def _period_time_ms(self) -> int | None:
        """The event time periods are cut at: the newest trained, moved on with the wall clock once no
        input came for ``idle_timeout_ms`` (``TrainStageSettings.idle_timeout_ms``)."""
        t = self._event_time_ms
        if t is None or not self._idle_clock:
            return t
        idle_ms = self._now_ms() - self._last_input_ms - self.settings.idle_timeout_ms
        return t + idle_ms if idle_ms > 0 else t

    def _poll_released(self) -> list[Record]:
        """One poll, then what the merge can release in exact order (on the fetch thread if any)."""
        assert self._merger is not None
        self._check_partitions()
        records = self.source.poll(self.settings.poll_max_records, self.settings.poll_timeout_s)
        if records:
            self._merger.add(records)
        positions, ends = self.source.position(), self._ends()
        self._metrics.lag.observe(positions, ends)
        return self._merger.release(positions, ends)

    def _check_partitions(self) -> None:
        """Raise ``SamplesTopicGrew`` when the topic has partitions this stage does not read (at most
        every ``partition_check_s``; on the thread that owns the source)."""
        now = monotonic()
        partitions_now = getattr(self.source, "partitions_now", None)
        if partitions_now is None or now < self._next_partition_check:
            return
        self._next_partition_check = now + self.settings.partition_check_s
        try:
            new = sorted(set(partitions_now()) - self._read)
        except Exception as exc:  # noqa: BLE001 - metadata unavailable (an outage): ask again later
            log.warning("samples topic partitions unknown", extra={"fields": {"error": repr(exc)}})
            return
        if new:
            names = ", ".join(f"{tp.topic}:{tp.partition}" for tp in new)
            log.warning(
                "samples topic grew: rebuilding to read its new partitions", extra={"fields": {"new": names}}
            )
            raise SamplesTopicGrew(f"the samples topic has partitions this stage does not read: {names}")

    def _prepare(self, record: Record) -> _Prepared:
        try:
            batch = decode_batch(record.value)
        except EventError as exc:
            return _Prepared(record, None, None, exc)
        try:
            return _Prepared(record, batch, self._featurize(batch), None)
        except FeatureError:
            return self._prepare_row_by_row(record, batch)

    def _prepare_row_by_row(self, record: Record, batch: SampleBatch) -> _Prepared:
        """A message with values the feature spec cannot read (the join stage checks its own spec; this
        stage may train another, e.g. a new model from the same topic): the rows are featurised one at a
        time, so a bad value costs its own sample and not the message (slow, and rare)."""
        refused = np.zeros(len(batch), dtype=bool)
        placeholder = self.trainer.featurizer.transform_columns({}, rows=1)  # all values missing
        rows: list[FeatureBatch] = []
        first: FeatureError | None = None
        for i in range(len(batch)):
            try:
                rows.append(self._featurize(batch.take(slice(i, i + 1))))
            except FeatureError as exc:
                refused[i] = True
                first = first or exc
                rows.append(placeholder)
        return _Prepared(record, batch, FeatureBatch.concat(rows), first, refused)

    def _featurize(self, batch: SampleBatch) -> FeatureBatch:
        return self.trainer.featurizer.transform_columns(batch.features(), rows=len(batch))

    def _with_features(self, batch: SampleBatch) -> tuple[SampleBatch, FeatureBatch]:
        return batch, self._featurize(batch)

    def _ends(self) -> Positions | None:
        try:
            return merge_ends(self.source)
        except Exception as exc:  # noqa: BLE001 - unknown ends: hold back, never guess the order
            self._ends_unavailable(error=repr(exc))
            return {}

    def _take(self, item: _Prepared) -> None:
        record, batch, features = item.record, item.batch, item.features
        duplicates = missing = refused = restarts = 0
        if item.error is not None and item.refused is None:
            self.dead_letters.send(record, item.error)
        if batch is not None and features is not None and len(batch):
            seen = self._numberings.setdefault(batch.task, {})
            restarts = self._new_numbering(batch, seen)
            last = seen.get(batch.incarnation, -1)
            seqs = batch.seqs()
            if last < 0 and self.starts_mid_topic:
                last = int(seqs[0]) - 1
            if seqs[0] > last + 1:
                self.seq_gaps += 1
                missing = int(seqs[0]) - (last + 1)
                log.error(
                    "samples missing from the topic",
                    extra={
                        "fields": {
                            "task": batch.task,
                            "incarnation": batch.incarnation,
                            "expected_seq": last + 1,
                            "got_seq": int(seqs[0]),
                            "missing": int(seqs[0]) - (last + 1),
                        }
                    },
                )
            new = seqs > last
            k = int(new.sum())
            duplicates = len(batch) - k
            if k:
                if batch.incarnation in seen and batch.incarnation != next(reversed(seen)):
                    self._earlier_numbering(task=batch.task, incarnation=batch.incarnation)
                seen.pop(batch.incarnation, None)  # the numbering taken last goes last
                seen[batch.incarnation] = int(seqs[-1])
                while len(seen) > _NUMBERINGS_KEPT:
                    del seen[next(iter(seen))]
                if item.refused is not None:
                    refused = self._refuse(item, new & item.refused)
                    new &= ~item.refused
                for rows in _runs(np.flatnonzero(new)):
                    # Consecutive rows only: a buffered batch's seqs run without gaps (its snapshot form).
                    whole = rows.stop - rows.start == len(batch)
                    piece = (batch, features) if whole else (batch.take(rows), features.take(rows))
                    self._buffer.append(piece)
                    self._buffered += rows.stop - rows.start
        self.duplicates_dropped += duplicates
        self.samples_missing += missing
        self.samples_refused += refused
        self.task_restarts += restarts
        self._metrics.count(
            record, duplicates=duplicates, missing=missing, refused=refused, restarts=restarts
        )
        self._positions[TopicPartition(record.topic, record.partition)] = record.offset + 1
        self.records_processed += 1
        self._train_ready()

    def _new_numbering(self, batch: SampleBatch, seen: dict[str, int]) -> int:
        """1 when ``batch`` starts a new numbering of a task this stage took samples of before (its join
        task started again at 0 without its checkpoint): logged, and its samples are taken from its
        first on. ``seen``: the task's numberings (incarnation -> highest seq taken)."""
        inc = batch.incarnation
        if not seen or inc in seen:
            return 0
        if list(seen) == [""] and batch.first_seq > 0:
            # The numbering this stage took without a name (its state, or batches, from before
            # incarnations), named by a join stage upgraded first: the same numbering goes on.
            seen[inc] = seen.pop("")
            return 0
        previous, highest = next(reversed(seen.items()))
        log.error(
            "join task started a new numbering: training it from its first sample",
            extra={
                "fields": {
                    "task": batch.task,
                    "incarnation": inc,
                    "previous_incarnation": previous,
                    "previous_highest_seq": highest,
                    "first_seq": batch.first_seq,
                    "why": "the task started without its checkpoint folder (lost, wiped, another "
                    "checkpoint.dir), or another pipeline's join stage writes this samples topic: it joins "
                    "its input again from the oldest record retained, and what it had joined before is "
                    "trained a second time; restore the folder, or give each pipeline (each checkpoint.dir) "
                    "its own stages.samples_topic and stages.join_group_id",
                }
            },
        )
        return 1

    def _refuse(self, item: _Prepared, rows: np.ndarray) -> int:
        """Dead-letter a message for its rows the feature spec refused (the message as it was, byte for
        byte; the detail names the rows by seq). Its other rows train. Returns how many rows."""
        assert item.batch is not None
        n = int(rows.sum())
        if not n:
            return 0  # refused before (the copy of a message a resumed join task sent again)
        seqs = item.batch.seqs()[rows]
        shown = ", ".join(map(str, seqs[:20])) + (", ..." if n > 20 else "")
        detail = (
            f"{n} of {len(item.batch)} samples of join task {item.batch.task} have features this stage's"
            f" feature spec cannot read (seq {shown}), first: {item.error}; the others were trained"
        )
        self.dead_letters.send(item.record, EventError("bad_feature", detail))
        return n

    def _train_ready(self) -> None:
        """Train every full batch buffered (the ranks of a data-parallel stage decide together)."""
        bs = self.trainer.config.batch_size
        while self._buffered >= bs:
            self._train(self._cut(bs))
            self._waiting_since = None  # the rest is younger: its wait starts at the next check
            self._maybe_snapshot()

    def _waited(self, wait_ms: int) -> bool:
        """Whether the oldest untrained sample has waited ``wait_ms`` (wall clock). Its wait starts at the
        first check that finds samples buffered, and again after each step (``_waiting_since = None``)."""
        if not self._buffered:
            self._waiting_since = None
            return False
        now = monotonic()
        if self._waiting_since is None:
            self._waiting_since = now
        return (now - self._waiting_since) * 1000 >= wait_ms

    def _train_waited(self) -> None:
        """With ``max_wait_ms``: train what is buffered once its oldest sample waited that long."""
        wait_ms = self.settings.max_wait_ms
        if wait_ms is not None and self._waited(wait_ms):
            self._train(self._cut(self._buffered))
            self.partial_steps += 1
            self._waiting_since = None
            self._maybe_snapshot()

    def _cut(self, n: int) -> list[tuple[SampleBatch, FeatureBatch]]:
        """The first ``n`` buffered rows, as pieces of the buffered batches (in order)."""
        pieces: list[tuple[SampleBatch, FeatureBatch]] = []
        need = n
        while need:
            batch, features = self._buffer[0]
            if len(batch) <= need:
                pieces.append(self._buffer.pop(0))
                need -= len(batch)
            else:
                head, rest = slice(0, need), slice(need, None)  # views, no copy
                pieces.append((batch.take(head), features.take(head)))
                self._buffer[0] = (batch.take(rest), features.take(rest))
                need = 0
        self._buffered -= n
        return pieces

    def train_remaining(self) -> StepResult | None:
        """Train the partial batch now (end of a bounded replay; a live run carries it in its snapshot)."""
        if not self._buffered:
            return None
        return self._train(self._cut(self._buffered))

    def _train(self, chunks: list[tuple[SampleBatch, FeatureBatch]]) -> StepResult:
        pieces = [b for b, _ in chunks]
        features = chunks[0][1] if len(chunks) == 1 else FeatureBatch.concat([f for _, f in chunks])

        def col(name: str) -> np.ndarray:
            parts = [p.numpy(name) for p in pieces]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        cols = SampleColumns(
            labels=col("label").astype(np.float32),
            served=col("served_prediction").astype(np.float32),
            versions=col("served_version"),
            corrections=col("is_correction").astype(bool),
            weights=col("weight").astype(np.float32),
        )
        arms = col("arm")
        newest = int(col("event_time_ms").max())
        if self._event_time_ms is None or newest > self._event_time_ms:
            self._event_time_ms = newest
        self.served_metrics.update_columns(
            arms, cols.versions, cols.labels.astype(np.int64), col("served_prediction"), cols.corrections
        )
        result = self.trainer.train_columns(features, cols)
        unlearnt = result.unlearnt
        if unlearnt is not None:
            self._dead_letter_unlearnt(pieces, unlearnt, result.unlearnt_why)
        if self.ledger is not None:
            ids = [i for p in pieces for i in p.sample_ids()]
            labels, corrections = cols.labels.astype(int).tolist(), cols.corrections.tolist()
            steps = self.trainer.counters.steps
            if unlearnt is None:
                self.ledger.append_columns(steps, ids, labels, corrections)
            else:
                self.ledger.append_columns(
                    steps, learnt(ids, unlearnt), learnt(labels, unlearnt), learnt(corrections, unlearnt)
                )
        self._metrics.trained(result)
        return result

    def _dead_letter_unlearnt(self, pieces: list[SampleBatch], unlearnt: np.ndarray, why: str) -> None:
        """The step's rows it did not learn, one dead letter each, naming its join task and seq."""
        start = 0
        for piece in pieces:
            rows = unlearnt[start : start + len(piece)]
            start += len(piece)
            if rows.any():
                part = piece.take(np.flatnonzero(rows))
                origins = [f"join task {part.task}, seq {seq}" for seq in part.seqs().tolist()]
                dead_letter_unlearnt(
                    self.dead_letters, self.settings.samples_topic, part.to_samples(), why, origins=origins
                )

    # ------------------------------------------------------------------ snapshots
    def _maybe_snapshot(self) -> None:
        self.writer.check()  # a period snapshot whose write failed: the supervisor rebuilds from the last
        if self.period.due(
            samples=self.trainer.counters.samples, event_time_ms=self._period_time_ms(), now_ms=self.clock()
        ):
            self.snapshot(wait=False)

    def snapshot(self, *, kind: SaveKind = "snapshot", wait: bool = True) -> int:
        """Publish the state as the next model version (a period boundary) or as a checkpoint (with
        ranks: all of them together; rank 0 writes the one manifest). In the checkpointer's order: dead
        letters flushed and the ledger synced, the state published, the offsets committed. ``wait``:
        return once it is durable; otherwise once it is serialised, the write and the commit going on
        on the writer thread (a failed write is raised by the next ``snapshot`` or ``step``)."""
        positions = dict(self._positions)
        number = self.checkpointer.save(
            lambda ledger_bytes: self._save(kind, positions, ledger_bytes), positions, kind=kind
        )
        if wait:
            self.writer.wait()
        return number

    def _save(self, kind: SaveKind, positions: Positions, ledger_bytes: int) -> int:
        """The checkpointer's publish step: every rank's part gathered, rank 0 publishes, the ranks agree."""
        boundary = kind == "snapshot"
        trainer_state = self.trainer.state_dict()
        model = trainer_state.pop("learner")  # saved once (the "model" part), not per rank
        parts = self._gather_parts(
            {
                "trainer": trainer_state,
                "served_metrics": self.served_metrics.state_dict(),
                "buffer": [encode_batch(b) for b, _ in self._buffer],
                "buffered": self._buffered,
                # the last numbering's seq (all that states from before incarnations hold), then all of them
                "taken": {str(t): next(reversed(n.values())) for t, n in self._numberings.items() if n},
                "numberings": numberings_to_state(self._numberings),
                "event_time_ms": self._event_time_ms,
                "positions": positions_to_json(positions),
                "ledger_bytes": ledger_bytes,
                **self._part_extra(),
            }
        )
        period_before = self.period.state_dict()
        if boundary:
            times = [p["event_time_ms"] for p in parts if p["event_time_ms"] is not None]
            self.period.mark(
                samples=samples_trained(parts), event_time_ms=max(times, default=None), now_ms=self.clock()
            )
        lengths = {**self._ledger_lengths, **{i: int(p["ledger_bytes"]) for i, p in enumerate(parts)}}
        number: int | None = None
        error: BaseException | None = None
        if self.share.index == 0:
            try:
                number = self._publish(kind, model, parts, lengths)
            except BaseException as exc:  # noqa: BLE001 - raised below, after the ranks agree
                error = exc
        number = self._agree_number(number)
        if number is None:
            self.period.load_state_dict(period_before)
            raise error or SnapshotError(f"rank 0 could not save the {kind}; see its log")
        self._ledger_lengths = lengths
        if self.share.index != 0:  # rank 0 wrote it before the ranks agreed (ranks never write behind)
            fields = {"samples_trained": samples_trained(parts), "base_version": self.version}
            self._durable(kind, number, fields)
        if boundary:
            self.version = number
            self.trainer.on_snapshot(number)
        return number

    def _durable(self, kind: SaveKind, number: int, fields: dict[str, Any]) -> None:
        """A save is on disk (called on the writer thread when writes are in the background)."""
        self.snapshots_written += 1
        if kind == "snapshot":
            self._metrics.snapshotted(number)
        version = number if kind == "snapshot" else fields["base_version"]
        fields = {"number": number, "version": version, **samples_fields(self, fields["samples_trained"])}
        log.info(kind, extra={"fields": fields})

    def _publish(
        self, kind: SaveKind, model: dict[str, Any], parts: list[dict[str, Any]], lengths: dict[int, int]
    ) -> int:
        boundary = kind == "snapshot"
        state = {
            "format": STATE_FORMAT,
            "stage": "train",
            "period": self.period.state_dict(),
            "ranks": parts,
            "ledger_lengths": {str(k): v for k, v in sorted(lengths.items())},
        }
        meta = {
            **self.meta,
            "kind": kind,
            "stage": "train",
            "fingerprint": self.settings.fingerprint,
            "ranks": len(parts),
            "positions": merged_positions(parts),
            "samples_trained": samples_trained(parts),
            "steps": self.trainer.counters.steps,
            "buffered_samples": sum(int(p["buffered"]) for p in parts),
            "taken": merged_taken(parts),
            "previous_version": self.version,
        }
        if not boundary:
            meta["base_version"] = self.version
        target = self.registry if boundary else self.registry.checkpoints
        if boundary:
            # The write in flight first: the bundle takes the version the snapshot will (newest + 1).
            self.writer.wait()
            self._publish_serving_bundle()
        fields = {"samples_trained": meta["samples_trained"], "base_version": self.version}
        return self.writer.publish(
            target,
            {"model": model, "state": state},
            meta,
            on_durable=lambda number: self._durable(kind, number, fields),
        )

    # One process: the hooks a data-parallel stage (engine/runtime/train_ranks.py) fills in.
    def _gather_parts(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        return [mine]

    def _part_extra(self) -> dict[str, Any]:
        return {}

    def _agree_number(self, number: int | None) -> int | None:
        return number

    def _restored_parts(self, parts: list[dict[str, Any]]) -> None:
        """Called at the end of a restore with every rank's saved part."""
        self._trim_other_ledgers()

    def _trim_other_ledgers(self) -> None:
        """Rank 0: the ledger files of ranks this run does not have go back to their length at the save
        restored (what they wrote after it is trained again by the rank that owns its partition now)."""
        if self.ledger is None or self.share.index != 0:
            return
        base = self.ledger.path
        for path in base.parent.glob(base.name + ".rank*"):
            rank = path.name[len(base.name) + len(".rank") :]
            if rank.isdigit() and int(rank) >= self.share.count:
                with open(path, "r+b") as f:
                    f.truncate(min(self._ledger_lengths.get(int(rank), 0), path.stat().st_size))

    def _commit_now(self, positions: Positions) -> None:
        """A commit on the thread that owns the consumer (the fetch thread, or the stage at close): a
        failure is logged, never raised."""
        if self.commit is None:
            return
        try:
            self.commit(positions)
        except Exception as exc:  # noqa: BLE001 - offsets are informational; the snapshot is the truth
            log.warning("offset commit failed", extra={"fields": {"error": repr(exc)}})

    def _commit_positions(self, positions: Positions) -> None:
        """The checkpointer's commit step (a failure is logged there): the fetch thread owns the consumer
        when there is one, so it commits at its next turn."""
        if self._fetcher is not None:
            self._fetcher.commit(positions)
        elif self.commit is not None:
            self.commit(positions)

    def _publish_serving_bundle(self) -> None:
        """The version's weights alone for the scoring service, written just before its snapshot
        (engine/serve/bundle_format.py); without it serving loads the version from the snapshot."""
        try:
            publish_serving_bundle(self.registry, self.trainer.learner)
        except OSError as exc:
            log.warning("serving bundle not written", extra={"fields": {"error": repr(exc)}})

    # ------------------------------------------------------------------ lifecycle
    def _stop_fetcher(self) -> None:
        fetcher, self._fetcher = self._fetcher, None
        if fetcher is None:
            return
        stopped = fetcher.close()
        pending = fetcher.take_commit()
        if pending is None:
            return
        if stopped:
            self._commit_now(pending)
        else:  # the thread is stuck in the client, which is not thread-safe: leave it alone
            log.warning("offset commit skipped: the fetch thread did not stop (the snapshot has them)")

    def close(self, *, final: SaveKind | None = "checkpoint") -> int | None:
        number = None
        saved = True
        try:
            if final is not None and self._opened:
                try:
                    number = self.snapshot(kind=final)
                except Exception as exc:  # noqa: BLE001 - the previous snapshot stays the restart point
                    saved = False
                    log.error("final save skipped", extra={"fields": {"kind": final, "error": repr(exc)}})
        finally:
            # Before the fetcher stops: the write's offset commit goes through it.
            if self.writer.finish() and saved and number is not None:
                self.final_saved = number
            self._stop_fetcher()
            self.source.close()
            if saved:
                self.dead_letters.close()
            elif self.dead_letters.sink is not None:
                (getattr(self.dead_letters.sink, "abort", None) or self.dead_letters.sink.close)()
            if self.ledger is not None:
                self.ledger.close()
        return number

    def abort(self) -> None:
        # The write in flight first, so that whoever restores next sees it.
        for release in (self.writer.finish, self._stop_fetcher, self.source.close, self._abort_dead_letters):
            try:
                release()
            except Exception as exc:  # noqa: BLE001 - tearing down a failed stage
                log.warning("abort: release failed", extra={"fields": {"error": repr(exc)}})
        if self.ledger is not None:
            self.ledger.close()

    def _abort_dead_letters(self) -> None:
        sink = self.dead_letters.sink
        if sink is not None:
            (getattr(sink, "abort", None) or sink.close)()

    @property
    def positions(self) -> Positions:
        return dict(self._positions)

    @property
    def buffered_samples(self) -> int:
        return self._buffered

    @property
    def samples_trained_all(self) -> int:
        """Samples trained by every rank together (one rank: this stage's own)."""
        return self.trainer.counters.samples


def samples_fields(stage: Any, samples_trained: int | None = None) -> dict[str, int]:
    """A train stage's counts for its log lines: ``samples_trained`` by every rank together (or as of a
    save: ``samples_trained``); with ranks, which rank this is and ``rank_samples_trained``, its own.
    Every line means the same by each name (a rank's progress line had counted its own as
    ``samples_trained``, its snapshot line every rank's)."""
    fields = {"samples_trained": stage.samples_trained_all if samples_trained is None else samples_trained}
    share = stage.share
    if share.count > 1:
        fields |= {
            "rank": share.index,
            "ranks": share.count,
            "rank_samples_trained": stage.trainer.counters.samples,
        }
    return fields


# Per process (its stats): samples partition -> the first offset whose messages it has not counted yet.
_COUNTED: weakref.WeakKeyDictionary[EngineStats, dict[TopicPartition, int]] = weakref.WeakKeyDictionary()


class _TrainMetrics(TrainerMetrics):
    """The trainer's metrics plus what only the train stage counts (copies dropped, samples missing or
    refused, new numberings, dead letters)."""

    def __init__(
        self, stats: EngineStats, *, wall_period_s: float | None, event_period_s: float | None
    ) -> None:
        super().__init__(stats, wall_period_s=wall_period_s, event_period_s=event_period_s)
        self.lag = ConsumerLag(stats.consumer_lag, owner="train")  # observed on the consumer's thread
        self._dupes = stats.train_duplicates_dropped
        self._refused = stats.train_samples_refused
        self._missing = stats.train_samples_missing
        self._restarts = stats.train_join_task_restarts
        self._dead = stats.dead_letters
        # At zero from the start: a series that first appears at its first event has no increase() over
        # it, and the alerts on these (ReloopSamplesMissing ...) missed the first one.
        for tally in (self._dupes, self._refused, self._missing, self._restarts):
            tally.child()
        for reason in KNOWN_REASONS:
            self._dead.child(reason)
        self.fallbacks = stats.snapshot_restore_fallbacks
        self._counted = _COUNTED.setdefault(stats, {})
        self._last_dead: dict[str, int] = {}

    def count(self, record: Record, *, duplicates: int, missing: int, refused: int, restarts: int) -> None:
        """What taking one samples message found, counted once per process: a stage the supervisor
        rebuilt restores its last save and reads the messages after it again, whose copies, gaps,
        refused samples and new numberings the exported counters hold already (the same ones: what a
        message is found to be is a function of the restored state and the topic)."""
        tp = TopicPartition(record.topic, record.partition)
        if record.offset < self._counted.get(tp, 0):
            return
        self._counted[tp] = record.offset + 1
        for tally, n in (
            (self._dupes, duplicates),
            (self._missing, missing),
            (self._refused, refused),
            (self._restarts, restarts),
        ):
            if n:
                tally.add(n=n)

    def publish(self, stage: TrainStage) -> None:
        dead = stage.dead_letters.counts
        if dead != self._last_dead:
            for reason, n in dead.items():
                d = n - self._last_dead.get(reason, 0)
                if d:
                    self._dead.add(reason, n=d)
            self._last_dead = dict(dead)


def _runs(index: np.ndarray) -> list[slice]:
    """Sorted row indices as slices of consecutive rows: [0, 1, 3] -> [0:2, 3:4]."""
    if not len(index):
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(index)]))
    return [slice(int(index[a]), int(index[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]
