"""Avazu mobile-ads CTR logs (CSV with header ``id,click,hour,...``).

``hour`` (YYMMDDHH, UTC) is the time: rows are sorted by hour, keeping file order within an hour, and an
impression's time is the start of its hour. Every other column except ``id`` and ``click`` is a
categorical field; ``hour_of_day`` and ``weekday`` are derived from ``hour``. Every row has the header's
number of cells and its own ``id``.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from reloop.connectors.files.datasets._text import refuse_empty, require_file, utf8_errors_located
from reloop.connectors.files.datasets.base import DatasetError, DatasetRow, FieldInfo, TimeKind

COLUMNS = (
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
FIELDS: tuple[FieldInfo, ...] = tuple(
    FieldInfo(n, "categorical") for n in (*COLUMNS, "hour_of_day", "weekday")
)


def hour_to_ms(text: str) -> int:
    """``14102100`` -> 2014-10-21 00:00 UTC in ms."""
    try:  # strptime alone said "unconverted data remains: 4" for an hour 24
        if len(text) != 8 or not text.isdigit():
            raise ValueError("not 8 digits")
        return int(datetime.strptime(text, "%y%m%d%H").replace(tzinfo=UTC).timestamp() * 1000)
    except ValueError as exc:
        raise ValueError(f"hour must be YYMMDDHH (a date, then an hour 00-23), got {text!r}: {exc}") from None


@dataclass(frozen=True)
class Avazu:
    path: Path
    name: str = "avazu"
    time_kind: TimeKind = "event"

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        return FIELDS

    @property
    def counters(self) -> tuple[str, ...]:
        # Avazu names no user (device ids and IPs only stand in for one), so nothing is counted by
        # default; none was chosen.
        return ()

    def rows(self) -> Iterator[DatasetRow]:
        return refuse_empty(self._rows(), str(self.path))

    def _rows(self) -> Iterator[DatasetRow]:
        path = require_file(Path(self.path))
        parsed: list[tuple[int, int, DatasetRow]] = []  # (time, line, row): line keeps file order in an hour
        # Ids seen, as the row_id strings the rows hold anyway: the set costs its hash table alone,
        # some 30 bytes an id (1 to 2 GB for Avazu's 40M rows; the rows themselves take far more).
        seen: set[str] = set()
        # utf-8-sig: Excel's BOM made the first column '\ufeffid' ("header lacks columns ['id']").
        with utf8_errors_located(path), path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            missing = [c for c in ("id", "click", "hour", *COLUMNS) if c not in header]
            if missing:
                raise DatasetError(f"{path}: header lacks columns {missing}")
            for cells in reader:
                number = reader.line_num
                if not cells:  # a blank line
                    continue
                if len(cells) != len(header):  # a cut-off last line kept a cut-off device_id
                    raise DatasetError(f"{path}:{number}: expected {len(header)} columns, got {len(cells)}")
                rec = dict(zip(header, cells, strict=True))
                try:
                    t = hour_to_ms(rec["hour"])
                except ValueError as exc:
                    raise DatasetError(f"{path}:{number}: {exc}") from None
                if rec["click"] not in {"0", "1"}:
                    raise DatasetError(f"{path}:{number}: click must be 0 or 1, got {rec['click']!r}")
                features: dict = {c: rec[c] for c in COLUMNS if rec[c]}
                when = datetime.fromtimestamp(t / 1000, UTC)
                features["hour_of_day"] = str(when.hour)
                features["weekday"] = str(when.weekday())
                row_id = f"avazu-{rec['id']}"
                if row_id in seen:  # a replay's joiner dropped the repeat as a duplicate impression
                    first = next(n for _, n, r in parsed if r.row_id == row_id)
                    raise DatasetError(f"{path}:{number}: id {rec['id']!r} repeats line {first}")
                seen.add(row_id)
                # a99f214a is the placeholder device_id and 85f751fd the empty site_id of app traffic
                # (known from the competition data): fall back to device_ip / app_id for user / item.
                user = rec["device_id"] if rec["device_id"] != "a99f214a" else rec["device_ip"]
                item = rec["app_id"] if rec["site_id"] == "85f751fd" else rec["site_id"]
                row = DatasetRow(row_id, row_id, user, item, t, features, int(rec["click"]))
                parsed.append((t, number, row))
        parsed.sort(key=lambda r: (r[0], r[1]))
        for _, _, row in parsed:
            yield row
