"""Figure 9's train-stage rates in the whole loop, read from the stages' progress lines."""

from __future__ import annotations

import orjson
from reloop.bench.suite_stages import train_rates


def _progress(ts: float, stage: str, **fields: object) -> str:
    return orjson.dumps({"ts": ts, "level": "INFO", "msg": "progress", "stage": stage, **fields}).decode()


def _log(train: list[tuple[float, int, int | None]], join: list[tuple[float, int]]) -> str:
    lines = [(ts, _progress(ts, "train", version=v, samples_trained=n)) for ts, n, v in train]
    lines += [(ts, _progress(ts, "join", samples_sent=n)) for ts, n in join]
    lines.append((0.0, orjson.dumps({"ts": 0.0, "msg": "started", "stage": "join"}).decode()))
    return "\n".join(text for _, text in sorted(lines))


def test_the_windows_split_where_the_join_stage_has_sent_everything():
    join = [(1.0, 1_000), (2.0, 3_000), (3.0, 5_000), (4.0, 5_000), (5.0, 5_000)]
    train = [(1.2, 0, None), (1.7, 512, None), (2.7, 2_560, None), (3.0, 3_584, None), (3.7, 4_608, None),
             (4.2, 4_900, None), (4.7, 5_000, 1)]  # fmt: skip
    busy, after = train_rates(_log(train, join))
    # While busy: from the first line with samples trained (1.7) to the last at or before 3.0, when the
    # join stage was done; after: from there to the last line before the snapshot (version 1).
    assert busy == (3_584 - 512) / (3.0 - 1.7)
    assert after == (4_900 - 3_584) / (4.2 - 3.0)


def test_no_rate_for_a_window_of_fewer_than_two_lines():
    join = [(1.0, 5_000), (2.0, 5_000)]
    # The join stage was done before the train stage trained twice: no busy window; after it, one.
    train = [(0.9, 100, None), (1.5, 2_000, None), (2.5, 5_000, None)]
    assert train_rates(_log(train, join)) == (None, (5_000 - 100) / (2.5 - 0.9))
    assert train_rates(_log([(1.5, 2_000, None)], join)) == (None, None)
    assert train_rates(_log([], join)) == (None, None)
    assert train_rates(_log(train, [])) == (None, None)
