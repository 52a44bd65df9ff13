"""`reloop join`: the join stage. Impressions and clicks in, columnar sample batches out.

Partition p of the impressions topic and partition p of the clicks topic make one join task
(engine/runtime/join_task.py); the samples it emits go to partition p of the samples topic. Tasks are
spread over the processes of one consumer group: Kafka's range assignment gives partition p of both
topics to the same member (start-up refuses topics whose partition counts differ), a second process
takes half the tasks, and the tasks of a process that dies move to the others after its session times
out. A task's state lives in its own checkpoint folder (``<dir>/join/task-<p>``), so whoever owns the
task next resumes it from there: the folder must be shared by the joiner processes (one machine, or a
shared volume).

Delivery argument (exactly-once into training, at-least-once on the topic):

* every sample carries ``(task, seq)`` (and its numbering's incarnation, below); a task numbers its
  output 0, 1, 2, ... for its whole life;
* a checkpoint is written only after every sample numbered below its ``sent`` is durable in the samples
  topic (flush first), and samples emitted but not yet sent are stored IN the checkpoint;
* between checkpoints a task's output is a function of its checkpoint, its input and its merge journal
  (records merged in an exact order; wall-clock actions only at checkpoints, the door's time bounds
  against a clock read only there too; the merge's releases past an input at its end offset, which
  depend on what the broker held then, written to the checkpoint's merge journal and fsynced before a
  sample that depends on them is sent: join_task.py, merge_journal.py), so a task resumed after a crash
  or a move emits the same samples with the same numbers again;
* the train stage keeps, per task, the highest seq it has taken (in its own snapshot) and drops the
  rest: a sample sent twice is trained once, and no number is skipped, so none is lost.

A task's numbering has a name, its *incarnation* (``reloop.incarnation`` on every batch, in its
checkpoints). A task that finds no checkpoint starts a new numbering at 0 under a new random name and
writes its first checkpoint (empty, the name in it) before it sends anything: resumed after a crash
before its next checkpoint, it is the same numbering and its copies are dropped as above. A task that
starts afresh although it ran before (its folder lost: a new volume, a wiped or mistyped checkpoint dir)
numbers again from 0 what it joins from the oldest input retained; the train stage keeps its highest seq
per numbering, so it trains the new numbering from its first sample, logs an error naming the task and
both incarnations, and counts it (``reloop_train_join_task_restarts_total``). Before incarnations it
dropped every new sample until the new seqs passed the old highest one: with the input's retention
shorter than the task's life, days of samples lost in silence. The other answers were weighed: the join
stage refusing to start such a task, or continuing the numbering from the samples partition, needs it to
read the samples topic (and still leaves the operator a lost folder to get past); dropping loses data.
Taking the new numbering trains a second time what the task joins again (at most the input topics'
retention); nothing is lost, and the log and the counter say it happened. Data-parallel train ranks
keep the numberings of the tasks whose partitions they own (engine/runtime/train_state.py). The
decision is a function of the samples topic, so a replay of the topic decides the same.

Kafka transactions (read_committed) were the other way; they would not cover the checkpoint files, and
kafka-python's transactional producer serialises on one in-flight transaction, so dedup it is.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.deadletter import DeadLetterSink
from reloop.engine.events.sample_batch import batch_from_joined, encode_batch
from reloop.engine.events.validation import EventError
from reloop.engine.features.check import SpecChecker
from reloop.engine.join.joiner import JoinerConfig
from reloop.engine.metrics.lag import ConsumerLag
from reloop.engine.metrics.stats import STATS, EngineStats
from reloop.engine.runtime.checkpointer import Checkpointer
from reloop.engine.runtime.config import (
    ConfigError,
    ConsumerSection,
    RecoverySection,
    SourceSection,
    StagesSection,
    default_of,
    fingerprinted_defaults,
)
from reloop.engine.runtime.intake import EventIntake, IntakeLimits
from reloop.engine.runtime.join_metrics import BoundDropLog, JoinDrops, JoinerMetrics, TooLateLog
from reloop.engine.runtime.join_task import JoinTask
from reloop.engine.runtime.jsonlog import ThrottledWarning
from reloop.engine.runtime.merge_journal import MergeDecision, MergeJournal
from reloop.engine.runtime.restore import (
    NewerFormat,
    NoUsableSnapshot,
    SnapshotMismatch,
    check_fingerprint,
    config_changes,
    newer_format,
)
from reloop.engine.runtime.retention_watch import RetentionWatch
from reloop.engine.streams import (
    Positions,
    Record,
    RecordTooLarge,
    Sink,
    TopicPartition,
    merge_ends,
    positions_to_json,
)

log = logging.getLogger("reloop.join")


class GroupSource(Protocol):
    """A source whose partitions a consumer group assigns (connectors/kafka/group_source.py)."""

    def subscribe(self, listener: Any) -> None: ...
    def poll(self, max_records: int, timeout_s: float) -> list[Record]: ...
    def joined(self) -> bool: ...  # a member of the group's current generation (maybe with no partitions)
    def longest_join_s(self) -> float: ...  # how long a healthy (re)join of the group may take
    def position(self) -> Positions: ...
    def end_positions(self) -> Positions: ...
    def seek(self, positions: Mapping[TopicPartition, int | None]) -> None: ...
    def commit(self, positions: Mapping[TopicPartition, int]) -> None: ...
    def partition_count(self, topic: str) -> int: ...
    def close(self) -> None: ...


class ConsumerStalled(RuntimeError):
    """The consumer fetched nothing for ``stall_timeout_s`` since its tasks were assigned while the log
    holds records for it, or was not a member of its group for that long (at least the client's
    ``longest_join_s``): the supervisor rebuilds the stage (a fresh client, each task from its
    checkpoint)."""


class SamplesPartitionsUnknown(RuntimeError):
    """The samples producer did not learn of the samples topic's new partitions in time: rebuilt (a new
    producer starts from the cluster's metadata)."""


