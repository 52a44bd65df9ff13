from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from reloop.connectors.files.datasets import DatasetError, ImpressionLog

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


@pytest.mark.parametrize(
    ("header", "column"),
    [("timestamp,,click", "column 2 of the header has no name"), (",timestamp,click", "column 1 of the"),
     ("timestamp, ,click", "column 2 of the header"), ("Unnamed: 0,timestamp,click", "column 1 is named")],
)  # fmt: skip
def test_unnamed_header_column_names_the_file_and_column(tmp_path: Path, header: str, column: str) -> None:
    path = tmp_path / "nameless.csv"
    path.write_text(f"{header}\n7,1,0\n")
    log = ImpressionLog(path)
    for read in (lambda: log.fields, lambda: list(log.rows())):
        with pytest.raises(DatasetError, match=rf"nameless\.csv: {column}"):
            read()


def test_duplicate_header_and_extra_cells_are_refused(tmp_path: Path) -> None:
    dup = tmp_path / "dup.csv"
    dup.write_text("timestamp,click,f,f\n1,0,a,b\n")
    with pytest.raises(DatasetError, match=r"dup\.csv: .*more than once.*\['f'\]"):
        list(ImpressionLog(dup).rows())
    extra = tmp_path / "extra.csv"
    extra.write_text("timestamp,click,f\n1,0,a\n2,1,b,c\n")
    with pytest.raises(DatasetError, match=r"extra\.csv: row 2 has 4 cells, the header 3"):
        list(ImpressionLog(extra).rows())


def test_iso_8601_times(tmp_path: Path) -> None:
    path = tmp_path / "iso.csv"
    path.write_text(
        "timestamp,click,click_time\n"
        "2024-05-01T12:00:00Z,1,2024-05-01T12:00:05.250Z\n"
        "2024-05-01T13:00:00+02:00,0,\n"  # 11:00 UTC: sorts first
        "2024-05-01 12:30:00,0,\n"  # no offset: UTC
        "1714566600000,0,\n"  # epoch ms still works in the same column (12:30 UTC)
    )
    rows = list(ImpressionLog(path).rows())
    base = 1714564800000  # 2024-05-01T12:00:00Z
    assert [r.event_time_ms for r in rows] == [base - 3_600_000, base, base + 1_800_000, base + 1_800_000]
    assert rows[1].click_time_ms == base + 5250 and rows[1].label == 1
    bad = tmp_path / "bad_time.csv"
    bad.write_text("timestamp,click\n2024-13-45T00:00:00,0\n")
    with pytest.raises(DatasetError, match=r"row 1: column 'timestamp' is neither a number nor an ISO-8601"):
        list(ImpressionLog(bad).rows())


