"""``results.csv`` of a backtest written by another reloop version (other columns): ``--resume`` is refused
instead of appending this version's rows under the other header (values read under the wrong names)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from reloop.engine.replay.report import CSV_COLUMNS, read_csv, write_csv
from reloop.engine.runtime.cli import main

from .test_backtest_cmd import _movielens
from .test_backtest_inputs import TINY

ROW = {
    "dataset": "d", "protocol": "streaming", "backbone": "fm", "strategy": "ce", "loss": "ce", "alpha": 0.0,
    "seed": 0, "period": 1, "n": 50, "ctr": 0.25, "auc": 0.75, "logloss": 0.5, "sc_active": 0.0,
}  # fmt: skip


def _with_a_new_column(path: Path) -> list[str]:
    """Rewrite the CSV at ``path`` as a newer reloop would have: a column inserted before ``auc``."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = list(CSV_COLUMNS)
    columns.insert(columns.index("auc"), "auc_calibrated")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "auc_calibrated": "0.9"})
    return columns


def test_rows_are_not_appended_under_the_header_of_another_version(tmp_path):
    path = tmp_path / "results.csv"
    write_csv([ROW], path)
    columns = _with_a_new_column(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="auc_calibrated") as caught:
        write_csv([{**ROW, "seed": 1}], path, append=True)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before
    assert [r["auc"] for r in read_csv(path)] == [0.75] and columns[
        columns.index("auc") - 1
    ] == "auc_calibrated"


def test_an_empty_results_file_gets_its_header_when_appended_to(tmp_path):
    # A kill after the file was created and before its first write left it empty: the rows appended then
    # had no header, and the first of them was read as one.
    path = tmp_path / "results.csv"
    path.touch()
    write_csv([ROW], path, append=True)
    assert [(r["seed"], r["auc"]) for r in read_csv(path)] == [(0, 0.75)]


def test_a_resume_over_results_of_another_version_is_refused(tmp_path, capsys):
    data = _movielens(tmp_path / "ml")
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(data), "--out", str(out), *TINY]
    argv += ["--backbones", "fm", "--strategies", "ce", "--no-river", "--max-rows", "400"]
    assert main(argv) == 0
    _with_a_new_column(out / "results.csv")
    before = (out / "results.csv").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--seeds", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "auc_calibrated" in err and "Traceback" not in err, err
    assert (out / "results.csv").read_bytes() == before