class CopartitionError(ConfigError):
    """The impressions and clicks topics (or the samples topic) have partition counts that do not fit: a
    configuration error (one line, exit 2), not a failure a rebuild could fix (it retried for 15 minutes,
    a traceback each time, while ``reloop run``'s train process looked healthy)."""


@dataclass(frozen=True, slots=True)
class JoinStageSettings:
    """What the join stage takes from the config (engine/runtime/build.py); the defaults are the config's."""

    impressions_topic: str = default_of(SourceSection, "impressions_topic")
    clicks_topic: str = default_of(SourceSection, "clicks_topic")
    samples_topic: str = default_of(StagesSection, "samples_topic")
    poll_max_records: int = default_of(ConsumerSection, "poll_max_records")
    poll_timeout_s: float = default_of(ConsumerSection, "poll_timeout_s")
    merge_idle_ms: int = default_of(ConsumerSection, "merge_idle_ms")
    merge_lookahead: int = default_of(ConsumerSection, "merge_lookahead")
    batch_samples: int = default_of(StagesSection, "batch_samples")
    max_delay_ms: int = default_of(StagesSection, "max_delay_ms")
    checkpoint_every_s: float = default_of(StagesSection, "join_checkpoint_every_s")
    checkpoint_max_share: float = default_of(StagesSection, "join_checkpoint_max_share")
    flush_timeout_s: float = default_of(RecoverySection, "flush_timeout_s")
    fingerprint: str = ""
    # The settings the fingerprint covers (join, validation), recorded in each checkpoint: a refused
    # change then names the keys that changed, not only two hashes.
    fingerprinted: Mapping[str, Any] = field(default_factory=dict)
    allow_fingerprint_change: bool = False
    # A client that stops fetching while records wait (kafka-python 3.0.12 once spun in poll for 600 s
    # returning nothing) is replaced, never waited on for ever.
    stall_timeout_s: float = default_of(StagesSection, "stall_timeout_s")


