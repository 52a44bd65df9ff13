"""The one way a single-purpose benchmark hands out its report: printed, and written to ``--out``."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], out: Path | None) -> int:
    """Print the report's ``lines`` and, given ``out``, write them there (its folder made); returns 0,
    the benchmark's exit status."""
    text = "\n".join(lines) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text, end="")
    return 0
