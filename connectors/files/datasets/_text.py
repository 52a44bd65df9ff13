"""Small helpers shared by the text-file loaders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from reloop.connectors.files.datasets.base import DatasetError


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    return path


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline), skipping blank lines."""
    with require_file(path).open(encoding="utf-8", newline="") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if line:
                yield number, line


def parse_float(text: str, path: Path, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{path}:{line}: column {column!r} is not a number: {text!r}") from None
