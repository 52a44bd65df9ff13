"""MovieLens-100K in RecBole's atomic files (``ml-100k.inter``, ``.user``, ``.item``).

One impression per rating at its timestamp, click = rating >= ``click_threshold`` (4 by default).
The ratings file is not time-sorted: rows are sorted by (timestamp, file line), a stable order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reloop.connectors.files.datasets._text import parse_float, parse_time_ms, read_lines, refuse_empty
from reloop.connectors.files.datasets.base import DatasetError, DatasetRow, FieldInfo, TimeKind

FIELDS: tuple[FieldInfo, ...] = (
    FieldInfo("user_id", "categorical"),
    FieldInfo("item_id", "categorical"),
    FieldInfo("age", "categorical"),
    FieldInfo("gender", "categorical"),
    FieldInfo("occupation", "categorical"),
    FieldInfo("zip_prefix", "categorical"),
    FieldInfo("release_year", "categorical"),
    FieldInfo("genres", "multi"),
)


def _header_index(header: str, path: Path, wanted: list[str]) -> list[int]:
    # RecBole headers look like "user_id:token"; match on the name before the colon.
    names = [col.split(":", 1)[0] for col in header.split("\t")]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise DatasetError(f"{path}: header lacks columns {missing} (has {names})")
    return [names.index(w) for w in wanted]


def _table(path: Path, key: str, columns: list[str]) -> dict[str, list[str]]:
    lines = read_lines(path)
    try:
        _, header = next(lines)
    except StopIteration:
        raise DatasetError(f"{path}: empty file") from None
    idx = _header_index(header, path, [key, *columns])
    out: dict[str, list[str]] = {}
    for number, line in lines:
        parts = line.split("\t")
        if len(parts) <= max(idx):
            raise DatasetError(f"{path}:{number}: expected at least {max(idx) + 1} columns, got {len(parts)}")
        out[parts[idx[0]]] = [parts[i] for i in idx[1:]]
    return out


@dataclass(frozen=True)
class MovieLens100K:
    """``path`` is the folder holding ``ml-100k.inter`` (user and item files are optional)."""

    path: Path
    click_threshold: float = 4.0
    prefix: str = "ml-100k"
    name: str = "movielens-100k"
    time_kind: TimeKind = "event"

    @property
    def fields(self) -> tuple[FieldInfo, ...]:
        return FIELDS

    @property
    def counters(self) -> tuple[str, ...]:
        # A user's rate, an item's, and the user's on the item's genres: chosen on weeks 1-10 over the
        # first two alone, and over more crosses (docs/backtest/ablation.md).
        return ("user_id", "item_id", "user_id*genres")

    def _ratings(self) -> list[tuple[int, int, str, str, float]]:
        path = Path(self.path) / f"{self.prefix}.inter"
        lines = read_lines(path)
        try:
            _, header = next(lines)
        except StopIteration:
            raise DatasetError(f"{path}: empty file") from None
        iu, ii, ir, it = _header_index(header, path, ["user_id", "item_id", "rating", "timestamp"])
        out = []
        for number, line in lines:
            parts = line.split("\t")
            if len(parts) <= max(iu, ii, ir, it):
                raise DatasetError(f"{path}:{number}: expected 4 columns, got {len(parts)}")
            t_ms = parse_time_ms(parts[it], path, number, "timestamp", 1000)
            rating = parse_float(parts[ir], path, number, "rating")
            out.append((t_ms, number, parts[iu], parts[ii], rating))
        out.sort(key=lambda r: (r[0], r[1]))
        return out

    def rows(self) -> Iterator[DatasetRow]:
        return refuse_empty(self._rows(), str(Path(self.path) / f"{self.prefix}.inter"))

    def _rows(self) -> Iterator[DatasetRow]:
        base = Path(self.path)
        user_path, item_path = base / f"{self.prefix}.user", base / f"{self.prefix}.item"
        users = (
            _table(user_path, "user_id", ["age", "gender", "occupation", "zip_code"])
            if user_path.is_file()
            else {}
        )
        items = _table(item_path, "item_id", ["release_year", "class"]) if item_path.is_file() else {}
        for t_ms, number, user, item, rating in self._ratings():
            features: dict = {"user_id": user, "item_id": item}
            if (u := users.get(user)) is not None:
                age, gender, occupation, zip_code = u
                features.update(age=age, gender=gender, occupation=occupation, zip_prefix=zip_code[:2])
            if (it := items.get(item)) is not None:
                year, genres = it
                if year:
                    features["release_year"] = year
                features["genres"] = genres.split() if genres else []
            row_id = f"ml100k-{number}"
            yield DatasetRow(
                row_id=row_id,
                request_id=row_id,
                user_id=user,
                item_id=item,
                event_time_ms=t_ms,
                features=features,
                label=int(rating >= self.click_threshold),
            )
