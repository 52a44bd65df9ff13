"""The ReLoop2 report's command (docs/backtest/reloop2/report.md) end to end on a generated MovieLens-format
file: it built the backtest's options by hand and failed before reading any data once load_data read an
option added since (``y_last``)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from reloop.bench import reloop2_backtest


def _movielens(d: Path, n: int, spacing_s: int) -> Path:
    d.mkdir()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for i in range(n):
        user, item = i % 17, (i * 7) % 23
        rating = 5 if (user + item) % 3 == 0 else 2
        lines.append(f"{user}\t{item}\t{rating}\t{1_000_000 + (n - i) * spacing_s}")
    (d / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    return d


def test_the_reports_command_runs_and_reports_the_held_out_periods(tmp_path):
    data = _movielens(tmp_path / "ml", 3000, 700)  # 500-row weeks: 4 periods
    out = tmp_path / "out"
    argv = ["--data", str(data), "--out", str(out), "--backbones", "dcn", "--seeds", "2"]
    assert reloop2_backtest.main([*argv, "--no-with-reloop", "--select-until", "1"]) == 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["backbone"], r["strategy"], r["base"]) for r in rows} == {
        ("dcn", "ce", "live"),
        ("dcn", "ce", "snapshot"),
    }
    with open(out / "results.csv") as f:
        periods = {int(r["period"]) for r in csv.DictReader(f)}
    assert max(periods) >= 2  # something past the selection periods to report on
    assert "| dcn | ce | snapshot |" in (out / "summary.md").read_text()


def test_too_few_periods_for_the_selection_is_said(tmp_path):
    data = _movielens(tmp_path / "ml", 600, 700)
    with pytest.raises(SystemExit, match="leaves none to report on"):
        reloop2_backtest.main(["--data", str(data), "--out", str(tmp_path / "out"), "--backbones", "dcn",
                               "--seeds", "1", "--no-with-reloop", "--select-until", "2"])  # fmt: skip
