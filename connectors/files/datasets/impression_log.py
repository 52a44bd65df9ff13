"""A generic impression log in CSV or Parquet: one row per impression, with its click outcome.

Required columns: a time column (``timestamp`` by default: a number in ``time_unit`` "ms" or "s", or an
ISO-8601 time such as ``2024-05-01T12:00:00Z``; one without an offset is taken as UTC) and a label: the
column ``label_column`` (``click``: 0/1 or true/false) or a comparison on a numeric column, such as
``label_column="rating >= 4"`` (``COLUMN OP NUMBER`` with OP one of ``>= > <= < == !=``; parsed, never
evaluated; the compared column is then not a feature). Optional columns with a meaning: ``impression_id``,
``request_id``, ``user_id``, ``item_id``, ``click_time`` (like the time column), ``served_prediction`` and
``model_version`` (kept as logged, so a backtest can use the real y_last). Every other column is a
feature: numeric if listed in ``numeric`` (Parquet: also any float column), multi-valued if listed in
``multi`` (CSV: values joined by ``multi_sep``; Parquet: list columns), categorical otherwise.
``numeric`` and ``multi`` take a list of whole column names or one comma-separated string
(``"age,price"``); a name that is not a column fails, and so does the time, the label's or a META column.
``user_id`` and ``item_id`` are also features.
Rows are sorted by time, keeping file order for ties. ``name`` (reports, CSVs) defaults to the file's stem.
docs/bring-your-own-log.md has a worked example.
"""

from __future__ import annotations

import contextlib
import csv
import math
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from reloop.connectors.files.datasets._text import checked_ms, refuse_empty, require_file, utf8_errors_located
from reloop.connectors.files.datasets.base import (
    DatasetError,
    DatasetRow,
    FieldInfo,
    TimeKind,
    user_and_item_counters,
)

META = ("impression_id", "request_id", "click_time", "served_prediction", "model_version")
_TRUE = {"1", "true", "True", "TRUE", "1.0"}
_FALSE = {"0", "false", "False", "FALSE", "0.0"}  # not "": an empty cell is a missing label, not a 0
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_CONDITION = re.compile(
    r"\s*(?P<column>[^<>=!]*?)\s*(?P<op>>=|<=|==|!=|>|<)\s*"
    r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
)
_PANDAS_INDEX = re.compile(r"Unnamed: \d+")
MAX_VERSION = 2**63 - 1


@dataclass(frozen=True, slots=True)
class LabelRule:
    """``COLUMN OP NUMBER``: the label is 1 where the comparison holds."""

    column: str
    op: str
    number: float

    def __call__(self, value: float) -> int:
        return int(_OPS[self.op](value, self.number))

    def __str__(self) -> str:
        return f"{self.column} {self.op} {self.number:g}"


def parse_label(text: str) -> str | LabelRule:
    """A plain column name, or a ``COLUMN OP NUMBER`` comparison (never eval'd).

    >>> parse_label("rating >= 4")
    LabelRule(column='rating', op='>=', number=4.0)
    >>> parse_label("click")
    'click'
    """
    if not any(ch in text for ch in "<>=!"):
        if not text.strip():
            raise DatasetError("label_column is empty: name a 0/1 column or write COLUMN OP NUMBER")
        return text
    match = _CONDITION.fullmatch(text)
    if match is None or not match.group("column"):
        raise DatasetError(
            f"label_column {text!r}: expected a column name or COLUMN OP NUMBER with OP one of "
            f"{' '.join(_OPS)} (e.g. 'rating >= 4')"
        )
    return LabelRule(match.group("column"), match.group("op"), float(match.group("number")))


def _names(value: str | Sequence[str], key: str) -> tuple[str, ...]:
    """A list of whole column names; one string is split at commas (so ``numeric=a,b`` on a command line)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise DatasetError(f"{key}: column names must be strings, got {item!r}")
        if item.strip():
            out.append(item.strip())
    return tuple(out)


@contextlib.contextmanager
def _parquet_errors_located(path: Path) -> Iterator[None]:
    """pyarrow's error named no file ("Parquet magic bytes not found in footer"); every CSV error does."""
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: cannot be read as Parquet ({exc}); for a CSV file: format=csv") from None


