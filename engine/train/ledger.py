"""An append-only ledger of trained samples: proof that every sample was trained exactly once.

One line per trained sample: ``step<TAB>sample_id<TAB>label<TAB>is_correction``. The snapshot stores the
ledger's length in bytes; a restart truncates the file to that length, so lines written after the
snapshot (by a run that then crashed) disappear together with the training they describe.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from engine.events.schema import LabeledSample


class Ledger:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115 - held open for the life of the run

    def append(self, step: int, samples: Iterable[LabeledSample]) -> None:
        lines = [f"{step}\t{s.sample_id}\t{s.label}\t{int(s.is_correction)}\n" for s in samples]
        self._f.write("".join(lines).encode())

    def sync(self) -> int:
        """Make everything written so far durable; returns the length to store in a snapshot."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def truncate(self, length: int) -> None:
        self._f.flush()
        self._f.truncate(length)
        self._f.seek(length)

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[tuple[int, str, int, bool]]:
        out = []
        for line in Path(path).read_text().splitlines():
            step, sample_id, label, corr = line.split("\t")
            out.append((int(step), sample_id, int(label), corr == "1"))
        return out
