"""Check feature values against the feature spec BEFORE anything keeps them (joiner, trainer, scorer).

The event contract (engine/events/validation.py) only knows that features are str | int | float |
list[str]; whether ``price: "abc"`` or a list for a categorical field can be read is a question of the
spec. Answering it at the door is what lets the featurizer never fail inside a training batch (where
one bad value would cost the whole batch) or a scoring request (a 500 instead of a 422).

Rules per field kind (a key the spec does not name is ignored; an absent key is a missing value):

* ``categorical``: a str, int or float (lists are refused), strings at most ``max_chars`` long;
* ``numeric``: an int or float, or a string that parses as a finite float ("" = missing); under the
  ``identity`` transform at most ``FLOAT32_MAX`` in magnitude (the model's float32 would make it inf);
* ``multi``: a list of strings (or "" = missing), at most ``max_list`` items of at most ``max_chars``.

The bounds also bound the work: hashing costs one numpy pass per character position, so a single
1,000,000-character value would stall a batch (or the scoring event loop) for seconds.

The check is columnar: per field, one C-level pass over the column's types and lengths; only a column
that fails is walked row by row to name the bad rows.

>>> from reloop.engine.features.spec import FeatureSpec, CategoricalField, NumericField
>>> spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=9), NumericField(name="price")))
>>> checker = SpecChecker(spec)
>>> [(i, e.reason, e.detail) for i, e in checker.check_rows([{"u": "a", "price": 1.5}, {"price": "abc"}])]
[(1, 'bad_feature', "features['price'] must be a number or a numeric string, got 'abc'")]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from reloop.engine.events.validation import EventError
from reloop.engine.features.spec import CategoricalField, FeatureSpec, MultiCategoricalField, NumericField

_SCALARS = frozenset({str, int, float, type(None)})
_NUMBERS = frozenset({int, float, type(None)})
_MULTI = frozenset({list, type(None)})
_FLOAT64_MAX = sys.float_info.max


class FeatureLimits(BaseModel):
    """Bounds on one feature value (shared by the stream processor and the scoring service)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_chars: int = Field(default=4096, gt=0, description="longest string value (characters)")
    max_list: int = Field(default=1024, gt=0, description="most items in a multi-valued feature")