@dataclass(frozen=True)
class ImpressionLog:
    path: Path
    format: Literal["auto", "csv", "parquet"] = "auto"
    time_column: str = "timestamp"
    time_unit: Literal["ms", "s"] = "ms"
    label_column: str = "click"
    numeric: Sequence[str] | str = ()
    multi: Sequence[str] | str = ()
    multi_sep: str = "|"
    name: str = ""
    time_kind: TimeKind = "event"

    def __post_init__(self) -> None:
        # Normalized once: a string `numeric` would otherwise match by substring (`"bucket_" in "bucket_x"`).
        object.__setattr__(self, "numeric", _names(self.numeric, "numeric"))
        object.__setattr__(self, "multi", _names(self.multi, "multi"))
        both = sorted(set(self.numeric) & set(self.multi))
        if both:
            raise DatasetError(f"{self.path}: columns {both} are listed in both numeric and multi")
        if self.time_unit not in ("ms", "s"):
            raise DatasetError(f"time_unit must be 'ms' or 's', got {self.time_unit!r}")
        if self.format not in ("auto", "csv", "parquet"):
            raise DatasetError(f"format must be auto, csv or parquet, got {self.format!r}")
        parse_label(self.label_column)  # a malformed comparison fails here, before any file is read
        if not self.name:
            object.__setattr__(self, "name", Path(self.path).stem or "impression-log")

    @property
    def label(self) -> str | LabelRule:
        return parse_label(self.label_column)

    def _fmt(self) -> str:
        if self.format != "auto":
            return self.format
        return "parquet" if Path(self.path).suffix.lower() in {".parquet", ".pq"} else "csv"

    def _records(self) -> tuple[list[str], dict[str, str], list[dict[str, Any]]]:
        """(column names, pyarrow kinds per column for Parquet, records)."""
        path = require_file(Path(self.path))
        if self._fmt() == "parquet":
            import pyarrow.parquet as pq

            with _parquet_errors_located(path):
                table = pq.read_table(path)
            kinds = _parquet_kinds(table.schema)
            return self._checked(list(table.column_names)), kinds, table.to_pylist()
        # utf-8-sig: Excel's BOM made the first column '\ufeffuser_id' (or '\ufeffimpression_id').
        with utf8_errors_located(path), path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            columns = self._checked(next(reader, []))
            records: list[dict[str, Any]] = []
            for cells in reader:
                if not cells:  # a blank line
                    continue
                if len(cells) != len(columns):  # a short row (a cut-off last line) lost its missing cells
                    raise DatasetError(
                        f"{path}: row {len(records) + 1} has {len(cells)} cells, the header "
                        f"{len(columns)} columns"
                    )
                records.append(dict(zip(columns, cells, strict=True)))
        return columns, {}, records

    def _header(self) -> tuple[list[str], dict[str, str]]:
        path = require_file(Path(self.path))
        if self._fmt() == "parquet":
            import pyarrow.parquet as pq

            with _parquet_errors_located(path):
                schema = pq.read_schema(path)
            return self._checked(list(schema.names)), _parquet_kinds(schema)
        with utf8_errors_located(path), path.open(encoding="utf-8-sig", newline="") as fh:
            return self._checked(next(csv.reader(fh), [])), {}

    def _checked(self, columns: list[str]) -> list[str]:
        """The header, refused when a column has no name, a pandas index name or a duplicate name, when
        ``numeric``/``multi``/the label/the time column name a column that is not there, and when
        ``numeric``/``multi`` name a column that is not a feature."""
        path = Path(self.path)
        if not columns:
            raise DatasetError(f"{path}: no header row (the first line must name the columns)")
        for i, c in enumerate(columns):
            if not c or not c.strip():
                raise DatasetError(
                    f"{path}: column {i + 1} of the header has no name (every column needs one; "
                    "delete the column or name it)"
                )
            if _PANDAS_INDEX.fullmatch(c):
                raise DatasetError(
                    f"{path}: column {i + 1} is named {c!r}, a pandas index written without a name "
                    "(write the file with to_csv(index=False), or drop or rename that column)"
                )
        dup = sorted({c for c in columns if columns.count(c) > 1})
        if dup:
            raise DatasetError(f"{path}: column names appear more than once in the header: {dup}")
        label = self.label
        needed = {
            "time_column": self.time_column,
            "label_column": label.column if isinstance(label, LabelRule) else label,
        }
        for key, c in needed.items():
            if c not in columns:
                raise DatasetError(f"{path}: no {c!r} column for {key} (has {columns})")
        for key in ("numeric", "multi"):
            unknown = [c for c in getattr(self, key) if c not in columns]
            if unknown:
                raise DatasetError(
                    f"{path}: {key} names {unknown}, not columns of this file (whole names; has {columns})"
                )
            other = [c for c in getattr(self, key) if c in self._not_features()]
            if other:  # the time, the label or a meta column: the option was ignored without a word
                raise DatasetError(
                    f"{path}: {key} names {other}, not a feature column (not features: "
                    f"{', '.join(self._not_features())})"
                )
        return columns

    def _not_features(self) -> tuple[str, ...]:
        """The time column, the label's column and the META columns."""
        label = self.label
        return (self.time_column, label.column if isinstance(label, LabelRule) else label, *META)

    def _feature_columns(self, columns: list[str]) -> list[str]:
        skip = self._not_features()
        return [c for c in columns if c not in skip]

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        columns, kinds = self._header()
        return tuple(FieldInfo(c, self._kind(c, kinds)) for c in self._feature_columns(columns))

    @property
    def counters(self) -> tuple[str, ...]:
        # The columns that name the user and the item, where they are categorical features: the
        # setting chosen on MovieLens's and Frappe's selection periods, without a cross (a log's
        # item attributes are its own).
        return user_and_item_counters(self.fields, "user_id", "item_id")

    def _kind(self, column: str, kinds: dict[str, str]) -> Literal["categorical", "numeric", "multi"]:
        if column in self.multi or kinds.get(column) == "multi":
            return "multi"
        if column in self.numeric or kinds.get(column) == "numeric":
            return "numeric"
        return "categorical"

    def rows(self) -> Iterator[DatasetRow]:
        return refuse_empty(self._rows(), str(self.path))

    def _rows(self) -> Iterator[DatasetRow]:
        columns, kinds, records = self._records()
        path = Path(self.path)
        label = self.label
        feature_kinds = {c: self._kind(c, kinds) for c in self._feature_columns(columns)}
        scale = 1000 if self.time_unit == "s" else 1
        parsed: list[tuple[int, int, DatasetRow]] = []
        seen: dict[str, int] = {}
        for i, rec in enumerate(records):
            where = f"{path}: row {i + 1}"
            t = _time(rec[self.time_column], scale, where, self.time_column)
            if isinstance(label, LabelRule):
                value = rec[label.column]
                if not _present(value):
                    raise DatasetError(f"{where}: column {label.column!r} is empty (label: {label})")
                y = label(_float(value, where, label.column))
            else:
                y = _label(rec[label], where, label)
            features: dict = {}
            for c, kind in feature_kinds.items():
                value = _feature(rec.get(c), kind, self.multi_sep, where, c)
                if value is not None:
                    features[c] = value
            row_id = _text(rec.get("impression_id")) or f"{path.stem}-{i + 1}"
            first = seen.setdefault(row_id, i + 1)
            if first != i + 1:  # a replay joined a click to the other row of that id, and dropped this one
                raise DatasetError(f"{where}: impression_id {row_id!r} repeats row {first}")
            click_t = rec.get("click_time")
            click_ms = _time(click_t, scale, where, "click_time") if _present(click_t) else None
            if click_ms is not None and click_ms < t:  # `reloop replay` refused it later, without the file
                raise DatasetError(
                    f"{where}: column 'click_time' ({click_t}) is before the impression's "
                    f"{self.time_column!r} ({rec[self.time_column]}): a click comes after what it clicked"
                )
            served = rec.get("served_prediction")
            version = rec.get("model_version")
            row = DatasetRow(
                row_id=row_id,
                request_id=_text(rec.get("request_id")) or row_id,
                user_id=_text(rec.get("user_id")),
                item_id=_text(rec.get("item_id")),
                event_time_ms=t,
                features=features,
                label=y,
                click_time_ms=click_ms,
                served_prediction=_prediction(served, where) if _present(served) else None,
                model_version=_version(version, where) if _present(version) else None,
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
    """A finite number: ``nan`` and ``inf`` read as floats (a NaN rating made label 0, an infinite time
    crashed the backtest with a traceback)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: column {column!r} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise DatasetError(f"{where}: column {column!r} is not a finite number: {value!r}")
    return number


def _prediction(value: Any, where: str) -> float:
    p = _float(value, where, "served_prediction")
    if not 0.0 <= p <= 1.0:  # replay dead-letters it as bad_prediction; a backtest trained ReLoop on it
        raise DatasetError(f"{where}: column 'served_prediction' is not a probability in [0, 1]: {value!r}")
    return p


def _version(value: Any, where: str) -> int:
    """A whole number in [0, 2^63 - 1]: it becomes an int64 (2^63 crashed the train stage)."""
    try:  # int() first: through a float, 2^63 - 1 became 2^63 and 20 digits were rounded
        v = int(value) if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        f = _float(value, where, "model_version")
        if f != int(f):  # 1.7 was cut to 1 without a word
            raise DatasetError(f"{where}: column 'model_version' is not a whole number: {value!r}") from None
        v = int(f)
    if not 0 <= v <= MAX_VERSION:
        raise DatasetError(f"{where}: column 'model_version' is not in [0, 2^63 - 1]: {value!r}")
    return v


def _time(value: Any, scale: int, where: str, column: str) -> int:
    """Epoch milliseconds from a number (times ``scale``), an ISO-8601 text or a Parquet timestamp."""
    if not _present(value):
        raise DatasetError(f"{where}: column {column!r} is empty")
    if isinstance(value, datetime | date):
        return _epoch_ms(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            try:
                return _epoch_ms(datetime.fromisoformat(value.strip()))
            except ValueError:
                raise DatasetError(
                    f"{where}: column {column!r} is neither a number nor an ISO-8601 time: {value!r}"
                ) from None
        return checked_ms(_float(number, where, column) * scale, where, column, value)
    return checked_ms(_float(value, where, column) * scale, where, column, value)


def _epoch_ms(value: datetime | date) -> int:
    """A time without an offset is UTC (a log's times are never the reader's local time)."""
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(round(value.timestamp() * 1000))


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
