"""An append-only ledger of trained samples: proof that every sample was trained exactly once.

One JSON array per line: ``[step, sample_id, label, is_correction]``. JSON escapes every character an
id may hold (tabs, newlines, quotes, any Unicode), so the format is unambiguous for any id the event
contract accepts. The snapshot stores the ledger's length in bytes; a restart truncates the file to
that length, so lines written after the snapshot (by a run that then crashed) disappear together with
the training they describe.

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

import orjson
from reloop.engine.events.schema import LabeledSample


class Ledger:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115 - held open for the life of the run

    def append(self, step: int, samples: Iterable[LabeledSample]) -> None:
        dumps = orjson.dumps
        self._f.write(b"".join(dumps([step, s.sample_id, s.label, s.is_correction]) + b"\n" for s in samples))

    def append_columns(self, step: int, ids: list[str], labels: list[int], corrections: list[bool]) -> None:
        dumps = orjson.dumps
        self._f.write(
            b"".join(dumps([step, i, y, c]) + b"\n" for i, y, c in zip(ids, labels, corrections, strict=True))
        )

    def sync(self) -> int:
        """Make everything written so far durable; returns the length to store in a snapshot."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def truncate(self, length: int) -> None:
        """Cut the file back to ``length`` bytes (a snapshot's ``sync()``); a shorter file lost entries
        the snapshot counts, and ``truncate`` would pad it with NUL bytes: refused."""
        self._f.flush()
        size = os.fstat(self._f.fileno()).st_size
        if length > size:
            raise ValueError(
                f"ledger {self.path} has {size} bytes, the snapshot recorded {length}: entries lost"
            )
        self._f.truncate(length)
        self._f.seek(length)

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()

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
