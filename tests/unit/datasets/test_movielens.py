from pathlib import Path

import pytest
from reloop.connectors.files.datasets import DatasetError, MovieLens100K, open_dataset


def test_rows_are_time_sorted_with_stable_ties_and_threshold_labels(movielens_dir: Path) -> None:
    rows = list(MovieLens100K(movielens_dir).rows())
    assert [r.event_time_ms for r in rows] == [50_000, 100_000, 100_000, 200_000, 300_000, 400_000]
    # The two rows at t=100 keep file order (line 3 before line 5).
    assert [r.row_id for r in rows[1:3]] == ["ml100k-3", "ml100k-5"]
    # ratings in time order: 4, 3, 1, 4, 5, 2 -> click iff rating >= 4
    assert [r.label for r in rows] == [1, 0, 0, 1, 1, 0]
    assert len({r.row_id for r in rows}) == len(rows)


def test_side_features_joined(movielens_dir: Path) -> None:
    first = next(iter(MovieLens100K(movielens_dir).rows()))
    assert first.user_id == "3" and first.item_id == "10"
    assert first.features == {
        "user_id": "3",
        "item_id": "10",
        "age": "23",
        "gender": "M",
        "occupation": "writer",
        "zip_prefix": "32",
        "release_year": "1995",
        "genres": ["Animation", "Children's", "Comedy"],
    }
    no_year = [r for r in MovieLens100K(movielens_dir).rows() if r.item_id == "12"][0]
    assert "release_year" not in no_year.features and no_year.features["genres"] == []


def test_threshold_is_configurable_and_side_files_optional(movielens_dir: Path) -> None:
    (movielens_dir / "ml-100k.user").unlink()
    rows = list(open_dataset("movielens-100k", movielens_dir, click_threshold=5).rows())
    assert sum(r.label for r in rows) == 1
    assert "age" not in rows[0].features and "genres" in rows[0].features


def test_field_kinds(movielens_dir: Path) -> None:
    kinds = {f.name: f.kind for f in MovieLens100K(movielens_dir).fields}
    assert kinds["genres"] == "multi" and kinds["user_id"] == "categorical"
    row_fields = set().union(*(r.features for r in MovieLens100K(movielens_dir).rows()))
    assert row_fields <= set(kinds)


def test_malformed_line_names_file_and_line(movielens_dir: Path) -> None:
    inter = movielens_dir / "ml-100k.inter"
    inter.write_text(inter.read_text() + "4\t10\tfive\t10\n")
    with pytest.raises(DatasetError, match=r"ml-100k.inter:8: column 'rating'"):
        list(MovieLens100K(movielens_dir).rows())


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        list(MovieLens100K(tmp_path).rows())


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("4\t10\tnan\t10", "column 'rating' is not a finite number"),  # was label 0
        ("4\t10\t5\tinf", "column 'timestamp' is not a finite number"),  # was an OverflowError traceback
        ("4\t10\t5\t1e30", "column 'timestamp' is not a time in range"),
    ],
)
def test_a_value_that_is_no_finite_number_names_file_and_line(
    movielens_dir: Path, line: str, needle: str
) -> None:
    inter = movielens_dir / "ml-100k.inter"
    inter.write_text(inter.read_text() + line + "\n")
    with pytest.raises(DatasetError, match=rf"ml-100k.inter:8: {needle}"):
        list(MovieLens100K(movielens_dir).rows())


def test_bytes_that_are_not_utf8_name_file_and_line(movielens_dir: Path) -> None:
    inter = movielens_dir / "ml-100k.inter"
    inter.write_bytes(inter.read_bytes() + b"4\t10\t5\t\xff10\n")
    with pytest.raises(DatasetError, match=r"ml-100k.inter:8: not UTF-8"):
        list(MovieLens100K(movielens_dir).rows())


def test_a_header_alone_is_refused(movielens_dir: Path) -> None:
    inter = movielens_dir / "ml-100k.inter"
    inter.write_text(inter.read_text().splitlines()[0] + "\n")  # zero rows: a replay ran and exited 0
    with pytest.raises(DatasetError, match=r"ml-100k\.inter: no rows"):
        list(MovieLens100K(movielens_dir).rows())


def test_a_utf8_bom_is_not_part_of_the_first_column(movielens_dir: Path) -> None:
    before = list(MovieLens100K(movielens_dir).rows())
    for suffix in ("inter", "user"):  # '\ufeffuser_id': "header lacks columns ['user_id']"
        path = movielens_dir / f"ml-100k.{suffix}"
        path.write_text(path.read_text(), encoding="utf-8-sig")
    assert list(MovieLens100K(movielens_dir).rows()) == before


def test_its_ratings_file_may_be_given_for_its_folder(movielens_dir: Path) -> None:
    # `--data` is "the dataset's file or folder": the file gave "ml-100k.inter/ml-100k.inter not found".
    from reloop.connectors.files.datasets import open_dataset

    by_folder = [r.row_id for r in open_dataset("movielens-100k", movielens_dir).rows()]
    by_file = [r.row_id for r in open_dataset("movielens-100k", movielens_dir / "ml-100k.inter").rows()]
    assert by_file == by_folder and by_file