class JoinStage:
    WAITING_NOTE_S = 10.0  # out of the group this long: say why it waits

    def __init__(
        self,
        *,
        source: GroupSource,
        samples: Sink,
        dead_letters: DeadLetterSink,
        checkpoint_root: str | Path,
        joiner_config: JoinerConfig,
        limits: IntakeLimits,
        settings: JoinStageSettings,
        clock: Callable[[], int],
        checker: SpecChecker | None = None,
        stats: EngineStats = STATS,
        retention_ms: Mapping[str, int] | None = None,
        topic_ids: Mapping[str, str] | None = None,
    ) -> None:
        """``retention_ms``: the input and samples topics' ``retention.ms``, where known (a warning for
        records stamped longer ago: engine/runtime/retention_watch.py). ``topic_ids``: the input topics'
        ids when the stage starts, where known (``_recreated_inputs``)."""
        self.source = source
        self.samples = samples
        self.dead_letters = dead_letters
        self.checkpointer = Checkpointer(
            [samples, dead_letters], commit=source.commit, flush_timeout_s=settings.flush_timeout_s
        )
        self.root = Path(checkpoint_root) / "join"
        self._registries: dict[int, SnapshotRegistry] = {}  # task -> its checkpoints (registry())
        self.joiner_config = joiner_config
        self.settings = settings
        self.clock = clock
        self.retention_watch = RetentionWatch(retention_ms or {}, clock, stats)
        self._topic_ids = dict(topic_ids or {})
        self._ends_unavailable = ThrottledWarning(log, "end offsets unavailable")
        self.intake = EventIntake(
            impressions_topic=settings.impressions_topic,
            clicks_topic=settings.clicks_topic,
            limits=limits,
            clock=clock,
            dead_letters=dead_letters,
            checker=checker,
            check_keys=True,
        )
        self.tasks: dict[int, JoinTask] = {}
        self._journals: dict[int, MergeJournal] = {}  # task -> the merge journal of its checkpoint
        self.final_saved: dict[str, int | None] | None = None  # the stop's checkpoints (stop watchdog)
        self.rebalances = 0
        self.snapshots_written = 0  # periodic checkpoints published, their output sent: progress
        self.samples_sent = 0
        self.messages_split = 0  # samples messages sent as halves: too large for the topic (_send_message)
        self._last_checkpoint = time.monotonic()
        self.checkpoint_interval_s = settings.checkpoint_every_s
        self._last_records = time.monotonic()
        self._outside_group_since: float | None = None
        self._said_waiting = False  # the wait to join the group logged (once per wait)
        # A join waits for the group (a dead member's session to end, the others to notice the rebalance
        # at their next heartbeat and rejoin, the broker's group.initial.rebalance.delay.ms): judged by a
        # stall_timeout_s shorter than that, every rebuild left the group and joined it again, a new
        # rebalance each time, and the stage never joined (kafka-python, stall_timeout_s 2 on a broker
        # with Kafka's default 3 s initial delay; two joiners with 1 s and the default 3 s heartbeats).
        self._membership_timeout_s = max(settings.stall_timeout_s, source.longest_join_s())
        self._last_send: dict[int, float] = {}
        self._unreported: set[int] = set()  # tasks assigned whose inputs' start is not logged yet
        # The Kafka sources tell input records retention deleted before they were read, and partitions
        # read again from below their position (none: others).
        self._take_deleted_unread = getattr(source, "take_deleted_unread", None)
        self._take_restarted_below = getattr(source, "take_restarted_below", None)
        self._metrics = _JoinMetrics(stats, inputs=(settings.impressions_topic, settings.clicks_topic))
        self._listener_error: BaseException | None = None
        self._samples_topic_checked = False
        self._check_partitions()
        source.subscribe(self)

    # ------------------------------------------------------------------ membership
    def _check_partitions(self) -> None:
        self._check_inputs()
        self._check_samples_topic()

    def _check_inputs(self) -> None:
        s = self.settings
        counts = {t: self.source.partition_count(t) for t in (s.impressions_topic, s.clicks_topic)}
        if len(set(counts.values())) != 1:
            most = max(counts.values())
            behind = [t for t, n in counts.items() if n < most]
            raise CopartitionError(
                f"impressions and clicks must be co-partitioned (same partition count, keyed by impression "
                f"id): {counts}; grow {', '.join(behind)} to {most} partitions too (and the samples topic "
                "to at least as many), then start the join stage again"
            )
        self._task_count = counts[s.impressions_topic]

    def _check_samples_topic(self) -> None:
        s = self.settings
        need = self._task_count
        have = self.source.partition_count(s.samples_topic)
        if have < need:
            raise CopartitionError(
                f"the samples topic {s.samples_topic!r} has {have} partitions; it needs at least {need} "
                f"(one per join task)"
            )
        # The samples producer must know every task's partition before a task sends: at its clients'
        # default metadata age (5 minutes) the new tasks' first sends failed the stage.
        wait = getattr(self.samples, "wait_for_partitions", None)
        if wait is not None and not wait(need, self.settings.stall_timeout_s):
            raise SamplesPartitionsUnknown(
                f"the samples producer does not know {need} partitions of {s.samples_topic!r} after "
                f"{self.settings.stall_timeout_s:g} s"
            )
        self._samples_topic_checked = True

    def registry(self, partition: int) -> SnapshotRegistry:
        """One registry object per task for this stage's life: its fence (``SnapshotRegistry.write``)
        stops a process that lost the task (paused past its session, a zombie) from checkpointing over
        the new owner's state; a new object per write never fenced anything."""
        reg = self._registries.get(partition)
        if reg is None:
            reg = self._registries[partition] = SnapshotRegistry(self.root / f"task-{partition:05d}", keep=2)
        return reg

    def on_assigned(self, assigned: list[TopicPartition]) -> None:
        """The group gave this process these partitions: resume their tasks from their checkpoints.
        Called inside ``poll``, where a Kafka client would only log an exception: it is kept and
        raised by ``step`` instead."""
        try:
            self._assign(assigned)
        except BaseException as exc:
            self._listener_error = exc

    def on_revoked(self, revoked: list[TopicPartition]) -> None:
        """The group takes these partitions away: checkpoint their tasks so the next owner resumes them."""
        try:
            self._revoke(revoked)
        except BaseException as exc:
            self._listener_error = exc

    def _assign(self, assigned: list[TopicPartition]) -> None:
        self.rebalances += 1
        numbers = sorted({tp.partition for tp in assigned})
        if numbers and numbers[-1] >= self._task_count:
            # A topic grew while running: a task whose clicks (or impressions) partition does not exist
            # yet would wait for it for ever, buffering the other's records without bound; refused as
            # at start-up (one line, exit 2) until the topics are co-partitioned again. The samples
            # topic after this poll (``step``): inside the client's rebalance callback only what the
            # group subscribes to is at hand (kafka-python cannot fetch metadata there: "Cannot block
            # on net.run() from the IO thread itself", and each growth failed the stage).
            self._check_inputs()
            self._samples_topic_checked = False
        seek: dict[TopicPartition, int | None] = {}
        for p in numbers:
            if p in self.tasks:
                continue
            task = self._new_task(p)
            if not self._restore(task):
                self._start_numbering(task)
            self._metrics.taken(p, task)
            self.tasks[p] = task
            for tp in task.inputs:
                seek[tp] = task.positions.get(tp)
        self.source.seek(seek)
        self._unreported.update(p for p in numbers if p in self.tasks)
        # The stall clock starts when the tasks are in place: the rebalance and their restore (a large
        # join state loads for seconds) fetch nothing, and counted in, they made the first step after an
        # assignment a stall; when they took longer than stall_timeout_s, after every rebuild again.
        self._last_records = time.monotonic()
        self._metrics.tasks.set(len(self.tasks))
        log.info("tasks assigned", extra={"fields": {"tasks": sorted(self.tasks)}})

    def _revoke(self, revoked: list[TopicPartition]) -> None:
        gone = sorted({tp.partition for tp in revoked} & set(self.tasks))
        self._metrics.publish(self)  # the counts since the last step, before the tasks go
        for p in gone:
            self._checkpoint(self.tasks[p], advance=False, final=True)
        for p in gone:
            del self.tasks[p]
        self._unreported.difference_update(gone)
        self._close_journals(gone)
        self._metrics.tasks.set(len(self.tasks))
        if gone:  # (at a stop the tasks are saved and released before the group revokes them)
            if not self.tasks:
                self.retention_watch.idle()
            log.info("tasks revoked", extra={"fields": {"revoked": gone, "kept": sorted(self.tasks)}})

    def _new_task(self, partition: int) -> JoinTask:
        s = self.settings
        return JoinTask(
            partition=partition,
            impressions_topic=s.impressions_topic,
            clicks_topic=s.clicks_topic,
            joiner_config=self.joiner_config,
            intake=self.intake,
            clock=self.clock,
            merge_idle_ms=s.merge_idle_ms,
            merge_lookahead=s.merge_lookahead,
        )

    def _restore(self, task: JoinTask) -> bool:
        """The task as its newest checkpoint that loads and applies left it; False when it has none.

        A checkpoint that does not load (a checksum, a part that does not unpickle) or whose state the
        task does not take (a key missing, a value of another type) is refused, logged and counted, and
        the one before it tried: resumed from there, the task emits the same samples under the same
        numbers again, and the train stage drops the ones it has. When none works the stage stops
        (``NoUsableSnapshot``, exit 2): started afresh, the task would emit its partition's history
        again. A checkpoint written by a newer reloop stops it too (``NewerFormat``): the one before it
        is from before the upgrade (or gone: two are kept), and a rollback is the operator's call."""
        reg = self.registry(task.partition)
        versions = reg.versions()
        if not versions:
            return False
        refused: list[str] = []
        for version in reversed(versions):
            name = f"join task {task.partition}'s checkpoint {version}"
            try:
                snap = reg.load(version)
                check_fingerprint(
                    name,
                    snap.meta.get("fingerprint"),
                    self.settings.fingerprint,
                    allow=self.settings.allow_fingerprint_change,
                    changes=lambda meta=snap.meta: config_changes(
                        meta.get("config"),
                        dict(self.settings.fingerprinted),
                        ("join", "validation"),
                        defaults=fingerprinted_defaults(learner=False),
                    ),
                )
                task.load_state_dict(snap.state["state"])
            except NewerFormat as exc:  # the registry's (its manifest) or the task's (its state)
                # (A fresh folder is no answer here: the task would join its input again, retained
                # history and all, under a new numbering that the train stage trains again.)
                raise newer_format(name, reg.path(version), exc, fresh_dir=False) from exc
            except SnapshotMismatch:
                raise
            except Exception as exc:  # noqa: BLE001 - an unusable checkpoint: the one before it
                refused.append(f"checkpoint {version}: {exc!s:.300}")
                log.error(
                    "refusing join task checkpoint, falling back",
                    extra={"fields": {"task": task.partition, "checkpoint": version, "error": repr(exc)}},
                )
                continue
            break
        else:
            raise NoUsableSnapshot(
                f"join task {task.partition}: no checkpoint under {reg.root} loads; refusing to start it "
                "from scratch, which would emit its partition's history again (refused: "
                f"{'; '.join(refused)})"
            )
        if refused:
            self._metrics.restore_fallbacks.add(n=len(refused))
        self._recreated_inputs(task, snap.meta)
        decisions = self._open_journal(task)
        if decisions or refused or not task.restored_final:
            task.replay(decisions)  # and no wall-clock action until past what the previous life saw
        # A checkpoint the previous owner writes after this stops our next one. The newest version in
        # the folder, not the one restored: a newer one that did not load (logged, counted above) is
        # no other writer's, and following the restored one stopped every checkpoint of the task.
        reg.follow(max(versions[-1], snap.version))
        log.info(
            "task restored",
            extra={
                "fields": {
                    "task": task.partition,
                    "checkpoint": snap.version,
                    "incarnation": task.incarnation,
                    "next_seq": task.next_seq,
                    "merge_decisions_to_replay": len(decisions),
                    **({"refused": refused} if refused else {}),
                }
            },
        )
        # Not after a fallback: the task may have judged records after the older checkpoint, under the
        # newer one that did not load, and must judge them the same again. Nor before a replay.
        lag = 0 if refused or decisions else task.restamp_door()
        if lag or task.catching_up or task.partition not in self._journals:
            # Saved before the task judges anything, with a journal of its own (the decisions to replay
            # carried into it): a crash from here on resumes this state, and a previous owner still
            # running (paused past its session) writes to the old journal, never to this task's.
            self._checkpoint(task, advance=False)
        if lag:
            log.info(
                "door clock moved to the wall clock after a stop",
                extra={"fields": {"task": task.partition, "lag_ms": lag}},
            )
        return True

    def _open_journal(self, task: JoinTask) -> list[MergeDecision]:
        """Open the merge journal of the restored checkpoint; the decisions in it. A journal that does
        not parse is logged and taken as empty: the task then decides afresh where it would have
        replayed (what a task did before merge journals)."""
        if not task.journal:  # a checkpoint from before merge journals
            return []
        folder = self.registry(task.partition).root
        try:
            journal, decisions = MergeJournal.open(folder, task.journal)
        except ValueError as exc:
            log.error(
                "merge journal unreadable: the task decides afresh where it would have replayed",
                extra={"fields": {"task": task.partition, "journal": task.journal, "error": str(exc)}},
            )
            self._metrics.restore_fallbacks.add()
            return []
        self._journals[task.partition] = journal
        return decisions

    def _start_numbering(self, task: JoinTask) -> None:
        """A task without a checkpoint: a new numbering under a new incarnation, checkpointed before its
        first sample, so that a crash before its next checkpoint resumes this numbering (its copies are
        then dropped) instead of starting another one (its copies would be trained twice)."""
        task.incarnation = uuid.uuid4().hex
        self._checkpoint(task, advance=False)
        log.info(
            "task started without a checkpoint: a new numbering from the oldest input retained",
            extra={
                "fields": {
                    "task": task.partition,
                    "incarnation": task.incarnation,
                    "checkpoints": str(self.registry(task.partition).root),
                }
            },
        )

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event, on_step: Callable[[JoinStage], None] | None = None) -> None:
        while not stop.is_set():
            self.step()
            if on_step is not None:
                on_step(self)

    def step(self) -> int:
        s = self.settings
        records = self.source.poll(s.poll_max_records, s.poll_timeout_s)
        if self._listener_error is not None:
            error, self._listener_error = self._listener_error, None
            raise error
        if not self._samples_topic_checked:  # before any of the new tasks' samples is sent
            self._check_samples_topic()
        if self._take_deleted_unread is not None:
            self._count_deleted_unread(self._take_deleted_unread())
        if self._take_restarted_below is not None:
            for tp, n in self._take_restarted_below().items():  # each one warned of by the source
                self._metrics.restarted_below.add(tp.topic, n=n)
        if records:
            self._last_records = time.monotonic()
            self._metrics.consumed(records)
            for r in (records[0], records[-1]):  # sampled: a topic stamped too long ago is so for a while
                self.retention_watch.read(r.topic, r.timestamp_ms)
            by_task: dict[int, list[Record]] = {}
            for r in records:
                by_task.setdefault(r.partition, []).append(r)
            for p, rs in by_task.items():
                task = self.tasks.get(p)
                if task is not None:  # records of a partition revoked inside this poll are read again
                    task.add(rs)
        fetched = self.source.position()
        ends = self._ends()
        self._metrics.lag.observe(fetched, ends)
        if self._unreported:
            self._report_start(fetched, ends)
        processed = 0
        now = time.monotonic()
        if not records and now - self._last_records >= s.stall_timeout_s:
            # The broker's ends now: a consumer that stopped fetching never hears of new records.
            self._check_stalled(fetched, self._ends(ask=True))
        self._check_membership(now)
        for task in self.tasks.values():
            processed += task.process(fetched, ends)
            while len(task.unsent) >= s.batch_samples:
                self._send(task, s.batch_samples)
            if task.unsent and (now - self._last_send.get(task.partition, 0.0)) * 1000 >= s.max_delay_ms:
                self._send(task, None)
        if now - self._last_checkpoint >= self.checkpoint_interval_s:
            self.checkpoint_all()
        self._metrics.publish(self)
        return processed

    def _report_start(self, fetched: Positions, ends: Positions) -> None:
        """Once per assignment, where each new task's inputs stand at its first step with known positions
        and ends: [position, end] per partition. A task at its end with nothing read says the input held
        nothing retained for it (a fresh task whose records the broker had deleted, say), one far behind
        its backlog."""
        known = set(fetched) & set(ends)
        tasks = self.tasks
        ready = [p for p in sorted(self._unreported) if p in tasks and set(tasks[p].inputs) <= known]
        if not ready:
            return
        self._unreported.difference_update(ready)
        tps = [tp for p in ready for tp in tasks[p].inputs]
        inputs = {f"{tp.topic}:{tp.partition}": [fetched[tp], ends[tp]] for tp in tps}
        log.info("tasks' inputs at their first step: [position, end]", extra={"fields": {"inputs": inputs}})

    def _count_deleted_unread(self, deleted: Mapping[TopicPartition, int]) -> None:
        """Input records the topic's retention deleted before the task read them (its position fell below
        the log start: it lagged, or was down, longer than the retention): lost, counted and logged; the
        source reads on from the oldest record left."""
        for tp, n in deleted.items():
            self._metrics.deleted_unread.add(tp.topic, n=n)
            log.error(
                "input records deleted by retention before the join task read them: lost",
                extra={"fields": {"task": tp.partition, "topic": tp.topic, "records": n}},
            )

    def _check_stalled(self, fetched: Positions, ends: Positions) -> None:
        behind = {
            f"{tp.topic}:{tp.partition}": ends[tp] - fetched[tp]
            for task in self.tasks.values()
            for tp in task.inputs
            if tp in ends and tp in fetched and ends[tp] > fetched[tp]
        }
        if behind:
            state = getattr(self.source, "fetch_state", None)  # the Kafka client's view, where it has one
            raise ConsumerStalled(
                f"nothing fetched for {self.settings.stall_timeout_s:g} s with records waiting: {behind}"
                + (f"; the client's partitions: {state()}" if state is not None else "")
            )
        self._last_records = time.monotonic()  # caught up: idle, not stalled

    def _check_membership(self, now: float) -> None:
        """kafka-python 3.0.12 was seen looking for a new group's coordinator in a busy loop for good
        (no partitions, so no records waiting either): out of the group for ``stall_timeout_s``, and at
        least as long as a healthy join may take (the client's ``longest_join_s``), is a stall too."""
        if self.source.joined():
            self._outside_group_since = None
            self._said_waiting = False
        elif self._outside_group_since is None:
            self._outside_group_since = now
        elif now - self._outside_group_since >= self._membership_timeout_s:
            waited = self._membership_timeout_s
            raise ConsumerStalled(f"not a member of the consumer group for {waited:g} s")
        elif not self._said_waiting and now - self._outside_group_since >= self.WAITING_NOTE_S:
            # After a broker outage this wait took about 45 s while the progress lines said only "tasks": [].
            self._said_waiting = True
            log.info(
                "waiting to join the consumer group: its rebalance waits for every member, and after a "
                "broker outage for this process's consumer from before it (or one stopped without "
                "leaving), which keeps its partitions until its session times out (session_timeout_ms)",
                extra={
                    "fields": {
                        "waited_s": round(now - self._outside_group_since, 1),
                        "rebuilt_after_s": self._membership_timeout_s,
                    }
                },
            )

    def _ends(self, *, ask: bool = False) -> Positions:
        try:
            return dict(self.source.end_positions() if ask else merge_ends(self.source) or {})
        except Exception as exc:  # noqa: BLE001 - unknown ends: hold back, never guess the order
            self._ends_unavailable(error=repr(exc))
            return {}

    def _send(self, task: JoinTask, n: int | None) -> None:
        if not task.unsent:
            return
        self._sync_journal(task)
        first, joined = task.take(n)
        self.samples_sent += self._send_message(task, first, joined)
        self._metrics.emitted(task, first, joined)
        self._last_send[task.partition] = time.monotonic()

    def _send_message(self, task: JoinTask, first: int, joined: list[Any]) -> int:
        """One samples message, or, when the topic refuses its size (large impressions times
        ``batch_samples`` over the producer's or broker's record limit), its two halves, and so on: a
        message too large would otherwise stop the stage again at every restart. A single sample still
        too large is dead-lettered (``oversized``, with the impression's bytes); the train stage then
        counts its seq as a gap. Returns the samples sent to the samples topic (not dead-lettered)."""
        batch = batch_from_joined(joined, task=task.partition, first_seq=first, incarnation=task.incarnation)
        wm = task.joiner.watermark_ms
        ts = wm if wm > 0 else max(j.event_time_ms for j in joined)
        self.retention_watch.written(self.settings.samples_topic, ts)
        try:
            self.samples.send(encode_batch(batch), partition=task.partition, timestamp_ms=ts)  # type: ignore[call-arg]
        except RecordTooLarge as exc:
            if len(joined) > 1:
                self.messages_split += 1
                half = len(joined) // 2
                sent = self._send_message(task, first, joined[:half])
                return sent + self._send_message(task, first + half, joined[half:])
            (sample,) = joined
            record = Record(
                task.inputs[0].topic, task.partition, -1, sample.impression_id.encode(), sample.payload, ts
            )
            self.dead_letters.send(record, EventError("oversized", f"its samples message: {exc}"))
            return 0
        return len(joined)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_all(self) -> None:
        """Checkpoint every task. A task's checkpoint is its whole join state (every pending impression
        with its payload: ~1.3 s for 200,000 of ~850 B here), so the next one comes after
        ``checkpoint_every_s`` or after this one's duration / ``checkpoint_max_share``, whichever is
        longer: checkpoints never take more than that share of the stage's time, and a crash replays at
        most one interval of input (the wall-clock actions, idle watermark and TTL, wait as long)."""
        t0 = time.monotonic()
        for task in list(self.tasks.values()):
            self._checkpoint(task, advance=True)
        self._last_checkpoint = time.monotonic()
        took = self._last_checkpoint - t0
        s = self.settings
        self.checkpoint_interval_s = max(s.checkpoint_every_s, took / s.checkpoint_max_share)
        self._metrics.checkpointed(took, self.checkpoint_interval_s)

    def _recreated_inputs(self, task: JoinTask, meta: Mapping[str, Any]) -> None:
        """Read an input topic deleted and created again since the task's checkpoint (its id differs)
        from its oldest record: the checkpoint's position is the old topic's. Past the new topic's end
        the client noticed it; below, the task read on from there, and the new topic's records before
        it were never read, without a word (600 of 1,000 in a walkthrough)."""
        recorded = meta.get("topic_ids")
        if not isinstance(recorded, dict):  # a checkpoint from before the ids were recorded
            return
        for tp in task.inputs:
            was, now = recorded.get(tp.topic), self._topic_ids.get(tp.topic)
            if was and now and was != now and tp in task.positions:
                log.warning(
                    "input topic created again since the task's checkpoint: read from its oldest record",
                    extra={
                        "fields": {
                            "task": task.partition,
                            "topic": tp.topic,
                            "position": task.positions[tp],
                            "topic_id_was": was,
                            "topic_id": now,
                        }
                    },
                )
                del task.positions[tp]
                self._metrics.restarted_below.add(tp.topic)

    def _checkpoint(self, task: JoinTask, *, advance: bool, final: bool = False) -> None:
        """Wall-clock actions, then in the checkpointer's order: everything sent so far made durable, the
        state (with what is emitted but unsent) published and that unsent output sent, the offsets
        committed. ``final``: the task judges nothing more (a stop, a revocation)."""
        folder = self.registry(task.partition).root
        name = uuid.uuid4().hex
        # Durable before the checkpoint that names it: the decisions a replay has still to take again.
        journal = MergeJournal.create(folder, name, task.pending_replay())
        state = task.checkpoint_state(advance=advance, final=final, journal=name)
        positions = dict(task.positions)

        def publish(_ledger_bytes: int) -> None:
            meta = {
                "fingerprint": self.settings.fingerprint,
                "config": dict(self.settings.fingerprinted),
                "task": task.partition,
                "positions": positions_to_json(positions),
                "incarnation": task.incarnation,
                "next_seq": task.next_seq,
                "watermark_ms": task.joiner.watermark_ms,
                "pending": task.joiner.pending_count,
                "topic_ids": {
                    tp.topic: self._topic_ids[tp.topic] for tp in task.inputs if tp.topic in self._topic_ids
                },
            }
            self.registry(task.partition).publish({"state": state}, meta)
            self._use_journal(task, journal)
            while task.unsent:
                self._send(task, self.settings.batch_samples)
            if advance:
                # Progress (the supervisor's give-up clock) is a task that moved on, its output sent: the
                # save that every rebuild writes when it restores or starts a task is none. Counted, a
                # samples topic that refused every message (compacted) crash-looped the stage for ever.
                self.snapshots_written += 1

        try:
            self.checkpointer.save(publish, positions, task=task.partition)
        finally:
            if self._journals.get(task.partition) is not journal:  # not published: no checkpoint names it
                journal.close()
                journal.path.unlink(missing_ok=True)

    def _use_journal(self, task: JoinTask, journal: MergeJournal) -> None:
        """The checkpoint naming ``journal`` is published: the task's decisions go there from now on
        (those taken so far are in the checkpoint). The journals of checkpoints no longer kept go."""
        old = self._journals.pop(task.partition, None)
        if old is not None:
            old.close()
        self._journals[task.partition] = journal
        previous, task.journal = task.journal, journal.name
        task.decisions.clear()
        MergeJournal.remove_others(journal.path.parent, keep=(task.journal, previous))

    def _sync_journal(self, task: JoinTask) -> None:
        """Write down the task's new merge decisions, durably, before a sample that depends on them goes."""
        journal = self._journals[task.partition]  # opened or written by _assign, before any send
        if task.decisions:
            journal.add(task.decisions)
            task.decisions.clear()
        journal.sync()

    # ------------------------------------------------------------------ lifecycle
    def close(self, *, checkpoint: bool = True) -> dict[str, int | None] | None:
        """Stop: checkpoint every task (unless the sinks cannot flush), then release everything. Returns
        each task's final checkpoint ({"task": its number}; None when none was written)."""
        saved = True
        final: dict[str, int | None] | None = None
        try:
            if checkpoint:
                try:
                    for task in list(self.tasks.values()):
                        self._checkpoint(task, advance=False, final=True)
                    self.samples.flush(self.settings.flush_timeout_s)
                    final = {str(p): self.registry(p).latest_version() for p in sorted(self.tasks)}
                    self.final_saved = final
                except Exception as exc:  # noqa: BLE001 - the previous checkpoints stay the restart point
                    saved = False
                    log.error("final checkpoint skipped", extra={"fields": {"error": repr(exc)}})
        finally:
            self._release_tasks()
            self.source.close()
            if saved and checkpoint:
                self.samples.close()
                self.dead_letters.close()
            else:
                _abort(self.samples)
                _abort(self.dead_letters.sink)
        return final

    def _release_tasks(self) -> None:
        # Leaving the group revokes every partition: the tasks are already saved (or must not be), so
        # the revocation has nothing left to checkpoint.
        self.tasks.clear()
        self._close_journals()
        self._metrics.tasks.set(0)

    def _close_journals(self, tasks: list[int] | None = None) -> None:
        for p in list(self._journals) if tasks is None else tasks:
            journal = self._journals.pop(p, None)
            if journal is not None:
                journal.close()

    def abort(self) -> None:
        """Release everything without saving (after a failure)."""
        self._release_tasks()
        for release in (
            self.source.close,
            lambda: _abort(self.samples),
            lambda: _abort(self.dead_letters.sink),
        ):
            try:
                release()
            except Exception as exc:  # noqa: BLE001 - tearing down a failed stage
                log.warning("abort: release failed", extra={"fields": {"error": repr(exc)}})


