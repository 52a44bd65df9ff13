"""An append-only ledger of trained samples: proof that every sample was trained exactly once.

One JSON array per line: ``[step, sample_id, label, is_correction]``. JSON escapes every character an
id may hold (tabs, newlines, quotes, any Unicode), so the format is unambiguous for any id the event
contract accepts. The snapshot stores the ledger's length in bytes; a restart truncates the file to
that length, so lines written after the snapshot (by a run that then crashed) disappear together with
the training they describe.

A write that fails (a full disk, a read-only folder) raises ``OSError`` naming the file, and the bytes
of it that did land are cut off again, so the file holds whole lines only. From then on the ledger
refuses every append and ``sync`` until a restore truncates it: the model trained what the ledger
failed to record, so no snapshot may vouch for this ledger's length. A failed ``sync`` (fsync)
is as final: Linux reports an fsync error once and may have dropped the pages it could not write, so a
second fsync that succeeds proves nothing.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "ledger.jsonl"
>>> from reloop.engine.events.schema import LabeledSample
>>> ledger = Ledger(path)
>>> ledger.append(1, [LabeledSample("a\\tb\\nc", {}, 1, 0.5, 0, 0)])
>>> ledger.close()
>>> Ledger.read(path)
[(1, 'a\\tb\\nc', 1, False)]
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import orjson
from reloop.engine.appending import append_whole
from reloop.engine.events.schema import LabeledSample


class Ledger:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: each append is written at once, in one write when the OS takes it whole, so a failed
        # one is known to the byte (a buffered file dropped the rest of a large write it failed midway and
        # glued the next line onto the torn one).
        self._f = open(self.path, "ab", buffering=0)  # noqa: SIM115 - held open for the life of the run
        self._length = os.fstat(self._f.fileno()).st_size  # whole lines written so far
        self._failed: OSError | None = None  # a write or sync that failed: the ledger takes nothing more

    def append(self, step: int, samples: Iterable[LabeledSample]) -> None:
        dumps = orjson.dumps
        self._write(b"".join(dumps([step, s.sample_id, s.label, s.is_correction]) + b"\n" for s in samples))

    def append_columns(self, step: int, ids: list[str], labels: list[int], corrections: list[bool]) -> None:
        dumps = orjson.dumps
        self._write(
            b"".join(dumps([step, i, y, c]) + b"\n" for i, y, c in zip(ids, labels, corrections, strict=True))
        )

    def sync(self) -> int:
        """Make everything written so far durable; returns the length to store in a snapshot."""
        self._refuse_if_failed()
        try:
            os.fsync(self._f.fileno())
        except OSError as exc:
            self._fail(exc, "fsync")
        return self._length

    def truncate(self, length: int) -> None:
        """Cut the file back to ``length`` bytes (a snapshot's ``sync()``); a shorter file lost entries
        the snapshot counts, and ``truncate`` would pad it with NUL bytes: refused. A ledger that failed
        a write or sync takes appends again afterwards (a restore: the training it missed is undone)."""
        size = os.fstat(self._f.fileno()).st_size
        if length > size:
            raise ValueError(
                f"ledger {self.path} has {size} bytes, the snapshot recorded {length}: entries lost"
            )
        self._f.truncate(length)
        self._length = length
        self._failed = None

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    # ------------------------------------------------------------------ internals
    def _write(self, data: bytes) -> None:
        self._refuse_if_failed()
        try:
            self._length = append_whole(self._f, data, self._length)
        except OSError as exc:
            self._fail(exc, "append")

    def _fail(self, exc: OSError, what: str) -> NoReturn:
        self._failed = exc
        # The path in the message itself: a log of ``repr(exc)`` drops an OSError's filename.
        raise OSError(exc.errno, f"ledger {what} failed: {exc.strerror or exc}: {self.path}") from exc

    def _refuse_if_failed(self) -> None:
        if self._failed is not None:
            exc = self._failed
            raise OSError(
                exc.errno,
                f"ledger {self.path} takes nothing more until a restore truncates it: a write or fsync "
                f"failed ({exc.strerror or exc})",
            )

    @staticmethod
    def read_ranks(path: str | os.PathLike[str]) -> list[tuple[int, str, int, bool]]:
        """The entries of ``path`` and of every data-parallel rank's file next to it."""
        base = Path(path)
        files = [base] + sorted(base.parent.glob(base.name + ".rank*"))
        return [entry for f in files if f.exists() for entry in Ledger.read(f)]

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[tuple[int, str, int, bool]]:
        """The entries of ``path``; a last line without its newline is a write a crash tore (never an
        entry: the next restart truncates it) and is left out."""
        data = Path(path).read_bytes()
        out = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            step, sample_id, label, corr = orjson.loads(line)
            out.append((int(step), sample_id, int(label), bool(corr)))
        return out


def rank_ledger_path(path: str | os.PathLike[str], rank: int) -> Path:
    """Rank 0 writes the configured file, rank r > 0 the file next to it with ``.rank<r>``."""
    return Path(path) if rank == 0 else Path(f"{path}.rank{rank}")
