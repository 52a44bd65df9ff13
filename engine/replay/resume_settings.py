"""What ``reloop backtest --resume`` checks besides the data: the settings the finished runs were made with.

``--resume`` skips the runs already in ``OUT/results.csv``, keyed by (protocol, backbone, strategy, seed).
Made with other learner settings (other counters, rates, batch size, label noise...) they were averaged
with the new ones under the new run's settings line, and nothing in the CSV showed it. A run records its
options in ``OUT/settings.json``; a resume with any of them changed is refused, naming them. Options that
only choose which runs to make, where, how fast, and what the report shows may change.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SETTINGS_FILE = "settings.json"

# More seeds, backbones, strategies or protocols, the river peer: more runs of the same settings.
MAY_CHANGE = frozenset(
    {
        "data",  # the dataset's folder: the rows are checked by their periods' sizes
        "backbones", "strategies", "alphas", "seeds", "protocols", "river",
        "workers", "out", "resume", "report_from", "title", "report_only",
    }
)  # fmt: skip


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool | Path):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options (and what they resolved to, such as the counted fields) the runs depend on, as JSON."""
    options = {k: v for k, v in vars(args).items() if k not in MAY_CHANGE and _plain(v)}
    return json.loads(json.dumps(options, sort_keys=True, default=str))


def check_or_record(out: Path, settings: dict[str, Any], resuming: bool) -> str | None:
    """Resuming: why ``out``'s runs cannot be resumed with ``settings`` (None when they can). Else record
    ``settings`` for a later resume."""
    path = out / SETTINGS_FILE
    if not resuming:
        path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        return None
    if not path.exists():
        return (
            f"{out} records no {SETTINGS_FILE} (its runs were made before reloop kept one), so whether they "
            "were made with these settings cannot be told"
        )
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{path} cannot be read ({exc})"
    changed = sorted(k for k in before.keys() | settings.keys() if before.get(k) != settings.get(k))
    if not changed:
        return None
    shown = "; ".join(
        f"{k.replace('_', '-')}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed[:6]
    )
    more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
    return f"{out}'s runs were made with other settings: {shown}{more}"
