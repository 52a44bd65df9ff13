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
it had sent. Restored after a crash, a task emits the very samples with the very numbers it emitted
before, and the train stage drops the ones it already trained by ``(task, seq)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from reloop.engine.checkpoint.blobs import loadable, saveable
from reloop.engine.checkpoint.registry import check_state_format
from reloop.engine.events.schema import Click
from reloop.engine.join.joiner import Joined, Joiner, JoinerConfig
from reloop.engine.runtime.intake import DoorClock, EventIntake
from reloop.engine.runtime.merge import DEFAULT_LOOKAHEAD, RecordMerger
from reloop.engine.streams import (
    Positions,
    Record,
    TopicPartition,
    positions_from_json,
    positions_to_json,
    record_offset,
    record_partition,
)

STATE_FORMAT = 1


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
        self.merger.add(records)

    def process(
        self, fetched: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int] | None
    ) -> int:
        """Release what the merge can order exactly and join it; returns the records processed.
        ``fetched``: the consumer's next offset per input partition; ``ends``: the log end offsets
        (``{}`` when unknown: then nothing is released past a partition with nothing buffered)."""
        released = self.merger.release(fetched, ends)
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
    def checkpoint_state(self, *, advance: bool, final: bool = False) -> dict[str, Any]:
        """The state to save now. ``advance``: first let wall-clock time act on the joiner (idle
        watermark, TTL); what that emits is in the returned state, so it is sent after the save. The
        door clock takes the wall clock's time (never going back), saved with the rest. ``final``: the
        task judges nothing after this save (a stop, a revocation), which lets the next owner move the
        door clock on (``restamp_door``)."""
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
            "final": final,
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
        self.joiner = joiner
        self.positions = positions
        self.incarnation = incarnation
        self.sent = sent
        self.unsent = unsent
        self.records_processed = records_processed
        self.door = door
        self.restored_final = final
        self.merger = self._merger(self.merger.idle_ms, self.merger.lookahead)
