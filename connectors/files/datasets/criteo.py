"""Criteo display-ads logs: the raw Kaggle TSV (no header) or a CSV with a ``label,I1..I13,C1..C26`` header.

Columns: label, I1..I13 (integer counts, numeric fields), C1..C26 (hashed categories). Empty = missing:
a missing value is left out of the row's features. There are no timestamps; the Kaggle train file is
in time order, so row order is the pseudo-time (``PSEUDO_TIME_ORIGIN_MS + i * step_ms``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from reloop.connectors.files.datasets._text import (
    parse_float,
    refuse_empty,
    require_file,
    utf8_errors_located,
)
from reloop.connectors.files.datasets.base import (
    PSEUDO_TIME_ORIGIN_MS,
    DatasetError,
    DatasetRow,
    FieldInfo,
    TimeKind,
)

NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = ("label", *NUMERIC, *CATEGORICAL)
FIELDS: tuple[FieldInfo, ...] = (
    *(FieldInfo(n, "numeric") for n in NUMERIC),
    *(FieldInfo(n, "categorical") for n in CATEGORICAL),
)


@dataclass(frozen=True)
class Criteo:
    """``format``: "tsv" (raw Kaggle), "csv" (with header) or "auto" (decided from the first line)."""

    path: Path
    format: Literal["auto", "tsv", "csv"] = "auto"
    step_ms: int = 1000
    name: str = "criteo"
    time_kind: TimeKind = "pseudo"

    def __post_init__(self) -> None:
        if self.format not in ("auto", "tsv", "csv"):  # anything else was read as CSV
            raise DatasetError(f"format must be auto, tsv or csv, got {self.format!r}")

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        return FIELDS

    @property
    def counters(self) -> tuple[str, ...]:
        # Criteo names no user or item (anonymous fields), so nothing is counted by default.
        return ()

    def _format(self, path: Path) -> str:
        if self.format != "auto":
            return self.format
        # -sig: Excel's BOM made a CSV look like TSV
        with utf8_errors_located(path), path.open(encoding="utf-8-sig") as fh:
            first = fh.readline()
        return "csv" if first.startswith("label,") else "tsv"

    def rows(self) -> Iterator[DatasetRow]:
        return refuse_empty(self._rows(), str(self.path))

    def _rows(self) -> Iterator[DatasetRow]:
        path = require_file(Path(self.path))
        fmt = self._format(path)
        with utf8_errors_located(path), path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter="\t" if fmt == "tsv" else ",")
            first_line = 1
            if fmt == "csv":
                header = next(reader, None)
                if header is None or tuple(h.strip() for h in header) != COLUMNS:
                    raise DatasetError(
                        f"{path}: expected header {','.join(COLUMNS[:3])},...,C26, got {header}"
                    )
                first_line = 2
            for i, parts in enumerate(reader):
                number = i + first_line
                if not parts:
                    continue
                if len(parts) != len(COLUMNS):
                    raise DatasetError(f"{path}:{number}: expected {len(COLUMNS)} columns, got {len(parts)}")
                if parts[0] not in {"0", "1"}:
                    raise DatasetError(f"{path}:{number}: label must be 0 or 1, got {parts[0]!r}")
                features: dict = {}
                for name, value in zip(NUMERIC, parts[1:14], strict=True):
                    if value:
                        features[name] = parse_float(value, path, number, name)
                for name, value in zip(CATEGORICAL, parts[14:], strict=True):
                    if value:
                        features[name] = value
                row_id = f"criteo-{number}"
                t = PSEUDO_TIME_ORIGIN_MS + i * self.step_ms
                yield DatasetRow(row_id, row_id, "", features.get("C1", ""), t, features, int(parts[0]))