def _abort(sink: Sink | None) -> None:
    if sink is not None:
        (getattr(sink, "abort", None) or sink.close)()


@dataclass(slots=True)
class _Exported:
    """What a process exported per task, kept across its stages' rebuilds: a rebuilt stage (or a task
    taken back) restores a checkpoint and joins the input after it again, which the exported counters
    already hold."""

    # Per (task, incarnation): a task started afresh counts from 0 again, and is counted.
    counts: dict[tuple[int, str], dict[str, int]]  # the highest joiner counts exported
    next_seq: dict[tuple[int, str], int]  # the first seq not counted in joined_samples yet


_EXPORTED: weakref.WeakKeyDictionary[EngineStats, _Exported] = weakref.WeakKeyDictionary()
# counts that restart with each merger or task object (not checkpointed)
_NOT_CHECKPOINTED = frozenset({"stamped_ahead", "replays_abandoned"})


class _JoinMetrics(JoinerMetrics):
    """The joiner's metrics summed over the stage's tasks, and the number of tasks it owns."""

    def __init__(self, stats: EngineStats, *, inputs: tuple[str, ...] = ()) -> None:
        super().__init__(stats)
        self._exported = _EXPORTED.setdefault(stats, _Exported({}, {}))
        self.lag = ConsumerLag(stats.consumer_lag, owner="join")
        self.tasks = stats.join_tasks
        self.restore_fallbacks = stats.snapshot_restore_fallbacks
        self.deleted_unread = stats.join_input_deleted_unread
        self.restarted_below = stats.join_input_restarted_below
        for topic in inputs:  # at zero from the start, per input topic (increase() sees the first loss)
            self.deleted_unread.child(topic)
            self.restarted_below.child(topic)
            self._events.child(topic)  # ReloopDeadLettersRising's rate() denominator, from the first burst
        self._checkpoint_s = stats.join_checkpoint_seconds
        self._interval_s = stats.join_checkpoint_interval_seconds
        self._last: dict[int, dict[str, int]] = {}
        self._too_late_logs: dict[int, TooLateLog] = {}  # per task
        self._bound_drop_logs: dict[int, BoundDropLog] = {}

    def checkpointed(self, seconds: float, interval_s: float) -> None:
        self._checkpoint_s.set(seconds)
        self._interval_s.set(interval_s)

    def emitted(self, task: JoinTask, first: int, joined: list[Any]) -> None:
        """Samples ``first``, ``first + 1``, ... of a task sent: those this process counted already (sent
        again after a rebuild restored an earlier checkpoint) are not counted again."""
        seqs = self._exported.next_seq
        key = (task.partition, task.incarnation)
        skip = seqs.get(key, 0) - first
        if skip < len(joined):
            self.joined([j.label for j in joined[max(0, skip) :]])
            seqs[key] = first + len(joined)

    def _unexported_base(self, task: JoinTask, now: dict[str, int], last: dict[str, int]) -> dict[str, int]:
        """``last`` raised to what this process already exported of the task (counted once), and the
        task's high-water marks raised to ``now``."""
        high = self._exported.counts.setdefault((task.partition, task.incarnation), {})
        base: dict[str, int] = {}
        for name, n in now.items():
            before = last.get(name, 0)
            if name not in _NOT_CHECKPOINTED:
                before = min(n, max(before, high.get(name, 0)))
                high[name] = max(high.get(name, 0), n)
            base[name] = before
        return base

    @staticmethod
    def _counts(task: JoinTask) -> dict[str, int]:
        return {
            **task.joiner.stats.as_dict(),
            "stamped_ahead": task.merger.stamped_ahead,
            "replays_abandoned": task.replay_abandoned,
        }

    def taken(self, partition: int, task: JoinTask) -> None:
        """A task just taken over, as restored: the counts up to its checkpoint were exported by its
        previous owner; from here on they are this process's."""
        self._last[partition] = self._counts(task)

    def publish(self, stage: JoinStage) -> None:
        self.pending.set(sum(t.joiner.pending_count for t in stage.tasks.values()))
        # The slowest task's: event time up to which every window of this process is closed.
        marks = [t.joiner.watermark_ms for t in stage.tasks.values() if t.joiner.watermark_ms > 0]
        if marks:
            self.watermark_s.set(min(marks) / 1000.0)
        for p, task in stage.tasks.items():
            now = self._counts(task)
            last = self._last.get(p)
            if last is None:  # not taken through _assign (a test's stage): counts from here
                self._last[p] = now
                continue
            drops = JoinDrops((0, 0), {})
            if now != last:
                drops = self.joiner_delta(now, self._unexported_base(task, now, last))
                self._last[p] = now
            if p not in self._too_late_logs:
                self._too_late_logs[p] = TooLateLog(log)
                self._bound_drop_logs[p] = BoundDropLog(log)
            self._too_late_logs[p](drops.too_late, task.joiner.watermark_ms, task=p)
            self._bound_drop_logs[p](drops.at_bounds, task=p, pending=task.joiner.pending_count)
        for p in set(self._last) - set(stage.tasks):
            del self._last[p]
            self._too_late_logs.pop(p, None)
            self._bound_drop_logs.pop(p, None)
        self.dead_letters(stage.dead_letters.counts)