def test_parquet_timestamp_column(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    path = tmp_path / "ts.parquet"
    t = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    pq.write_table(pa.Table.from_pylist([{"timestamp": t, "click": 1, "f": "a"}]), path)
    (row,) = ImpressionLog(path).rows()
    assert row.event_time_ms == 1714564800000 and row.features == {"f": "a"}


def test_label_from_a_comparison(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("timestamp,rating,item_id\n1,3,a\n2,4,b\n3,4.5,c\n4,1,d\n")
    log = ImpressionLog(path, label_column="rating >= 4")
    assert [r.label for r in log.rows()] == [0, 1, 1, 0]
    assert [f.name for f in log.fields] == ["item_id"]  # the compared column would give the label away
    assert [r.label for r in ImpressionLog(path, label_column="rating<3").rows()] == [0, 0, 0, 1]
    assert [r.label for r in ImpressionLog(path, label_column=" rating != -1e0 ").rows()] == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "text", ["rating >> 4", "rating >= 4 and item_id == 1", "rating >= high", ">= 4", "__import__('os') <"]
)
def test_label_comparison_outside_the_grammar_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(DatasetError, match=r"label_column .*COLUMN OP NUMBER"):
        ImpressionLog(tmp_path / "x.csv", label_column=text)


def test_label_comparison_on_a_missing_or_empty_cell(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("timestamp,rating\n1,5\n2,\n")
    with pytest.raises(DatasetError, match=r"row 2: column 'rating' is empty \(label: rating >= 4\)"):
        list(ImpressionLog(path, label_column="rating >= 4").rows())
    with pytest.raises(DatasetError, match=r"r\.csv: no 'score' column for label_column"):
        list(ImpressionLog(path, label_column="score > 0").rows())


def test_numeric_matches_whole_column_names_only(tmp_path: Path) -> None:
    path = tmp_path / "buckets.csv"
    path.write_text("timestamp,click,year_bucket,age,price\n1,0,3,20,1.5\n")
    # A prefix (or substring) of a column name used to make that column numeric silently.
    with pytest.raises(DatasetError, match=r"buckets\.csv: numeric names \['year_bucket_'\], not columns"):
        _ = ImpressionLog(path, numeric="year_bucket_").fields
    for numeric in ("age,price", ["age", "price"], " age , price "):
        kinds = {f.name: f.kind for f in ImpressionLog(path, numeric=numeric).fields}
        assert kinds == {"year_bucket": "categorical", "age": "numeric", "price": "numeric"}, numeric
    with pytest.raises(DatasetError, match=r"multi names \['tag'\]"):
        list(ImpressionLog(path, multi="tag").rows())


def test_name_is_the_files_stem(tmp_path: Path) -> None:
    from reloop.connectors.files.datasets import open_dataset

    path = _write_csv(tmp_path / "shop_clicks_2024.csv")
    assert ImpressionLog(path).name == "shop_clicks_2024"
    assert open_dataset("impression-log", path).name == "shop_clicks_2024"
    assert ImpressionLog(path, name="shop").name == "shop"


@pytest.mark.parametrize(
    ("cells", "needle"),
    [
        ("inf,1,,", "column 'timestamp' is not a finite number"),  # an OverflowError traceback
        ("1e30,1,,", "column 'timestamp' is not a time in range"),
        ("5,nan,,", "column 'rating' is not a finite number"),  # was label 0
        ("5,5,2.5,", "column 'served_prediction' is not a probability"),  # ReLoop trained on it
        ("5,5,0.5,1.7", "column 'model_version' is not a whole number"),  # cut to 1
    ],
)
def test_values_no_log_can_hold_are_refused_naming_the_row(tmp_path: Path, cells: str, needle: str) -> None:
    path = tmp_path / "r.csv"
    path.write_text(f"timestamp,rating,served_prediction,model_version\n1,5,0.5,2\n{cells}\n")
    with pytest.raises(DatasetError, match=rf"row 2: {needle}"):
        list(ImpressionLog(path, label_column="rating >= 4").rows())


def test_a_repeated_impression_id_is_refused_naming_both_rows(tmp_path: Path) -> None:
    # A replay joined the second row's click to the first row of that id and dropped the second row.
    path = tmp_path / "r.csv"
    path.write_text("timestamp,impression_id,click\n1,a,0\n2,b,0\n3,a,1\n")
    with pytest.raises(DatasetError, match=r"row 3: impression_id 'a' repeats row 1"):
        list(ImpressionLog(path).rows())


@pytest.mark.parametrize("first", ["user_id", "impression_id"])
def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path, first: str) -> None:
    # Excel's CSV starts with a BOM: '\ufeffuser_id' made every user unknown, '\ufeffimpression_id' a feature.
    path = tmp_path / "excel.csv"
    path.write_text(f"{first},timestamp,click,f\nx1,1,1,a\nx2,2,0,b\n", encoding="utf-8-sig")
    log = ImpressionLog(path)
    names = [f.name for f in log.fields]
    rows = list(log.rows())
    if first == "user_id":
        assert names == ["user_id", "f"] and [r.user_id for r in rows] == ["x1", "x2"]
    else:
        assert names == ["f"] and [r.row_id for r in rows] == ["x1", "x2"]


@pytest.mark.parametrize(("text", "row"), [("1,0,a\n2,1\n3,0,c\n", 2), ("1,0,a\n2,1,b\n3,0", 3)])
def test_a_row_with_fewer_cells_than_the_header_is_refused(tmp_path: Path, text: str, row: int) -> None:
    # A short row, or a cut-off last line, was read with its missing cells dropped.
    path = tmp_path / "short.csv"
    path.write_text("timestamp,click,f\n" + text)
    with pytest.raises(DatasetError, match=rf"short\.csv: row {row} has 2 cells, the header 3 columns"):
        list(ImpressionLog(path).rows())


def test_an_empty_label_cell_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("timestamp,click\n1,1\n2,\n")  # the empty cell was read as 0
    with pytest.raises(
        DatasetError, match=r"r\.csv: row 2: column 'click' must be 0/1 or true/false, got ''"
    ):
        list(ImpressionLog(path).rows())


def test_a_header_alone_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("timestamp,click,f\n")  # zero rows: a replay ran and exited 0
    with pytest.raises(DatasetError, match=r"header\.csv: no rows"):
        list(ImpressionLog(path).rows())


@pytest.mark.parametrize(
    ("option", "column"),
    [("numeric", "timestamp"), ("numeric", "click"), ("multi", "served_prediction"),
     ("numeric", "model_version"), ("multi", "impression_id")],
)  # fmt: skip
def test_numeric_or_multi_naming_a_column_that_is_not_a_feature_is_refused(
    tmp_path: Path, option: str, column: str
) -> None:
    path = _write_csv(tmp_path / "log.csv")  # it was ignored without a word
    log = ImpressionLog(path, **{option: column})
    for read in (lambda: log.fields, lambda: list(log.rows())):
        with pytest.raises(
            DatasetError, match=rf"log\.csv: {option} names \['{column}'\], not a feature column"
        ):
            read()
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("timestamp,rating\n1,5\n")
    with pytest.raises(DatasetError, match=r"numeric names \['rating'\], not a feature column"):
        list(ImpressionLog(ratings, label_column="rating >= 4", numeric="rating").rows())


@pytest.mark.parametrize("version", [str(2**63), "99999999999999999999", "1e30", "-1"])
def test_a_model_version_beyond_int64_is_refused(tmp_path: Path, version: str) -> None:
    path = tmp_path / "v.csv"
    path.write_text(f"timestamp,click,model_version\n1,0,3\n2,1,{version}\n")  # 2^63 crashed training
    with pytest.raises(
        DatasetError, match=r"v\.csv: row 2: column 'model_version' is not in \[0, 2\^63 - 1\]"
    ):
        list(ImpressionLog(path).rows())


def test_the_largest_model_version_is_kept_exactly(tmp_path: Path) -> None:
    path = tmp_path / "v.csv"
    path.write_text(f"timestamp,click,model_version\n1,0,{2**63 - 1}\n2,0,4.0\n")  # via float: 2^63
    assert [r.model_version for r in ImpressionLog(path).rows()] == [2**63 - 1, 4]


def test_name_is_an_option_of_open_dataset(tmp_path: Path) -> None:
    from reloop.connectors.files.datasets import open_dataset

    # open_dataset's own `name` parameter took it: "got multiple values for argument 'name'".
    path = _write_csv(tmp_path / "log.csv")
    assert open_dataset("impression-log", path, name="shop").name == "shop"


def test_a_byte_that_is_not_utf8_is_named_by_file_and_line(tmp_path: Path) -> None:
    # The codec's error named a position in an 8 KiB read buffer, no file and no line.
    path = tmp_path / "latin1.csv"
    rows = [f"{t},i{t},0,caf\xe9" if t == 3000 else f"{t},i{t},0,x" for t in range(1, 5000)]
    path.write_bytes(("timestamp,impression_id,click,f\n" + "\n".join(rows) + "\n").encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.csv:3001: not UTF-8 \(invalid"):
        list(ImpressionLog(path).rows())
    path.write_bytes("timestamp,impression_id,click,caf\xe9\n1,i1,0,x\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1.csv:1: not UTF-8"):
        ImpressionLog(path).fields  # noqa: B018 (the header alone is read)


@pytest.mark.parametrize("name", ["impression-log", "criteo", "avazu"])
def test_a_folder_given_for_the_file_is_named_a_folder_with_what_it_holds(tmp_path: Path, name: str) -> None:
    # `--data criteo-sample` (the folder, not its .tsv) said "dataset file not found": it is there.
    from reloop.connectors.files.datasets import open_dataset

    (tmp_path / "train.tsv").write_text("")
    (tmp_path / ".hidden").write_text("")
    with pytest.raises(
        DatasetError, match=r"is a folder: give the dataset's file itself \(it holds: train.tsv\)"
    ):
        list(open_dataset(name, tmp_path).rows())


def test_a_click_time_before_its_impression_is_named_with_the_file_and_row(tmp_path: Path) -> None:
    # `reloop backtest` took it silently and `reloop replay` refused it later, naming neither file nor row.
    path = tmp_path / "early.csv"
    path.write_text("timestamp,click,click_time\n1000,1,1000\n2000,1,1999\n")
    with pytest.raises(DatasetError, match=r"early\.csv: row 2: column 'click_time' \(1999\) is before"):
        list(ImpressionLog(path).rows())


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    # pyarrow's "Parquet magic bytes not found in footer" named no file.
    path = tmp_path / "fake.parquet"
    path.write_text("timestamp,click\n1,0\n")
    with pytest.raises(DatasetError, match=r"fake\.parquet: cannot be read as Parquet .*format=csv"):
        list(ImpressionLog(path).rows())
    assert next(ImpressionLog(path, format="csv").rows()).event_time_ms == 1
