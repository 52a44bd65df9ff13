"""Each loader's default click counters (``Dataset.counters``, what ``reloop backtest --counters auto``
counts): fields its own spec can count, and nothing where the data names no user."""

from pathlib import Path

import pytest
from reloop.connectors.files.datasets import open_dataset
from reloop.connectors.files.datasets.spec import feature_spec
from reloop.engine.features.counters import CounterSettings, with_counter_fields


def _fits_its_spec(ds) -> None:
    spec = feature_spec(ds.fields, buckets=64)
    with_counter_fields(spec, CounterSettings(fields=ds.counters))  # refuses a field the spec cannot count


def test_movielens_counts_user_item_and_the_users_genres(movielens_dir: Path) -> None:
    ds = open_dataset("movielens-100k", movielens_dir)
    assert ds.counters == ("user_id", "item_id", "user_id*genres")
    _fits_its_spec(ds)


def test_frappe_counts_user_and_app_in_both_formats(frappe_csv: Path, tmp_path: Path) -> None:
    ds = open_dataset("frappe", frappe_csv)
    assert ds.counters == ("user", "item")
    _fits_its_spec(ds)
    libfm = tmp_path / "f.libfm"
    libfm.write_text("1 0:1 10:1\n")
    assert open_dataset("frappe-libfm", libfm).counters == ("user", "item")


def test_data_that_names_no_user_counts_nothing(criteo_files: tuple[Path, Path], avazu_csv: Path) -> None:
    assert open_dataset("criteo", criteo_files[0]).counters == ()
    assert open_dataset("avazu", avazu_csv).counters == ()


@pytest.mark.parametrize(
    ("header", "options", "counted"),
    [
        ("timestamp,user_id,item_id,click", {}, ("user_id", "item_id")),
        ("timestamp,user_id,item_id,click", {"numeric": "item_id"}, ("user_id",)),  # a number: not counted
        ("timestamp,shop,item_id,click", {}, ("item_id",)),
        ("timestamp,shop,product,click", {}, ()),
    ],
)
def test_an_impression_log_counts_its_user_and_item_columns(
    tmp_path: Path, header: str, options: dict, counted: tuple[str, ...]
) -> None:
    path = tmp_path / "log.csv"
    path.write_text(f"{header}\n1000,1,2,0\n2000,1,3,1\n")
    ds = open_dataset("impression-log", path, **options)
    assert ds.counters == counted
    if counted:
        _fits_its_spec(ds)
