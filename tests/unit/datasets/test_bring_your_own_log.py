"""docs/bring-your-own-log.md's worked example, run as written: its CSV, its Python lines and its
`reloop backtest` command (a 12-row file: two tiny runs of a small FM)."""

from __future__ import annotations

import csv
import os
import re
import shlex
from pathlib import Path

import pytest
from reloop.connectors.files.datasets import ImpressionLog

DOC = Path(__file__).resolve().parents[3] / "docs" / "bring-your-own-log.md"


def _block(lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, f"expected one ```{lang} block in {DOC.name}"
    return blocks[0]


@pytest.fixture()
def ratings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ratings.csv"
    path.write_text(_block("csv"))
    return path


def test_the_documented_loader_calls_give_what_the_page_says(ratings: Path) -> None:
    namespace: dict = {}
    code = _block("python")
    exec(compile(code, str(DOC), "exec"), namespace)  # the page's own lines, against the page's own file
    log = namespace["log"]
    assert isinstance(log, ImpressionLog) and log.name == "ratings"
    assert {f.name: f.kind for f in log.fields} == {
        "user_id": "categorical", "item_id": "categorical", "genre": "categorical", "age": "numeric",
    }  # fmt: skip
    rows = list(log.rows())
    assert len(rows) == 12 and sum(r.label for r in rows) == 6
    assert rows[0].label == 1 and rows[0].features["user_id"] == "u1" and rows[0].features["item_id"] == "i1"
    assert all("rating" not in r.features and "time" not in r.features for r in rows)
    assert rows[-1].event_time_ms - rows[0].event_time_ms == (24 + 2.5) * 3_600_000


def _command() -> list[str]:
    text = _block("bash").replace("\\\n", " ")
    argv = shlex.split(text)
    assert argv[:2] == ["reloop", "backtest"]
    return argv[1:]


@pytest.fixture(scope="module")
def backtest_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documented command, run once in a folder holding the documented ratings.csv."""
    from reloop.engine.runtime.cli import main

    folder = tmp_path_factory.mktemp("byol")
    (folder / "ratings.csv").write_text(_block("csv"))
    argv = _command()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(argv) == 0
    finally:
        os.chdir(cwd)
    return folder / argv[argv.index("--out") + 1]


def _results(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_the_documented_backtest_runs(backtest_out: Path) -> None:
    results = _results(backtest_out)
    # One evaluated period (the second day; the first is warm-up) for CE and ReLoop, 6 samples each.
    assert sorted(r["strategy"] for r in results) == ["ce", "reloop@0.5"]
    assert {(r["period"], r["n"], r["ctr"]) for r in results} == {("1", "6", "0.5")}
    assert (backtest_out / "report.md").is_file()


def test_the_backtest_carries_the_datasets_own_name(backtest_out: Path) -> None:
    assert {r["dataset"] for r in _results(backtest_out)} == {"ratings"}
    assert (backtest_out / "report.md").read_text().startswith("# Backtest: ratings")


def test_the_page_s_log_replays_with_the_same_loader_options(ratings: Path, tmp_path: Path) -> None:
    # The page says replay reads such a log, but replay took no --dataset-option: no time_column, so no
    # log but one with a "timestamp" column could be replayed.
    import orjson
    from reloop.engine.runtime.cli import main

    options = re.findall(r'--dataset-option ("[^"]+"|\S+)', _block("bash"))
    argv = ["replay", "--dataset", "impression-log", "--data", str(ratings), "--out", str(tmp_path / "r")]
    for option in options:
        argv += ["--dataset-option", option.strip('"')]
    argv += ["--backbone", "fm", "--batch-size", "4"]
    assert len(options) == 3 and main(argv) == 0
    summary = orjson.loads((tmp_path / "r" / "summary.json").read_bytes())
    assert summary["samples_trained"] == 12 and summary["join"]["positives"] == 6
    assert not summary["dead_letters"]
    assert main([*argv[:5], "--dataset-option", "nope=1", "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.parametrize("command", ["backtest", "replay"])
def test_y_last_logged_says_how_many_rows_logged_no_prediction(tmp_path: Path, capsys, command: str) -> None:
    # It used the running click rate as y_last for every row of a log without served_prediction, and the
    # report said `y_last: logged` as though a production model's predictions had been read.
    from reloop.engine.runtime.cli import main

    path = tmp_path / "log.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "user_id", "item_id", "click", "served_prediction", "model_version"])
        for i in range(40):
            logged = i % 4 != 0  # every fourth row logged no prediction
            w.writerow(
                [i * 3_600_000, f"u{i % 3}", f"i{i % 5}", i % 2, 0.3 if logged else "", 1 if logged else ""]
            )
    argv = [command, "--dataset", "impression-log", "--data", str(path), "--out", str(tmp_path / "o")]
    if command == "backtest":
        argv += ["--backbones", "lr", "--no-river", "--seeds", "1", "--period", "chunks:2", "--y-last"]
    else:
        argv += ["--backbone", "lr", "--batch-size", "4", "--y-last"]
    assert main([*argv, "logged"]) == 0
    assert "10 of 40 rows have no served_prediction" in capsys.readouterr().err
    assert (
        main(
            [
                *argv[:-1],
                "--out",
                str(tmp_path / "o2"),
                argv[-1],
                "snapshot" if command == "replay" else "recomputed",
            ]
        )
        == 0
    )
    assert "no served_prediction" not in capsys.readouterr().err  # y_last not the logged one: nothing to say
