from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.files.datasets import DatasetError, ImpressionLog

RECORDS = [
    {"timestamp": 2000, "impression_id": "i2", "user_id": "u1", "item_id": "a", "price": 1.5,
     "tags": ["x", "y"], "click": 1, "served_prediction": 0.25, "model_version": 3, "click_time": 2500},
    {"timestamp": 1000, "impression_id": "i1", "user_id": "u2", "item_id": "b", "price": None,
     "tags": [], "click": 0, "served_prediction": None, "model_version": None, "click_time": None},
    {"timestamp": 2000, "impression_id": "i3", "user_id": "u1", "item_id": "c", "price": 3.0,
     "tags": ["z"], "click": 0, "served_prediction": 0.5, "model_version": 3, "click_time": None},
]  # fmt: skip


def _write_csv(path: Path) -> Path:
    cols = list(RECORDS[0])
    lines = [",".join(cols)]
    for r in RECORDS:
        cells = ["|".join(r[c]) if c == "tags" else ("" if r[c] is None else str(r[c])) for c in cols]
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_parquet(path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    return path


@pytest.fixture(params=["csv", "parquet"])
def log(request: pytest.FixtureRequest, tmp_path: Path) -> ImpressionLog:
    if request.param == "csv":
        return ImpressionLog(_write_csv(tmp_path / "log.csv"), numeric=["price"], multi=["tags"])
    return ImpressionLog(_write_parquet(tmp_path / "log.parquet"))


def test_rows_sorted_with_logged_predictions_kept(log: ImpressionLog) -> None:
    rows = list(log.rows())
    assert [r.row_id for r in rows] == ["i1", "i2", "i3"]
    i1, i2, _ = rows
    assert i1.served_prediction is None and i1.model_version is None and i1.label == 0
    assert i2.served_prediction == 0.25 and i2.model_version == 3 and i2.click_time_ms == 2500
    assert i2.features == {"user_id": "u1", "item_id": "a", "price": 1.5, "tags": ["x", "y"]}
    assert "price" not in i1.features


def test_field_kinds(log: ImpressionLog) -> None:
    kinds = {f.name: f.kind for f in log.fields}
    assert kinds == {"user_id": "categorical", "item_id": "categorical", "price": "numeric", "tags": "multi"}


def test_seconds_unit_and_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("ts,click,f\n1.5,true,a\n")
    row = next(ImpressionLog(path, time_column="ts", time_unit="s").rows())
    assert row.event_time_ms == 1500 and row.label == 1 and row.features == {"f": "a"}
    with pytest.raises(DatasetError, match="no 'timestamp' column"):
        list(ImpressionLog(path).rows())


def test_bad_label_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,click\n1,yes\n")
    with pytest.raises(DatasetError, match="row 1: column 'click'"):
        list(ImpressionLog(path).rows())
