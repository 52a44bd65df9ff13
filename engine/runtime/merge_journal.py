"""A join task's merge decisions since its checkpoint, on disk: what makes a replay after a crash exact.

The merge (merge.py) lets one input's records past the other's only while that other input is complete
(at its end offset on the broker). Which records that lets through depends on what the broker held at
that moment, not on the input alone: with the clicks topic written ahead of the impressions topic (a
lagging producer), a task merged the clicks as soon as the impressions partition was at its end; resumed
from its checkpoint after a crash, it found both topics complete and merged them in timestamp order, so
the same ``(incarnation, seq)`` named other samples, and the train stage dropped samples it had never
trained and trained others twice.

So a task writes each such decision down before it sends any sample that depends on it: the consumer's
position in each of its inputs at that release (which records the merge held: every one below it not
released before) and which inputs were complete. A task resumed from its checkpoint takes its decisions
again (``JoinTask.replay``): it releases at each recorded position with the recorded complete inputs, a
function of the input alone, and emits the very samples under the very seqs again. A decision written
but followed by no send is replayed too: harmless, it is one the task could have taken.

One file per checkpoint, ``merge-<name>.log`` in the task's checkpoint folder (the name is in the
checkpoint's state); one JSON array per line, ``[position, ..., complete, ...]`` for the task's inputs in
order. A last line without its newline is a write a crash tore (nothing was sent after it) and is cut
off. ``sync`` writes and fsyncs what was added, before each send: a decision lost with the page cache
(a power loss) would leave samples on the topic that a replay does not reproduce.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> j = MergeJournal.create(folder, "a1", [MergeDecision((5, 7), (False, True))])
>>> j.add([MergeDecision((9, 7), (True, True))]); j.sync(); j.close()
>>> [d.positions for d in MergeJournal.open(folder, "a1")[1]]
[(5, 7), (9, 7)]
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson
from reloop.engine.appending import append_whole

_NAME = re.compile(r"[0-9a-f]{1,64}")


@dataclass(frozen=True, slots=True)
class MergeDecision:
    """One release that took an input as complete: per input (impressions, clicks), the consumer's next
    offset then and whether it was complete."""

    positions: tuple[int, ...]
    complete: tuple[bool, ...]

    def line(self) -> bytes:
        return orjson.dumps([*self.positions, *self.complete]) + b"\n"

    @classmethod
    def parse(cls, line: bytes, inputs: int) -> MergeDecision:
        values = orjson.loads(line)
        if (
            not isinstance(values, list)
            or len(values) != 2 * inputs
            or not all(type(v) is int for v in values[:inputs])
            or not all(type(v) is bool for v in values[inputs:])
        ):
            raise ValueError(f"not a merge decision: {line[:200]!r}")
        return cls(tuple(values[:inputs]), tuple(values[inputs:]))


class MergeJournal:
    """The open journal a task adds its decisions to (``add``), written and fsynced by ``sync``."""

    def __init__(self, name: str, path: Path, f: BinaryIO, size: int) -> None:
        self.name = name
        self.path = path
        self._f = f
        self._size = size
        self._pending: list[bytes] = []

    @staticmethod
    def path_of(folder: Path, name: str) -> Path:
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad merge journal name {name!r}")
        return folder / f"merge-{name}.log"

    @classmethod
    def create(cls, folder: Path, name: str, decisions: Iterable[MergeDecision] = ()) -> MergeJournal:
        """A new journal holding ``decisions`` (a replay not finished yet, carried past a checkpoint),
        durable when this returns: the checkpoint naming it is written next."""
        path = cls.path_of(folder, name)
        folder.mkdir(parents=True, exist_ok=True)
        f = open(path, "wb", buffering=0)  # noqa: SIM115 - held open until the next checkpoint
        journal = cls(name, path, f, 0)
        journal.add(decisions)
        journal.sync()
        # The file's name too: after a power loss a checkpoint naming a journal that is not there would
        # take no decision again.
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return journal

    @classmethod
    def open(cls, folder: Path, name: str, inputs: int = 2) -> tuple[MergeJournal, list[MergeDecision]]:
        """The journal of a restored checkpoint, opened to add to, and the decisions it holds (none when
        the file is missing: the task crashed before its first decision, or the folder was copied
        without it). A torn last line is cut off; a line that is not a decision raises ``ValueError``."""
        path = cls.path_of(folder, name)
        data = path.read_bytes() if path.exists() else b""
        whole = data[: data.rfind(b"\n") + 1]
        decisions = [MergeDecision.parse(line, inputs) for line in whole.splitlines()]
        f = open(path, "ab", buffering=0)  # noqa: SIM115 - held open until the next checkpoint
        if len(whole) < len(data):
            f.truncate(len(whole))
        return cls(name, path, f, len(whole)), decisions

    def add(self, decisions: Iterable[MergeDecision]) -> None:
        self._pending.extend(d.line() for d in decisions)

    def sync(self) -> None:
        """Write and fsync what was added since the last sync (nothing to do when nothing was)."""
        if not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        try:
            self._size = append_whole(self._f, data, self._size)
            os.fsync(self._f.fileno())
        except OSError as exc:  # the stage stops; its successor replays what is in the file
            raise OSError(
                exc.errno, f"merge journal write failed: {exc.strerror or exc}: {self.path}"
            ) from exc

    def close(self) -> None:
        """Close without writing what was added since the last sync (a checkpoint holds it now, or no
        sample depends on it)."""
        self._pending = []
        if not self._f.closed:
            self._f.close()

    @staticmethod
    def remove_others(folder: Path, keep: Iterable[str]) -> None:
        """Delete the journals of checkpoints no longer kept (those named in ``keep`` stay)."""
        names = {f"merge-{n}.log" for n in keep}
        for path in folder.glob("merge-*.log"):
            if path.name not in names:
                path.unlink(missing_ok=True)
