"""Dataset loaders: files -> time-ordered rows -> Impression/Click events (or labeled samples).

>>> ds = open_dataset("movielens-100k", "/path/to/movielens-100k")   # doctest: +SKIP
>>> events = to_events(ds.rows(), make_delay("exponential", ms=30_000, seed=1))   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from reloop.connectors.files.datasets.avazu import Avazu
from reloop.connectors.files.datasets.base import Dataset, DatasetError, DatasetRow, FieldInfo, field_names
from reloop.connectors.files.datasets.criteo import Criteo
from reloop.connectors.files.datasets.delay import (
    ClickDelay,
    ExponentialDelay,
    FixedDelay,
    ImmediateDelay,
    LogNormalDelay,
    make_delay,
)
from reloop.connectors.files.datasets.events import (
    PLACEHOLDER_VERSION,
    RunningBaseRate,
    UnloggedPredictions,
    to_events,
    to_samples,
)
from reloop.connectors.files.datasets.frappe import FrappeLibFM, FrappeRaw
from reloop.connectors.files.datasets.impression_log import ImpressionLog
from reloop.connectors.files.datasets.movielens import MovieLens100K

DATASETS = ("movielens-100k", "frappe", "frappe-libfm", "criteo", "avazu", "impression-log")


class UnknownOption(DatasetError):
    """An option the dataset's loader does not take, or a value of it the loader cannot take."""


def open_dataset(name: str, path: str | Path, /, **options: Any) -> Dataset:
    """A loader by name; ``options`` go to its constructor (e.g. ``seed`` for Frappe's negatives). An
    option the loader does not take is a DatasetError naming the ones it does. ``name`` and ``path`` are
    positional-only, so that options of those names (impression-log's ``name``) reach the loader."""
    loaders: dict[str, type] = {
        "movielens-100k": MovieLens100K,
        "frappe": FrappeRaw,
        "frappe-libfm": FrappeLibFM,
        "criteo": Criteo,
        "avazu": Avazu,
        "impression-log": ImpressionLog,
    }
    loader = loaders.get(name)
    if loader is None:
        raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    takes = list(inspect.signature(loader).parameters)[1:]  # after the path (or files)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise UnknownOption(
            f"dataset {name!r} takes no option {', '.join(map(repr, unknown))} (it takes: {', '.join(takes)})"
        )
    options = _typed_options(name, loader, options)
    p = Path(path)
    if name == "frappe-libfm":
        files = sorted(p.glob("*.libfm")) if p.is_dir() else [p]
        if not files:
            raise DatasetError(f"{p}: no *.libfm file in this folder")
        return FrappeLibFM(files, **options)
    if name == "movielens-100k" and p.is_file():  # its ratings file given: its folder holds the rest
        if "prefix" not in options and p.suffix == ".inter":
            options["prefix"] = p.stem
        p = p.parent
    return loader(p, **options)


def _typed_options(name: str, loader: type, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` as the loader's signature types them (a number given for a text option is taken as
    its text); a value it cannot take is an UnknownOption naming it. Untyped, "seed=abc" failed inside
    numpy in its words, "click_threshold=abc" comparing a float with a str, and "time_kind=bogus" was
    taken."""
    hints = typing.get_type_hints(loader.__init__)
    typed = {}
    for key, value in options.items():
        hint = hints.get(key)
        if hint is str and isinstance(value, int | float):
            value = str(value)
        try:
            typed[key] = value if hint is None else TypeAdapter(hint).validate_python(value)
        except ValidationError as exc:
            why = exc.errors()[0]["msg"]
            raise UnknownOption(f"dataset {name!r}: option {key}={value!r}: {why}") from None
    return typed


__all__ = [
    "DATASETS",
    "UnknownOption",
    "PLACEHOLDER_VERSION",
    "Avazu",
    "ClickDelay",
    "Criteo",
    "Dataset",
    "DatasetError",
    "DatasetRow",
    "ExponentialDelay",
    "FieldInfo",
    "FixedDelay",
    "FrappeLibFM",
    "FrappeRaw",
    "ImmediateDelay",
    "ImpressionLog",
    "LogNormalDelay",
    "MovieLens100K",
    "RunningBaseRate",
    "UnloggedPredictions",
    "field_names",
    "make_delay",
    "open_dataset",
    "to_events",
    "to_samples",
]
