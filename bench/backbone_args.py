"""``--backbones`` for the benchmarks: names separated by spaces or commas (``dcn deepfm`` or
``dcn,deepfm``, as ``reloop backtest`` takes them), each checked against the registry, so a wrong name is
argparse's one-line error rather than a traceback from the middle of a run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from reloop.engine.models.registry import available_backbones


class Backbones(argparse.Action):
    """``parser.add_argument("--backbones", nargs="+", action=Backbones, default=[...])``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        given = [values] if isinstance(values, str) else list(values or [])
        names = [name for value in given for name in str(value).split(",") if name]
        known = available_backbones()
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            parser.error(f"{option_string}: unknown backbone(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}")  # fmt: skip
        setattr(namespace, self.dest, names)
