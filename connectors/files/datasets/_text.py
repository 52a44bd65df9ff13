"""Small helpers shared by the text-file loaders."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reloop.connectors.files.datasets.base import DatasetError, DatasetRow


def require_file(path: Path) -> Path:
    if path.is_dir():  # "not found" for a folder that is there read as a typo in its name
        names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        held = f" (it holds: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if names else ""
        raise DatasetError(f"{path} is a folder: give the dataset's file itself{held}")
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    return path


def refuse_empty(rows: Iterator[DatasetRow], where: str) -> Iterator[DatasetRow]:
    """``rows`` as they come; a DatasetError at the end when there were none (an empty file, or a
    header alone, replayed or backtested as zero samples without a word)."""
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise DatasetError(f"{where}: no rows (an empty file, or a header alone)")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline), skipping blank lines and a UTF-8 BOM at the start."""
    with require_file(path).open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:  # utf-8-sig on line 1 only: Excel's BOM became part of the first column's name
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:  # it said only "can't decode byte 0xff in position N"
                raise _not_utf8_line(path, number, exc) from None
            if line:
                yield number, line


def _not_utf8_line(path: Path, number: int, exc: UnicodeDecodeError) -> DatasetError:
    return DatasetError(f"{path}:{number}: not UTF-8 ({exc.reason} at byte {exc.start})")


@contextmanager
def utf8_errors_located(path: Path) -> Iterator[None]:
    """Reading a text file inside: a UnicodeDecodeError becomes a DatasetError naming the file's first line
    that is not UTF-8 (the codec's message names a byte offset in a read buffer: "position 8191")."""
    try:
        yield
    except UnicodeDecodeError:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8_line(path, number, exc) from None
        raise DatasetError(f"{path}: not UTF-8") from None


# Event times in ms must fit numpy's int64 with room: beyond, a time is a typo, not a date.
MAX_TIME_MS = 2**62


def parse_float(text: str, path: Path, line: int, column: str) -> float:
    """A finite number (``nan`` and ``inf`` parse as floats, and became label 0 or crashed a backtest)."""
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{path}:{line}: column {column!r} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DatasetError(f"{path}:{line}: column {column!r} is not a finite number: {text!r}")
    return value


def parse_time_ms(text: str, path: Path, line: int, column: str, scale: int) -> int:
    """Epoch milliseconds: the number in ``text`` times ``scale`` (1000 for seconds), within ±2^62 ms."""
    return checked_ms(parse_float(text, path, line, column) * scale, f"{path}:{line}", column, text)


def checked_ms(ms: float, where: str, column: str, value: object) -> int:
    """``ms`` as whole milliseconds, refused (naming ``where``) beyond ±2^62."""
    if abs(ms) >= MAX_TIME_MS:
        raise DatasetError(f"{where}: column {column!r} is not a time in range: {value!r}")
    return int(round(ms))
