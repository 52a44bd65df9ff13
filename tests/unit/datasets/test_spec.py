import pytest
from reloop.connectors.files.datasets.base import FieldInfo
from reloop.connectors.files.datasets.spec import feature_spec
from reloop.engine.features.featurizer import Featurizer

FIELDS = (FieldInfo("u", "categorical"), FieldInfo("x", "numeric"), FieldInfo("tags", "multi"))


def test_kinds_map_to_spec_fields_and_featurize() -> None:
    spec = feature_spec(FIELDS, buckets=50, buckets_per_field={"u": 7}, multi_max_len=3)
    assert [f.kind for f in spec.fields] == ["categorical", "numeric", "multi"]
    assert spec.fields[0].buckets == 7 and spec.fields[2].max_len == 3
    batch = Featurizer(spec).transform([{"u": "a", "x": 12.0, "tags": ["p", "q", "r", "s"]}, {}])
    assert batch.cat.shape == (2, 2) and batch.multi_mask[0].sum() == 3 and batch.multi_mask[1].sum() == 0


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        feature_spec(FIELDS, buckets_per_field={"nope": 3})
