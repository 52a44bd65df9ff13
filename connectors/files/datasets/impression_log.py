"""A generic impression log in CSV or Parquet: one row per impression, with its click outcome.

Required columns: a time column (``timestamp`` by default, in ``time_unit`` "ms" or "s") and a label
column (``click``: 0/1 or true/false). Optional columns with a meaning: ``impression_id``, ``request_id``,
``user_id``, ``item_id``, ``click_time`` (same unit as the time column), ``served_prediction`` and
``model_version`` (kept as logged, so a backtest can use the real y_last). Every other column is a
feature: numeric if listed in ``numeric`` (Parquet: also any float column), multi-valued if listed in
``multi`` (CSV: values joined by ``multi_sep``; Parquet: list columns), categorical otherwise.
``user_id`` and ``item_id`` are also features. Rows are sorted by time, keeping file order for ties.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from connectors.files.datasets._text import require_file
from connectors.files.datasets.base import DatasetError, DatasetRow, FieldInfo, TimeKind

META = ("impression_id", "request_id", "click_time", "served_prediction", "model_version")
_TRUE = {"1", "true", "True", "TRUE", "1.0"}
_FALSE = {"0", "false", "False", "FALSE", "0.0", ""}


@dataclass(frozen=True)
class ImpressionLog:
    path: Path
    format: Literal["auto", "csv", "parquet"] = "auto"
    time_column: str = "timestamp"
    time_unit: Literal["ms", "s"] = "ms"
    label_column: str = "click"
    numeric: Sequence[str] = ()
    multi: Sequence[str] = ()
    multi_sep: str = "|"
    name: str = "impression-log"
    time_kind: TimeKind = "event"

    def _fmt(self) -> str:
        if self.format != "auto":
            return self.format
        return "parquet" if Path(self.path).suffix.lower() in {".parquet", ".pq"} else "csv"

    def _records(self) -> tuple[list[str], dict[str, str], list[dict[str, Any]]]:
        """(column names, pyarrow kinds per column for Parquet, records)."""
        path = require_file(Path(self.path))
        if self._fmt() == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            kinds = _parquet_kinds(table.schema)
            return list(table.column_names), kinds, table.to_pylist()
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or []), {}, list(reader)

    def _feature_columns(self, columns: list[str]) -> list[str]:
        skip = {self.time_column, self.label_column, *META}
        return [c for c in columns if c not in skip]

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        path = require_file(Path(self.path))
        kinds: dict[str, str] = {}
        if self._fmt() == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            columns = list(schema.names)
            kinds = _parquet_kinds(schema)
        else:
            with path.open(encoding="utf-8", newline="") as fh:
                columns = next(csv.reader(fh), [])
        return tuple(FieldInfo(c, self._kind(c, kinds)) for c in self._feature_columns(columns))

    def _kind(self, column: str, kinds: dict[str, str]) -> Literal["categorical", "numeric", "multi"]:
        if column in self.multi or kinds.get(column) == "multi":
            return "multi"
        if column in self.numeric or kinds.get(column) == "numeric":
            return "numeric"
        return "categorical"

    def rows(self) -> Iterator[DatasetRow]:
        columns, kinds, records = self._records()
        path = Path(self.path)
        for needed in (self.time_column, self.label_column):
            if needed not in columns:
                raise DatasetError(f"{path}: no {needed!r} column (has {columns})")
        feature_kinds = {c: self._kind(c, kinds) for c in self._feature_columns(columns)}
        scale = 1000 if self.time_unit == "s" else 1
        parsed: list[tuple[int, int, DatasetRow]] = []
        for i, rec in enumerate(records):
            where = f"{path}: row {i + 1}"
            t = _time(rec[self.time_column], scale, where, self.time_column)
            label = _label(rec[self.label_column], where, self.label_column)
            features: dict = {}
            for c, kind in feature_kinds.items():
                value = _feature(rec.get(c), kind, self.multi_sep, where, c)
                if value is not None:
                    features[c] = value
            row_id = _text(rec.get("impression_id")) or f"{path.stem}-{i + 1}"
            click_t = rec.get("click_time")
            served = rec.get("served_prediction")
            version = rec.get("model_version")
            row = DatasetRow(
                row_id=row_id,
                request_id=_text(rec.get("request_id")) or row_id,
                user_id=_text(rec.get("user_id")),
                item_id=_text(rec.get("item_id")),
                event_time_ms=t,
                features=features,
                label=label,
                click_time_ms=_time(click_t, scale, where, "click_time") if _present(click_t) else None,
                served_prediction=_float(served, where, "served_prediction") if _present(served) else None,
                model_version=int(_float(version, where, "model_version")) if _present(version) else None,
            )
            parsed.append((t, i, row))
        parsed.sort(key=lambda r: (r[0], r[1]))
        for _, _, row in parsed:
            yield row


def _present(value: Any) -> bool:
    return value is not None and value != "" and not (isinstance(value, float) and math.isnan(value))


def _text(value: Any) -> str:
    return "" if not _present(value) else str(value)


def _float(value: Any, where: str, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: column {column!r} is not a number: {value!r}") from None


def _time(value: Any, scale: int, where: str, column: str) -> int:
    if not _present(value):
        raise DatasetError(f"{where}: column {column!r} is empty")
    return int(round(_float(value, where, column) * scale))


def _label(value: Any, where: str, column: str) -> int:
    if isinstance(value, bool | int) and value in (0, 1):
        return int(value)
    text = str(value)
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise DatasetError(f"{where}: column {column!r} must be 0/1 or true/false, got {value!r}")


def _feature(value: Any, kind: str, sep: str, where: str, column: str) -> Any:
    if not _present(value):
        return None
    if kind == "numeric":
        return _float(value, where, column)
    if kind == "multi":
        if isinstance(value, list | tuple):
            return [str(v) for v in value]
        return [v for v in str(value).split(sep) if v]
    return str(value)


def _parquet_kinds(schema: Any) -> dict[str, str]:
    import pyarrow as pa

    kinds = {}
    for f in schema:
        if pa.types.is_floating(f.type):
            kinds[f.name] = "numeric"
        elif pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            kinds[f.name] = "multi"
    return kinds
