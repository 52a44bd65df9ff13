"""Frappe (Baltrunas et al. 2015): context-aware app usage, positives only.

Two readers:
- ``FrappeRaw`` reads ``raw/frappe.csv`` and adds ``negatives`` (2 by default, at least 1) sampled
  negatives per positive row, as the NFM/AFM/BARS benchmark did: items this user never used anywhere in
  the log, with the positive row's context. The sample is seeded, so a seed gives the same stream every time.
- ``FrappeLibFM`` reads the NFM benchmark's ``*.libfm`` files (labels +1/-1, one index per field).

Frappe has NO timestamps. Both readers use file order as a pseudo-time (``time_kind = "pseudo"``): raw row
i (with its negatives, one request) is at ``PSEUDO_TIME_ORIGIN_MS + i * step_ms``. Reports must say so.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from reloop.connectors.files.datasets._text import read_lines, refuse_empty
from reloop.connectors.files.datasets.base import (
    PSEUDO_TIME_ORIGIN_MS,
    DatasetError,
    DatasetRow,
    FieldInfo,
    TimeKind,
)

CONTEXT = ("daytime", "weekday", "isweekend", "homework", "cost", "weather", "country", "city")
FIELD_NAMES = ("user", "item", *CONTEXT)
FIELDS: tuple[FieldInfo, ...] = tuple(FieldInfo(name, "categorical") for name in FIELD_NAMES)
#: A user's and an app's click rate (chosen on chunks 1-3; the apps have no attribute to cross a user with).
COUNTERS = ("user", "item")


@dataclass(frozen=True)
class FrappeRaw:
    """``path`` is ``frappe.csv`` itself or the folder holding it."""

    path: Path
    negatives: int = 2
    seed: int = 0
    step_ms: int = 1000
    name: str = "frappe"
    time_kind: TimeKind = "pseudo"

    def __post_init__(self) -> None:
        # Not 0 either: Frappe logs positives only, so without negatives every label is 1 (nothing to
        # learn, no AUC); below 0 it ran as 0.
        if isinstance(self.negatives, bool) or not isinstance(self.negatives, int) or self.negatives < 1:
            raise DatasetError(f"negatives must be an int >= 1, got {self.negatives!r}")

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        return FIELDS

    @property
    def counters(self) -> tuple[str, ...]:
        return COUNTERS

    def _file(self) -> Path:
        p = Path(self.path)
        return p / "frappe.csv" if p.is_dir() else p

    def _read(self) -> list[tuple[int, dict[str, str]]]:
        path = self._file()
        lines = read_lines(path)
        try:
            _, header = next(lines)
        except StopIteration:
            raise DatasetError(f"{path}: empty file") from None
        names = header.split("\t")
        missing = [n for n in FIELD_NAMES if n not in names]
        if missing:
            raise DatasetError(f"{path}: header lacks columns {missing} (has {names})")
        idx = [names.index(n) for n in FIELD_NAMES]
        out = []
        for number, line in lines:
            parts = line.split("\t")
            if len(parts) != len(names):
                raise DatasetError(f"{path}:{number}: expected {len(names)} columns, got {len(parts)}")
            if line.removeprefix("\ufeff").split("\t") == names:  # two files joined: it was user 'user'
                raise DatasetError(f"{path}:{number}: the header again (are two files joined here?)")
            out.append((number, {n: parts[i] for n, i in zip(FIELD_NAMES, idx, strict=True)}))
        return out

    def rows(self) -> Iterator[DatasetRow]:
        return refuse_empty(self._rows(), str(self._file()))

    def _rows(self) -> Iterator[DatasetRow]:
        raw = self._read()
        used: dict[str, set[str]] = {}
        for _, rec in raw:
            used.setdefault(rec["user"], set()).add(rec["item"])
        # Sorted so the candidate list, and hence the sample for a seed, does not depend on dict order.
        all_items = np.array(sorted({rec["item"] for _, rec in raw}, key=_natural))
        rng = np.random.default_rng(self.seed)
        for i, (number, rec) in enumerate(raw):
            t = PSEUDO_TIME_ORIGIN_MS + i * self.step_ms
            request = f"frappe-{number}"
            yield DatasetRow(f"{request}-p", request, rec["user"], rec["item"], t, dict(rec), 1)
            for k, item in enumerate(self._negatives(rng, all_items, used[rec["user"]])):
                features = dict(rec, item=item)
                yield DatasetRow(f"{request}-n{k}", request, rec["user"], item, t, features, 0)

    def _negatives(self, rng: np.random.Generator, items: np.ndarray, used: set[str]) -> list[str]:
        free = len(items) - len(used)
        if free < self.negatives:
            raise DatasetError(
                f"a user used {len(used)} of {len(items)} items: cannot sample {self.negatives}"
            )
        out: list[str] = []
        while len(out) < self.negatives:
            item = str(items[rng.integers(len(items))])
            if item not in used and item not in out:
                out.append(item)
        return out


def _natural(text: str) -> tuple[int, int, str, str]:
    """Numeric ids in numeric order, then the others; a total order, so the sort's result does not depend
    on its input's order. (It was ``(int(text), "")``: "1" and "01" tied and kept the order of a set of
    str, which changes with PYTHONHASHSEED, so a seed gave other negatives in every process; and
    ``int("²")`` raised although ``"²".isdigit()``.)"""
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0")
        return (0, len(digits), digits, text)  # numeric order without int(): no digit-count limit
    return (1, 0, text, text)


@dataclass(frozen=True)
class FrappeLibFM:
    """The NFM benchmark files; each line is ``label idx:1 ...`` with one index per field, in field order.

    Feature values are the libFM indices as strings (they are unique per field, so they work as ids).
    """

    paths: Sequence[Path]
    step_ms: int = 1000
    name: str = "frappe-libfm"
    time_kind: TimeKind = "pseudo"

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        return FIELDS

    @property
    def counters(self) -> tuple[str, ...]:
        return COUNTERS

    def rows(self) -> Iterator[DatasetRow]:
        return refuse_empty(self._rows(), ", ".join(map(str, self.paths)) or "frappe-libfm (no files)")

    def _rows(self) -> Iterator[DatasetRow]:
        i = 0
        for path in map(Path, self.paths):
            for number, line in read_lines(path):
                parts = line.split()
                if len(parts) != 1 + len(FIELD_NAMES) or parts[0] not in {"1", "-1", "+1"}:
                    raise DatasetError(
                        f"{path}:{number}: expected 'label' + {len(FIELD_NAMES)} 'idx:value' items"
                    )
                values = [p.split(":", 1)[0] for p in parts[1:]]
                features = dict(zip(FIELD_NAMES, values, strict=True))
                row_id = f"{path.stem}-{number}"
                t = PSEUDO_TIME_ORIGIN_MS + i * self.step_ms
                yield DatasetRow(row_id, row_id, values[0], values[1], t, features, int(parts[0] != "-1"))
                i += 1
