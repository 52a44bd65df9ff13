"""One join task: partition p of the impressions topic joined with partition p of the clicks topic.

Impressions and clicks are keyed by impression id, so with the same partition count on both topics an
impression and its clicks share a partition number: the join of partition p needs nothing from any
other partition, and tasks can live in different processes (engine/runtime/join_stage.py).

A task merges its two partitions by record timestamp (exact, with the log end offsets), passes each
record through the intake (decode once, limits, dead letters) and the joiner, and numbers what the
joiner emits: ``seq`` 0, 1, 2, ... for the life of the task, under the task's ``incarnation`` (the name
of that numbering, created when the task starts without a checkpoint: engine/runtime/join_stage.py). Its
state (joiner, input positions, incarnation, next seq, emitted-but-unsent samples) is plain data for a
checkpoint.

Determinism, which exactly-once downstream rests on: between two checkpoints the output is a function of
the checkpoint and the input alone. The only wall-clock actions of a joiner (the idle watermark and the
TTL, ``Joiner.advance``) are therefore taken only inside ``checkpoint_state(advance=True)``, and what
they emit is stored in that checkpoint before it is sent. The door's time bounds (``max_future_ms``,
``max_past_ms``) judge events against the task's ``door`` clock, not the wall clock: it is read from the
wall clock in ``checkpoint_state`` and stored there, and in between moves with the events let in
(engine/runtime/intake.py, ``DoorClock``); restored from the checkpoint of a stop, after which it judged
nothing, a task may first move it to the wall clock (``restamp_door``). Judged against the wall clock, a
task read again after a crash an hour later refused what it had let in (``max_past_ms``), or let in what
it had refused (a record stamped ahead of the clock), and sent other samples under the numbers of those
it had sent. The merge's releases past a complete input (at its end offset: what the broker held then)
are the other action that depends on more than the input: each is recorded (``decisions``, written by
the stage to the checkpoint's merge journal before any sample that depends on it is sent,
engine/runtime/merge_journal.py) and taken again by a restored task (``replay``). Restored after a crash,
a task emits the very samples with the very numbers it emitted before, and the train stage drops the
ones it already trained by ``(task, seq)``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from reloop.engine.checkpoint.blobs import loadable, saveable
from reloop.engine.checkpoint.registry import check_state_format
from reloop.engine.events.schema import Click
from reloop.engine.join.joiner import Joined, Joiner, JoinerConfig
from reloop.engine.runtime.intake import DoorClock, EventIntake
from reloop.engine.runtime.merge import DEFAULT_LOOKAHEAD, RecordMerger
from reloop.engine.runtime.merge_journal import MergeDecision
from reloop.engine.streams import (
    Positions,
    Record,
    TopicPartition,
    positions_from_json,
    positions_to_json,
    record_offset,
    record_partition,
)

log = logging.getLogger("reloop.join")
STATE_FORMAT = 1
REPLAY_LOST_MS = 10_000  # an input at its end short of a replayed decision this long has lost records


class JoinTask:
    def __init__(
        self,
        *,
        partition: int,
        impressions_topic: str,
        clicks_topic: str,
        joiner_config: JoinerConfig,
        intake: EventIntake,
        clock: Callable[[], int],
        merge_idle_ms: int = 2_000,
        merge_lookahead: int = DEFAULT_LOOKAHEAD,
    ) -> None:
        self.partition = partition
        self.inputs = (TopicPartition(impressions_topic, partition), TopicPartition(clicks_topic, partition))
        self.intake = intake
        self.clock = clock
        self.joiner = Joiner(joiner_config, clock=clock)
        self.merger = self._merger(merge_idle_ms, merge_lookahead)
        # The door's "now" (intake.py): the wall clock now, then at each checkpoint, moved by the input.
        self.door = DoorClock(clock())
        self.positions: Positions = {}
        # The numbering's name: "" until the stage gives a task started afresh a new one, or the one of
        # its checkpoint ("" in one written before incarnations: that numbering goes on unnamed).
        self.incarnation = ""
        self.sent = 0  # samples handed out by take(): the seq of the first unsent one
        self.unsent: list[Joined] = []  # emitted, not handed out yet: seqs sent, sent + 1, ...
        self.records_processed = 0
        self.restored_final = False  # restored from a checkpoint after which nothing was judged
        self.journal = ""  # the name of the merge journal of its checkpoint ("": none yet)
        self.decisions: list[MergeDecision] = []  # taken, not handed to the journal yet (the stage does)
        self._replay: deque[MergeDecision] = deque()  # decisions of a previous life to take again
        # fetched past the decision being replayed, per input in offset order
        self._withheld: dict[TopicPartition, deque[Record]] = {tp: deque() for tp in self.inputs}
        self.replay_abandoned = 0  # replays cut short: the input lost records the decisions saw
        self._lost_since: int | None = None
        # Restored after a crash: the input's end offsets seen first after the restore (None: not
        # restored after a crash, or past them). The previous life saw no record beyond them.
        self.horizon: dict[TopicPartition, int] | None = None

    def _merger(self, idle_ms: int, lookahead: int) -> RecordMerger:
        # impressions first among records of one timestamp (merge.py)
        return RecordMerger(
            self.inputs,
            idle_ms=idle_ms,
            clock=self.clock,
            lookahead=lookahead,
            first_topics=(self.inputs[0].topic,),
        )

    @property
    def next_seq(self) -> int:
        return self.sent + len(self.unsent)

    # ------------------------------------------------------------------ input
    def add(self, records: list[Record]) -> None:
        if self._replay:
            for r in records:
                self._withheld[TopicPartition(r.topic, r.partition)].append(r)
        else:
            self.merger.add(records)

    @property
    def replaying(self) -> bool:
        """Whether decisions of a previous life are still to be taken again."""
        return bool(self._replay)

    def replay(self, decisions: Iterable[MergeDecision]) -> None:
        """Take these decisions again (the journal of the restored checkpoint) before any of its own, and
        take no wall-clock action until past everything the previous life may have seen (``horizon``)."""
        self._replay = deque(decisions)
        self.horizon = {}

    @property
    def catching_up(self) -> bool:
        """Whether the task may still be short of what its previous life emitted: replaying its decisions,
        or not past the input's end offsets seen first after the restore (unknown yet: ``{}``). A
        checkpoint then neither advances the joiner nor moves the door clock: the previous life took
        neither there (restored after a crash and slower than before, a task checkpointed halfway through
        what its previous life had sent, and its TTL and door verdicts changed the samples sent under
        those numbers)."""
        return bool(self._replay) or self.horizon is not None

    def pending_replay(self) -> list[MergeDecision]:
        return list(self._replay)

    def process(
        self, fetched: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int] | None
    ) -> int:
        """Release what the merge can order exactly and join it; returns the records processed.
        ``fetched``: the consumer's next offset per input partition; ``ends``: the log end offsets
        (``{}`` when unknown: then nothing is released past a partition with nothing buffered)."""
        if self._replay:
            return self._take_again(fetched, ends)
        complete = self.merger.complete(fetched, ends)
        released = self.merger.release(complete=complete)
        if released and complete:
            self.decisions.append(
                MergeDecision(
                    tuple(fetched.get(tp, -1) for tp in self.inputs),
                    tuple(tp in complete for tp in self.inputs),
                )
            )
        n = self._join(released)
        if self.horizon is not None:
            self._check_horizon(fetched, ends)
        return n

    def _check_horizon(
        self, fetched: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int] | None
    ) -> None:
        """Set the horizon from the first ends known, or clear it once every record below it is released
        (fetched past it, none of it still in the merge: an end offset may be a transaction marker's, so
        the released positions alone may never reach it)."""
        if self.horizon == {}:
            if ends and all(tp in ends for tp in self.inputs):
                self.horizon = {tp: ends[tp] for tp in self.inputs}
            return
        assert self.horizon is not None
        if all(
            fetched.get(tp, -1) >= end and self.merger.first_offset(tp, default=end) >= end
            for tp, end in self.horizon.items()
        ):
            self.horizon = None

    def _take_again(
        self, fetched: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int] | None
    ) -> int:
        """Replay: at each decision's positions, what the merge held then, released as it was."""
        n = 0
        while self._replay:
            decision = self._replay[0]
            short = [
                (tp, pos)
                for tp, pos in zip(self.inputs, decision.positions, strict=True)
                if fetched.get(tp, -1) < pos
            ]
            if short:
                if not self._input_lost(short, fetched, ends):
                    return n  # the records that decision saw are not all fetched yet
                self.replay_abandoned += 1
                log.error(
                    "merge journal replay given up: an input sits at its end short of a decision's position "
                    "(the broker lost records?); the task decides afresh from here",
                    extra={
                        "fields": {
                            "task": self.partition,
                            "decision": list(decision.positions),
                            "fetched": [fetched.get(tp, -1) for tp in self.inputs],
                            "decisions_left": len(self._replay),
                        }
                    },
                )
                self._replay.clear()
                break
            self._feed(decision.positions)
            complete = [tp for tp, c in zip(self.inputs, decision.complete, strict=True) if c]
            n += self._join(self.merger.release(complete=complete))
            self._replay.popleft()
        self._feed(None)  # replayed: what was fetched past it is merged by the task's own decisions
        return n

    def _input_lost(
        self,
        short: list[tuple[TopicPartition, int]],
        fetched: Mapping[TopicPartition, int],
        ends: Mapping[TopicPartition, int] | None,
    ) -> bool:
        """Whether an input is at its log's end, short of a decision's position, for ``REPLAY_LOST_MS``:
        the broker lost records the decision saw (an unclean leader election, a recreated topic), and
        waiting for them would never end. (Not at once: a new leader may report a high watermark
        behind the old one's for a moment.)"""
        if not ends or not any(tp in ends and fetched.get(tp, -1) >= ends[tp] for tp, _ in short):
            self._lost_since = None
            return False
        now = self.clock()
        if self._lost_since is None:
            self._lost_since = now
        return now - self._lost_since >= REPLAY_LOST_MS

    def _feed(self, positions: tuple[int, ...] | None) -> None:
        """Hand the merge the withheld records below ``positions`` (None: all of them)."""
        for i, tp in enumerate(self.inputs):
            held = self._withheld[tp]
            if positions is None:
                given = list(held)
                held.clear()
            else:
                given = []
                while held and held[0].offset < positions[i]:
                    given.append(held.popleft())
            if given:
                self.merger.add(given)

    def _join(self, released: list[Record]) -> int:
        if not released:
            return 0
        joiner = self.joiner
        out = self.unsent
        for r, ev in self.intake.events(released, self.door):
            if ev is not None:
                if type(ev) is Click:
                    out += joiner.on_click(ev.impression_id, ev.event_time_ms)
                else:
                    out += joiner.on_impression(ev.impression_id, ev.event_time_ms, r.value)
        # Each partition's next offset: its last released record's + 1 (a dict of pairs keeps the last).
        last = dict(zip(map(record_partition, released), map(record_offset, released), strict=True))
        for (topic, partition), offset in last.items():
            self.positions[TopicPartition(topic, partition)] = offset + 1
        self.records_processed += len(released)
        return len(released)

    # ------------------------------------------------------------------ output
    def take(self, max_samples: int | None = None) -> tuple[int, list[Joined]]:
        """(first seq, samples) of up to ``max_samples`` emitted samples not handed out yet, in order."""
        n = len(self.unsent) if max_samples is None else min(max_samples, len(self.unsent))
        first = self.sent
        taken, self.unsent = self.unsent[:n], self.unsent[n:]
        self.sent += n
        return first, taken

    # ------------------------------------------------------------------ checkpoint
    def checkpoint_state(self, *, advance: bool, final: bool = False, journal: str = "") -> dict[str, Any]:
        """The state to save now. ``advance``: first let wall-clock time act on the joiner (idle
        watermark, TTL); what that emits is in the returned state, so it is sent after the save. The
        door clock takes the wall clock's time (never going back), saved with the rest. Neither while the
        task is ``catching_up``: the previous life took neither there, and its samples after it are to be
        emitted again as they were. ``final``: the task judges nothing after this save (a stop, a
        revocation), which lets the next owner move the door clock on (``restamp_door``); not kept while
        catching up. ``journal``:
        the name of the merge journal that goes with this checkpoint (the stage writes it)."""
        if not self.catching_up:
            if advance:
                self.unsent += self.joiner.advance()
            self.door.now_ms = max(self.door.now_ms, self.clock())
        return {
            "format": STATE_FORMAT,
            "partition": self.partition,
            "joiner": saveable(self.joiner.state_dict()),  # its columns as tensors (blobs.py)
            "positions": positions_to_json(self.positions),
            "incarnation": self.incarnation,
            "sent": self.sent,
            "unsent": [
                [j.impression_id, j.event_time_ms, j.payload, j.label, j.is_correction] for j in self.unsent
            ],
            "records_processed": self.records_processed,
            "door_ms": self.door.now_ms,
            # Not while catching up: the previous life sent samples past this point, which a next owner
            # must emit again as they were (no door move, no wall-clock action first).
            "final": final and not self.catching_up,
            "journal": journal,
        }

    def restamp_door(self) -> int:
        """After a restore from a final checkpoint (a stop or a revocation: the task judged nothing after
        it), move the door clock to the wall clock when it lags by more than half of ``max_future_ms``;
        the lag in ms (0: not moved). Left where the stop saved it, a door clock judged the first
        records after a stop and a pause of the producers longer than ``max_future_ms`` (maintenance of
        the whole pipeline) as stamped too far ahead and dead-lettered them until the task's next
        checkpoint. After a crash it stays: the samples the task sent after its checkpoint were judged
        by it, and must be judged the same again. The caller saves a checkpoint before the task judges
        anything, so a crash after this resumes from the moved clock, not from this decision again."""
        ahead = self.intake.limits.max_future_ms
        lag = self.clock() - self.door.now_ms
        if not self.restored_final or ahead is None or lag <= ahead // 2:
            return 0
        self.door.now_ms += lag
        return lag

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take ``checkpoint_state()``'s state: all of it or, raising, none of it (the stage then tries
        the task's checkpoint before). A format newer than ``STATE_FORMAT`` raises ``NewerFormat``."""
        check_state_format(state, STATE_FORMAT, "checkpoint state", prefix=f"join task {self.partition}: ")
        if int(state["partition"]) != self.partition:
            raise ValueError(
                f"join task {self.partition}: the checkpoint state is task {state['partition']}'s"
            )
        joiner = Joiner(self.joiner.config, self.clock)
        joiner.load_state_dict(loadable(state["joiner"]))
        positions = positions_from_json(state["positions"])
        incarnation = str(state.get("incarnation", ""))
        sent = int(state["sent"])
        unsent = [Joined(k, int(t), p, int(y), bool(c)) for k, t, p, y, c in state["unsent"]]
        records_processed = int(state["records_processed"])
        # A checkpoint from before the door clock: the wall clock now (as the door judged then), until
        # the task's next checkpoint.
        door = DoorClock(int(state.get("door_ms", self.clock())))
        final = bool(state.get("final", False))
        journal = str(state.get("journal", ""))  # "" in one written before merge journals
        self.joiner = joiner
        self.positions = positions
        self.incarnation = incarnation
        self.sent = sent
        self.unsent = unsent
        self.records_processed = records_processed
        self.door = door
        self.restored_final = final
        self.journal = journal
        self.decisions = []
        self._replay.clear()
        for held in self._withheld.values():
            held.clear()
        self.horizon = None
        self.merger = self._merger(self.merger.idle_ms, self.merger.lookahead)
