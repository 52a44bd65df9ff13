from pathlib import Path

import pytest
from reloop.connectors.files.datasets import Avazu, Criteo, DatasetError
from reloop.connectors.files.datasets.avazu import hour_to_ms


def test_tsv_and_csv_give_the_same_rows(criteo_files: tuple[Path, Path]) -> None:
    tsv, csv = criteo_files
    a, b = list(Criteo(tsv).rows()), list(Criteo(csv).rows())
    assert [r.label for r in a] == [1, 0, 0]
    assert [r.features for r in a] == [r.features for r in b]
    assert [r.event_time_ms for r in a] == sorted(r.event_time_ms for r in a)


def test_numeric_floats_and_missing_values_left_out(criteo_files: tuple[Path, Path]) -> None:
    first, second, _ = Criteo(criteo_files[0]).rows()
    assert first.features["I1"] == 5.0 and "I2" not in first.features and first.features["C26"] == "c25"
    assert second.features == {"C26": "zz"}
    kinds = {f.name: f.kind for f in Criteo(criteo_files[0]).fields}
    assert kinds["I13"] == "numeric" and kinds["C1"] == "categorical" and len(kinds) == 39


def test_criteo_bad_rows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1\t2\t3\n")
    with pytest.raises(DatasetError, match="bad.txt:1: expected 40 columns"):
        list(Criteo(bad).rows())
    bad.write_text("2" + "\t" * 39 + "\n")
    with pytest.raises(DatasetError, match="label must be 0 or 1"):
        list(Criteo(bad).rows())


def test_avazu_sorted_by_hour_keeping_file_order(avazu_csv: Path) -> None:
    rows = list(Avazu(avazu_csv).rows())
    assert [r.row_id for r in rows] == ["avazu-b", "avazu-d", "avazu-a", "avazu-c"]
    assert rows[0].event_time_ms == hour_to_ms("14102100") and rows[2].event_time_ms == hour_to_ms("14102101")
    assert rows[2].event_time_ms - rows[0].event_time_ms == 3_600_000
    assert [r.label for r in rows] == [1, 1, 0, 0]
    assert rows[2].features["hour_of_day"] == "1" and rows[2].features["weekday"] == "1"  # a Tuesday
    assert "id" not in rows[0].features and "click" not in rows[0].features
    # Placeholder ids fall back to the ip (user) and the app (item).
    assert rows[3].user_id == "ip1" and rows[3].item_id == "app1"


@pytest.mark.parametrize("hour", ["2014-10-21", "14102124", "14023100"])
def test_avazu_bad_hour(tmp_path: Path, avazu_csv: Path, hour: str) -> None:
    # An hour 24 or 31 February said only "unconverted data remains: 4" / "day is out of range for month".
    text = avazu_csv.read_text().replace("14102101", hour, 1)
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(DatasetError, match=f"bad.csv:2: hour must be YYMMDDHH .*got '{hour}'"):
        list(Avazu(bad).rows())


def test_a_file_without_rows_is_refused(tmp_path: Path, avazu_csv: Path) -> None:
    """An empty Criteo file or an Avazu header alone gave zero rows, replayed as zero samples in silence."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="empty.txt: no rows"):
        list(Criteo(empty).rows())
    header = tmp_path / "header.csv"
    header.write_text(avazu_csv.read_text().splitlines()[0] + "\n")
    with pytest.raises(DatasetError, match="header.csv: no rows"):
        list(Avazu(header).rows())


def test_criteo_with_a_utf8_bom_reads_as_without(tmp_path: Path, criteo_files: tuple[Path, Path]) -> None:
    # Excel's BOM made a CSV look like the TSV ("expected 40 columns") and a TSV's first label '\ufeff1'.
    for plain in criteo_files:
        bom = tmp_path / f"bom{plain.suffix}"
        bom.write_text(plain.read_text(), encoding="utf-8-sig")
        assert [r.features for r in Criteo(bom).rows()] == [r.features for r in Criteo(plain).rows()]


def test_criteo_format_outside_auto_tsv_csv_is_refused(criteo_files: tuple[Path, Path]) -> None:
    with pytest.raises(DatasetError, match=r"format must be auto, tsv or csv, got 'tsv2'"):  # was read as CSV
        Criteo(criteo_files[0], format="tsv2")  # type: ignore[arg-type]


def test_avazu_with_a_utf8_bom_reads_as_without(tmp_path: Path, avazu_csv: Path) -> None:
    bom = tmp_path / "bom.csv"
    bom.write_text(avazu_csv.read_text(), encoding="utf-8-sig")  # was "header lacks columns ['id']"
    assert [r.row_id for r in Avazu(bom).rows()] == [r.row_id for r in Avazu(avazu_csv).rows()]


@pytest.mark.parametrize(
    ("cut", "cells"),
    [
        (slice(0, 41), 12),  # a cut-off last line, ending "d" of device_id "d1", was read as is
        (slice(0, 3), 2),  # a TypeError traceback
        (slice(0, None), 26),  # two cells more
    ],
)
def test_avazu_row_with_other_cells_than_the_header_is_refused(
    tmp_path: Path, avazu_csv: Path, cut: slice, cells: int
) -> None:
    text = avazu_csv.read_text()
    last = "e" + text.splitlines()[1][1:] + ",x,y"  # row "a" as a new id "e", with two cells more
    bad = tmp_path / "bad.csv"
    bad.write_text(text + last[cut])
    with pytest.raises(DatasetError, match=rf"bad\.csv:6: expected 24 columns, got {cells}$"):
        list(Avazu(bad).rows())


def test_avazu_repeated_id_is_refused_naming_both_lines(tmp_path: Path, avazu_csv: Path) -> None:
    # A replay's joiner dropped the repeat as a duplicate impression, with exit 0.
    text = avazu_csv.read_text()
    bad = tmp_path / "dup.csv"
    bad.write_text(text + "\n" + text.splitlines()[2] + "\n")  # line 6 blank, line 7 repeats id "b"
    with pytest.raises(DatasetError, match=r"dup\.csv:7: id 'b' repeats line 3$"):
        list(Avazu(bad).rows())


def test_a_byte_that_is_not_utf8_is_named_by_file_and_line(
    tmp_path: Path, criteo_files: tuple[Path, Path], avazu_csv: Path
) -> None:
    # The codec's error named a position in an 8 KiB read buffer ("can't decode byte 0xff in position
    # 8191"), no file and no line: a loader gave that alone for a byte far into a large file.
    for loader, plain in ((Criteo, criteo_files[0]), (Criteo, criteo_files[1]), (Avazu, avazu_csv)):
        lines = plain.read_bytes().splitlines(keepends=True)
        body = lines[1:] * 2000  # well past the first read buffer
        if loader is Avazu:  # ids must not repeat
            body = [b"x%d," % i + line.split(b",", 1)[1] for i, line in enumerate(body)]
        bad = tmp_path / f"bad{plain.suffix}"
        # row 1500 of the body gets a Latin-1 "é"; the header (line 1) stays
        body[1499] = body[1499].replace(b"\n", b"\xe9\n", 1)
        bad.write_bytes(lines[0] + b"".join(body))
        with pytest.raises(DatasetError, match=rf"bad{plain.suffix}:1501: not UTF-8 \(invalid"):
            list(loader(bad).rows())
