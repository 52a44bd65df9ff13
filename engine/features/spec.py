"""The feature spec: which fields a model reads and how each becomes embedding rows, as data.

The spec is stored inside snapshots (as JSON), so a restored model reads features exactly as it was
trained on them. Every field owns a contiguous block of rows in ONE shared embedding table; the
block layout (offsets) is derived from the field order, so the order of ``fields`` is part of the spec.

Field kinds:

* ``categorical``: a scalar value (str/int/float, hashed by its ``str()`` form) -> one of ``buckets`` rows.
  Row 0 of each block is reserved for a missing value (absent key, ``None`` or ``""``).
* ``numeric``: a number. ``transform="log_bucket"`` turns it into a categorical bucket the way the
  Criteo winners did for I1..I13 (``floor(log(x)**2)`` for x > 2, else ``floor(x)``), hashed into
  ``buckets`` rows. ``identity`` and ``minmax`` keep it a dense value that scales its field's single
  embedding row (the FuxiCTR convention for numeric fields). Under ``identity`` a value must fit a
  float32 (``|x| <= FLOAT32_MAX``): the model computes in float32, where a larger one is infinite.
* ``multi``: a list of strings (tags, history), each hashed into ``buckets`` rows and mean-pooled;
  at most ``max_len`` values are kept (the first ones).

>>> spec = FeatureSpec(fields=(CategoricalField(name="user", buckets=1000),
...                            NumericField(name="age", transform="minmax", min=0.0, max=100.0)))
>>> FeatureSpec.from_json(spec.to_json()) == spec
True
>>> spec.total_rows
1001
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NumericTransform = Literal["identity", "log_bucket", "minmax"]
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32 (numpy.finfo(numpy.float32).max)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CategoricalField(_Frozen):
    kind: Literal["categorical"] = "categorical"
    name: str = Field(min_length=1)
    buckets: int = Field(ge=2, description="rows for this field; row 0 is the missing value")


class NumericField(_Frozen):
    kind: Literal["numeric"] = "numeric"
    name: str = Field(min_length=1)
    transform: NumericTransform = "identity"
    buckets: int = Field(default=1000, ge=2, description="rows when transform is log_bucket")
    min: float | None = None
    max: float | None = None
    fill: float = Field(default=0.0, description="dense value used when the value is missing")

    @model_validator(mode="after")
    def _check_range(self) -> NumericField:
        if self.transform == "minmax":
            if self.min is None or self.max is None:
                raise ValueError(f"numeric field {self.name!r}: transform minmax needs min and max")
            if not self.max > self.min:
                raise ValueError(f"numeric field {self.name!r}: max must be > min")
        return self

    @property
    def is_bucketed(self) -> bool:
        return self.transform == "log_bucket"

    @property
    def max_abs(self) -> float | None:
        """The largest magnitude the model can take from this field (None: any finite value; minmax
        clips, log_bucket buckets)."""
        return FLOAT32_MAX if self.transform == "identity" else None


class MultiCategoricalField(_Frozen):
    kind: Literal["multi"] = "multi"
    name: str = Field(min_length=1)
    buckets: int = Field(ge=2)
    max_len: int = Field(default=16, ge=1)


FieldSpec = Annotated[CategoricalField | NumericField | MultiCategoricalField, Field(discriminator="kind")]


class FeatureSpec(_Frozen):
    """An ordered list of fields. Model inputs come in three groups, each in field order:

    * ``cat_fields``: categorical fields and bucketed numeric fields -> ``FeatureBatch.cat`` ids,
    * ``dense_fields``: numeric fields kept dense -> ``FeatureBatch.num`` values,
    * ``multi_fields``: multi-valued fields -> ``FeatureBatch.multi`` ids with a mask.

    A model sees ``num_fields = len(cat) + len(dense) + len(multi)`` embedding vectors per sample, in
    that group order.
    """

    fields: tuple[FieldSpec, ...]
    version: int = 1

    @model_validator(mode="after")
    def _check_names(self) -> FeatureSpec:
        if not self.fields:
            raise ValueError("feature spec: fields must not be empty")
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature spec: duplicate field names {dupes}")
        return self

    # Layout, derived once (the model is frozen, so caching is safe).
    @cached_property
    def cat_fields(self) -> tuple[CategoricalField | NumericField, ...]:
        return tuple(
            f
            for f in self.fields
            if isinstance(f, CategoricalField) or (isinstance(f, NumericField) and f.is_bucketed)
        )

    @cached_property
    def dense_fields(self) -> tuple[NumericField, ...]:
        return tuple(f for f in self.fields if isinstance(f, NumericField) and not f.is_bucketed)

    @cached_property
    def multi_fields(self) -> tuple[MultiCategoricalField, ...]:
        return tuple(f for f in self.fields if isinstance(f, MultiCategoricalField))

    @cached_property
    def _offsets(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
        pos = 0
        cat = []
        for f in self.cat_fields:
            cat.append(pos)
            pos += f.buckets
        dense = []
        for _ in self.dense_fields:
            dense.append(pos)
            pos += 1
        multi = []
        for f in self.multi_fields:
            multi.append(pos)
            pos += f.buckets
        return tuple(cat), tuple(dense), tuple(multi), pos

    @property
    def cat_offsets(self) -> tuple[int, ...]:
        """First embedding row of each field in ``cat_fields``."""
        return self._offsets[0]

    @property
    def dense_rows(self) -> tuple[int, ...]:
        """The single embedding row of each field in ``dense_fields``."""
        return self._offsets[1]

    @property
    def multi_offsets(self) -> tuple[int, ...]:
        return self._offsets[2]

    @property
    def total_rows(self) -> int:
        """Rows of the shared embedding table."""
        return self._offsets[3]

    @property
    def num_fields(self) -> int:
        return len(self.cat_fields) + len(self.dense_fields) + len(self.multi_fields)

    @property
    def max_multi_len(self) -> int:
        return max((f.max_len for f in self.multi_fields), default=0)

    @property
    def field_names(self) -> tuple[str, ...]:
        """Names in model input order (cat, dense, multi)."""
        return tuple(f.name for f in (*self.cat_fields, *self.dense_fields, *self.multi_fields))

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> FeatureSpec:
        return cls.model_validate_json(text)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        return cls.model_validate(data)


def criteo_spec(buckets: int = 1_000_000 // 39, numeric_buckets: int = 1000) -> FeatureSpec:
    """The Criteo layout: I1..I13 log-bucketed, C1..C26 hashed."""
    ints = [NumericField(name=f"I{i}", transform="log_bucket", buckets=numeric_buckets) for i in range(1, 14)]
    cats = [CategoricalField(name=f"C{i}", buckets=buckets) for i in range(1, 27)]
    return FeatureSpec(fields=(*ints, *cats))
