"""Read the first rows of each real dataset under shared/data when it is there (it is data, not a service)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from reloop.connectors.files.datasets import open_dataset, to_events
from reloop.connectors.files.datasets.spec import feature_spec
from reloop.engine.features.featurizer import Featurizer

DATA = Path(os.environ.get("RELOOP_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))
if not DATA.is_dir():
    DATA = Path("/work/shared/data")

CASES = [
    ("movielens-100k", "movielens-100k", 100_000),
    ("frappe", "frappe/raw", 96_203 * 3),
    ("frappe-libfm", "frappe/nfm_libfm/frappe.test.libfm", 28_860),
    ("criteo", "criteo-sample/wideresdnn_criteo_train.tsv", 7_200),
    ("criteo", "criteo-sample/deepctr_criteo_sample.txt", 200),
    ("avazu", "avazu-sample/wideresdnn_avazu_train.csv", 8_087),
    ("avazu", "avazu-sample/deepctr_avazu_sample.txt", 100),
]


@pytest.mark.parametrize(("name", "rel", "_rows"), CASES, ids=[c[1] for c in CASES])
def test_first_rows_load_and_featurize(name: str, rel: str, _rows: int) -> None:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{path} not present")
    ds = open_dataset(name, path)
    rows = list(itertools.islice(ds.rows(), 200))
    assert rows and all(a.event_time_ms <= b.event_time_ms for a, b in itertools.pairwise(rows))
    assert {r.label for r in rows} <= {0, 1}
    names = {f.name for f in ds.fields}
    assert set().union(*(r.features for r in rows)) <= names
    batch = Featurizer(feature_spec(ds.fields, buckets=1000)).transform([r.features for r in rows])
    assert len(batch) == len(rows)
    events = list(to_events(rows))
    assert len(events) == len(rows) + sum(r.label for r in rows)


def test_movielens_full_file_matches_its_provenance() -> None:
    path = DATA / "movielens-100k"
    if not path.exists():
        pytest.skip(f"{path} not present")
    rows = list(open_dataset("movielens-100k", path).rows())
    assert len(rows) == 100_000 and sum(r.label for r in rows) == 34_174 + 21_201
    assert rows[0].event_time_ms == 874_724_710_000  # 1997-09-20, as PROVENANCE.md says
