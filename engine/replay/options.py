"""Command-line values shared by ``reloop backtest`` and ``reloop replay``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

AUTO, NONE = "auto", "none"  # --counters / --counter-windows: the dataset's own, or none
#: The click counts that forget, chosen on MovieLens's selection weeks (600 s over 60 and 3600 s;
#: Frappe's tie), docs/backtest/ablation.md.
COUNTER_WINDOWS_S = (600.0,)


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (``--dataset-option``, ``--optimizer``): the value an int or a float when it reads as
    one, else the text."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def _names(text: str | None, option: str) -> list[str]:
    """The comma-separated names of ``option``'s value (not given: ``auto``). ValueError for an empty
    value (``--counters ""`` read as auto or as none would be a guess), and for ``auto`` or ``none``
    among other names."""
    if text is None:
        return [AUTO]
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise ValueError(f"{option}: empty; give names, {AUTO} or {NONE}")
    if len(names) > 1 and {AUTO, NONE} & set(names):
        raise ValueError(f"{option}: {AUTO} and {NONE} stand alone, got {text!r}")
    return names


def counted_fields(args: argparse.Namespace, declared: Sequence[str]) -> list[str]:
    """The fields ``--counters`` counts (not given: ``auto``): ``auto`` the dataset's ``declared`` ones
    (``Dataset.counters``), ``none`` none, else the fields and crosses it names. ValueError: see
    ``_names``."""
    given = _names(getattr(args, "counters", None), "--counters")
    if given == [AUTO]:
        return list(declared)
    return [] if given == [NONE] else given


def counted_windows(
    args: argparse.Namespace, fields: Sequence[str], dataset: str = "the dataset"
) -> list[float]:
    """The time constants ``--counter-windows`` gives the counters of ``fields`` (not given: ``auto``):
    ``auto`` the chosen ones (none without counters), ``none`` none. ValueError for one that is not a
    number, and for windows given to no counters."""
    given = _names(getattr(args, "counter_windows", None), "--counter-windows")
    if given == [AUTO]:
        return list(COUNTER_WINDOWS_S) if fields else []
    if given == [NONE]:
        return []
    try:
        windows = [float(w) for w in given]
    except ValueError:
        raise ValueError(
            f"--counter-windows: expected seconds, auto or none, got {args.counter_windows!r}"
        ) from None
    if not fields:
        auto = _names(getattr(args, "counters", None), "--counters") == [AUTO]
        why = f" (--counters auto: {dataset} names no user or item)" if auto else ""
        raise ValueError(f"--counter-windows: windows of no counters{why}; give --counters")
    return windows