class SpecChecker:
    """Finds the rows whose feature values the featurizer of ``spec`` could not read."""

    def __init__(self, spec: FeatureSpec, limits: FeatureLimits | None = None) -> None:
        self.spec = spec
        self.limits = limits or FeatureLimits()
        self._names = tuple(f.name for f in spec.fields)
        self._fields = spec.fields
        self._row_values = _values_getter(self._names)

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, EventError]]:
        """(row index, error) for every bad row, in row order; at most one error per row."""
        if not rows:
            return []
        try:  # every row has every field (the usual case): one C-level call per row
            # list() first: a KeyError raised inside a star-unpacked map leaks memory (CPython 3.11).
            columns = zip(*list(map(self._row_values, rows)), strict=True)
        except KeyError:
            names = self._names
            columns = zip(*[list(map(row.get, names)) for row in rows], strict=True)
        bad: dict[int, EventError] = {}
        for f, column in zip(self._fields, columns, strict=True):
            if not self._column_ok(f, column):
                for i, value in enumerate(column):
                    if i not in bad:
                        err = self.check_value(f, value)
                        if err is not None:
                            bad[i] = err
        return sorted(bad.items())

    def check_row(self, row: Mapping[str, Any]) -> EventError | None:
        found = self.check_rows([row])
        return found[0][1] if found else None

    def _column_ok(self, f: Any, column: tuple[Any, ...]) -> bool:
        """The fast, all-rows-good test (False only means: look row by row)."""
        kinds = set(map(type, column))
        limit = self.limits.max_chars
        if isinstance(f, CategoricalField):
            if not kinds <= _SCALARS:
                return False
            if str not in kinds:
                return True
            strings = column if len(kinds) == 1 else [v for v in column if type(v) is str]
            return max(map(len, strings)) <= limit  # C-level passes: this runs on every impression
        if isinstance(f, NumericField):
            if not kinds <= _NUMBERS:
                return False
            numbers = column if type(None) not in kinds else [v for v in column if v is not None]
            if not numbers:
                return True
            # isfinite on floats only: on an int past the float range it raises OverflowError.
            if int not in kinds:
                floats = numbers
            else:
                floats = [v for v in numbers if type(v) is float] if float in kinds else []
            if not all(map(math.isfinite, floats)):
                return False
            # Ints are bounded too: the featurizer reads them as floats (an int past float32 was let
            # through, then refused by the featurizer inside a batch). Exact int/float comparison, so
            # this may be stricter than the row check, which then decides.
            bound = _FLOAT64_MAX if f.max_abs is None else f.max_abs
            return max(map(abs, numbers)) <= bound
        if not kinds <= _MULTI:
            return False
        lists = [v for v in column if v is not None]
        if not lists:
            return True
        if max(map(len, lists)) > self.limits.max_list:
            return False
        items = list(chain.from_iterable(lists))
        return not items or (set(map(type, items)) == {str} and max(map(len, items)) <= limit)

    def check_value(self, f: Any, value: Any) -> EventError | None:
        """The precise check of one value: None when the featurizer can read it, else the error."""
        if value is None:
            return None
        name = f"features[{f.name!r}]"
        limit = self.limits.max_chars
        kind = type(value)
        if isinstance(f, CategoricalField):
            if kind not in _SCALARS:
                return _bad(f"{name} must be a single value (string or number), got {kind.__name__}", f)
            if kind is str and len(value) > limit:
                return _bad(f"{name} is {len(value)} characters long (limit {limit})", f)
            return None
        if isinstance(f, NumericField):
            if kind is int:
                try:
                    return _in_range(f, name, float(value))
                except OverflowError:
                    return _bad(f"{name} is an integer of {value.bit_length()} bits, beyond any float", f)
            if kind is float:
                if not math.isfinite(value):
                    return _bad(f"{name} must be finite, got {value!r}", f)
                return _in_range(f, name, value)
            if kind is str:
                if value == "":
                    return None
                if len(value) <= 64:
                    try:
                        number = float(value)
                    except ValueError:
                        pass
                    else:
                        if math.isfinite(number):
                            return _in_range(f, name, number)
                return _bad(f"{name} must be a number or a numeric string, got {_short(value)}", f)
            return _bad(f"{name} must be a number, got {kind.__name__}", f)
        assert isinstance(f, MultiCategoricalField)
        if kind is str and value == "":
            return None
        if kind is not list:
            return _bad(f"{name} must be a list of strings, got {kind.__name__}", f)
        if len(value) > self.limits.max_list:
            return _bad(f"{name} has {len(value)} items (limit {self.limits.max_list})", f)
        for item in value:
            if type(item) is not str:
                return _bad(f"{name} items must be strings, got {type(item).__name__}", f)
            if len(item) > limit:
                return _bad(f"{name} has an item {len(item)} characters long (limit {limit})", f)
        return None


def _in_range(f: NumericField, name: str, number: float) -> EventError | None:
    bound = f.max_abs
    if bound is None or abs(number) <= bound:
        return None
    return _bad(
        f"{name} is {number!r}: beyond float32 (magnitude at most {bound:.7g}) under its"
        f" {f.transform} transform",
        f,
    )


def _short(value: str, n: int = 40) -> str:
    return repr(value) if len(value) <= n else f"{value[:n]!r}... ({len(value)} characters)"


def _values_getter(names: tuple[str, ...]) -> Any:
    """A function from a row to the tuple of its values for ``names`` (KeyError when one is absent)."""
    if len(names) < 2:  # itemgetter of one name returns the bare value, of none it is refused
        return lambda row: tuple(row[name] for name in names)
    return itemgetter(*names)


def _bad(detail: str, f: Any) -> EventError:
    return EventError("bad_feature", detail, f"features.{f.name}")
