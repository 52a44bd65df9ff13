"""Command-line values shared by ``reloop backtest`` and ``reloop replay``."""

from __future__ import annotations

import argparse
from typing import Any


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
