"""``reloop backtest`` end to end on a generated MovieLens-format file with a tiny model."""

from __future__ import annotations

import argparse
import csv
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from reloop.connectors.files.datasets import open_dataset
from reloop.engine.metrics.offline import logloss
from reloop.engine.models.config import OptimizerConfig
from reloop.engine.replay.backtest import learner_options
from reloop.engine.replay.backtest_cmd import (
    configure,
    learner_settings,
    optimizer_items,
    protocol_optimizer_items,
)
from reloop.engine.replay.options import counted_fields, counted_windows
from reloop.engine.runtime.cli import main


def _movielens(d: Path, n: int = 600) -> Path:
    d.mkdir()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for i in range(n):
        user, item = i % 17, (i * 7) % 23
        rating = 5 if (user + item) % 3 == 0 else 2
        lines.append(f"{user}\t{item}\t{rating}\t{1_000_000 + (n - i) * 3_600}")  # newest first: not sorted
    (d / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    return d


def test_backtest_writes_csv_report_and_plots(tmp_path: Path) -> None:
    data = _movielens(tmp_path / "ml")
    out = tmp_path / "out"
    opts = "--period week --min-period-size 50 --backbones fm --alphas 0.5 --strategies ce,reloop --seeds 2"
    tiny = "--batch-size 64 --buckets 64 --embedding-dim 4"
    argv = ["backtest", "--dataset", "movielens-100k", *opts.split(" "), *tiny.split(" ")]
    argv += ["--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    keys = {(r["protocol"], r["backbone"], r["strategy"], r["seed"]) for r in rows}
    expected = {
        (p, "fm", s, str(seed))
        for p in ("periodic", "streaming")
        for s in ("ce", "reloop@0.5")
        for seed in (0, 1)
    }
    assert expected <= keys and ("streaming", "river_lr", "ce", "0") in keys
    periods = {int(r["period"]) for r in rows}
    assert 0 not in periods and len(periods) >= 3
    report = (out / "report.md").read_text()
    assert "## ReLoop verdicts" in report and "periodic · fm · reloop@0.5" in report
    import os

    # The machine it ran on, not "a shared 2-core machine" wherever it ran.
    assert f"on {len(os.sched_getaffinity(0))} cores, load " in report
    assert (out / "differences.png").exists() and (out / "movielens-100k_streaming_fm.png").exists()
    # --resume skips finished runs: the CSV does not grow
    assert main([*argv, "--resume"]) == 0
    with (out / "results.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def test_backtest_learner_options_and_report_periods(tmp_path: Path) -> None:
    data = _movielens(tmp_path / "ml")
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(data), "--out", str(out)]
    options = (
        "--period week --min-period-size 50 --backbones dcn --hidden-units 8 --strategies ce --seeds 1 "
        "--batch-size 64 --buckets 64 --embedding-dim 4 --protocols streaming --no-river "
        "--optimizer wide=bayes --optimizer wide_prior_variance=0.5 --optimizer embedding_lr=0.05 "
        "--replay-size 200 --report-from 3"
    )
    argv += options.split(" ")
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "Adagrad lr 0.05 on the embedding tables" in report
    assert "per-event Bayesian wide part (prior variance 0.5, moderated scores)" in report
    assert "replay buffer 200 samples" in report and "tables: periods 3 and later" in report
    with (out / "results.csv").open() as fh:
        assert min(int(r["period"]) for r in csv.DictReader(fh)) == 1  # the CSV keeps every period


def test_batches_by_time_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    opts = "--period week --min-period-size 50 --backbones fm --seeds 1 --protocols streaming --strategies ce"
    tiny = "--batch-size 64 --buckets 64 --embedding-dim 4 --batch-by time"
    argv = ["backtest", "--dataset", "movielens-100k", *opts.split(" "), *tiny.split(" ")]
    data = _movielens(tmp_path / "ml")
    assert main([*argv, "--data", str(data), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "batch 64, one per event time (the river peer too)" in report
    assert (
        "Adam lr 0.001 (dense); Adagrad lr 0.1 on the embedding tables "
        "(steps averaging under 256 samples: Adam lr 0.0003, 0.1 on the tables)" in report
    )
    with (out / "results.csv").open() as fh:
        assert {r["backbone"] for r in csv.DictReader(fh)} == {"fm", "river_lr"}
    with pytest.raises(SystemExit):
        main([*argv, "--batch-by", "rows", "--data", "x", "--out", str(out)])

    # Steps of one event time (at most 64 here) learn at the small-step rates: the same scores as with
    # them spelled out for every step, not the batch rates' (the rates reach the learner, not only the
    # report).
    def scores(rates: str, name: str) -> list[str]:
        folder = tmp_path / name
        assert main([*argv, "--no-river", *rates.split(), "--data", str(data), "--out", str(folder)]) == 0
        with (folder / "results.csv").open() as fh:
            return [r["auc"] + r["logloss"] for r in csv.DictReader(fh) if r["backbone"] == "fm"]

    with (out / "results.csv").open() as fh:
        default = [r["auc"] + r["logloss"] for r in csv.DictReader(fh) if r["backbone"] == "fm"]
    rule_off = "--optimizer small_steps_below=0"
    assert default == scores(f"{rule_off} --lr 3e-4 --optimizer embedding_lr=0.1", "spelled")
    assert default != scores(rule_off, "batch-rates")


def test_scores_from_published_snapshots_from_the_command_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from reloop.engine.replay import backtest_cmd

    opts = "--period week --min-period-size 50 --backbones fm --seeds 1 --protocols streaming --strategies ce"
    tiny = "--batch-size 64 --buckets 64 --embedding-dim 4"
    data = _movielens(tmp_path / "ml")
    argv = [
        "backtest",
        "--dataset",
        "movielens-100k",
        *opts.split(" "),
        *tiny.split(" "),
        "--data",
        str(data),
    ]

    def scores(folder: str, *extra: str) -> dict[str, list[str]]:
        assert main([*argv, *extra, "--out", str(tmp_path / folder)]) == 0
        with (tmp_path / folder / "results.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        return {b: [r["auc"] + r["logloss"] for r in rows if r["backbone"] == b] for b in ("fm", "river_lr")}

    live, daily = scores("live"), scores("daily", "--publish-every", "86400")
    # Ratings 1 h apart: served from a snapshot a day old, both the deep learner and the river peer score
    # differently from their live selves.
    assert (
        live["fm"]
        and live["river_lr"]
        and live["fm"] != daily["fm"]
        and live["river_lr"] != daily["river_lr"]
    )
    report = (tmp_path / "daily" / "report.md").read_text()
    assert "scored by the snapshot of the last multiple of 86400 s of event time" in report
    assert "scored by the snapshot" not in (tmp_path / "live" / "report.md").read_text()
    slow = scores("slow-peer", "--publish-every", "86400", "--river-lr", "0.01")
    assert slow["fm"] == daily["fm"] and slow["river_lr"] != daily["river_lr"]  # the peer's step, only its
    assert "the river peer's SGD step 0.01" in (tmp_path / "slow-peer" / "report.md").read_text()
    assert "SGD step" not in report
    for bad, message in (
        (["--river-lr", "0"], "expected a step > 0"),
        (["--publish-every", "-1"], "expected 0 or at least 0.001 seconds"),
        (["--publish-every", "60", "--memory", "n_tables=2"], "--memory scores with the live learner"),
    ):
        capsys.readouterr()
        assert main([*argv, *bad, "--out", str(tmp_path / "bad")]) == 2  # a message, not a traceback
        assert message in capsys.readouterr().err
    real = backtest_cmd.load_data
    monkeypatch.setattr(backtest_cmd, "load_data", lambda args: (real(args)[0], "pseudo"))
    assert main([*argv, "--publish-every", "60", "--out", str(tmp_path / "pseudo")]) == 2
    assert "has no event time" in capsys.readouterr().err


def test_the_periodic_protocol_learns_at_its_own_dense_rate_unless_one_is_given() -> None:
    """The learner's default dense rates were chosen for streaming; the periodic protocol keeps the rate
    chosen for it (--periodic-lr, 1e-3) unless --lr (or --optimizer lr=) names one for both."""
    base = ["--dataset", "d", "--data", "d", "--out", "d"]

    def rates(extra: list[str], protocol: str) -> tuple[float, float]:
        items = protocol_optimizer_items(_parse([*base, *extra]), protocol)
        opt = OptimizerConfig(**dict(items))
        return opt.effective_lr("deepfm"), opt.effective_lr("dcn")

    assert rates([], "streaming") == (4e-3, 2e-3) and rates([], "periodic") == (1e-3, 1e-3)
    assert rates(["--periodic-lr", "3e-3"], "periodic") == (3e-3, 3e-3)
    assert rates(["--lr", "5e-3"], "periodic") == rates(["--lr", "5e-3"], "streaming") == (5e-3, 5e-3)
    assert rates(["--optimizer", "lr=6e-3"], "periodic") == (6e-3, 6e-3)
    both = learner_settings(_parse(base))
    assert "Adam lr deepfm 0.004, dcn 0.002 (dense)" in both
    assert "(periodic protocol: Adam lr 0.001 (dense))" in both
    periodic = learner_settings(_parse([*base, "--protocols", "periodic"]))
    assert "Adam lr 0.001 (dense)" in periodic and "periodic protocol" not in periodic


def test_explicit_optimizer_settings_win_and_the_report_names_both_rate_sets() -> None:
    base = ["--dataset", "d", "--data", "d", "--out", "d"]

    def opt(extra: list[str]) -> OptimizerConfig:
        return OptimizerConfig(**dict(optimizer_items(_parse([*base, *extra]))))

    assert opt([]) == opt(["--batch-by", "time"]) == OptimizerConfig()
    mine = opt(["--lr", "2e-3", "--optimizer", "small_step_lr=1e-4", "--optimizer", "small_steps_below=64"])
    assert (mine.lr, mine.small_step_lr, mine.small_steps_below) == (2e-3, 1e-4, 64)
    assert mine.rates(63, "deepfm") == (1e-4, 0.1) and mine.rates(64, "deepfm") == (2e-3, 0.03)
    # The tables' default rate is the backbone's: named per backbone where they differ.
    assert "Adagrad lr deepfm 0.03, dcn 0.1 on the embedding tables" in learner_settings(_parse(base))
    assert "Adagrad lr 0.1 on the embedding tables" in learner_settings(_parse([*base, "--backbones", "dcn"]))
    # FTRL and river learners take none of it: the line said "per-event Bayesian wide part" for them too.
    wide = [*base, "--optimizer", "wide=bayes"]
    assert "wide part (prior variance 1, moderated scores);" in learner_settings(_parse(wide))
    line = learner_settings(_parse([*wide, "--backbones", "dcn,ftrl,river_fm"]))
    assert "(torch backbones; ftrl, river_fm: their own optimizer, no wide part)" in line
    line = learner_settings(_parse([*base, "--optimizer", "embedding_lr=0.2"]))
    assert "Adagrad lr 0.2 on the embedding tables" in line
    line = learner_settings(_parse([*base, "--optimizer", "embedding_optimizer=adam"]))
    assert (
        "Adam lr deepfm 0.004, dcn 0.002 (dense); SparseAdam lr deepfm 0.004, dcn 0.002 on the "
        "embedding tables (steps averaging " in line
    )
    # The dense rate too is the backbone's, and one rate where they share it.
    assert "Adam lr 0.001 (dense)" in learner_settings(_parse([*base, "--backbones", "wide_deep,fm"]))
    assert "(steps averaging" not in learner_settings(_parse([*base, "--optimizer", "small_steps_below=0"]))


def test_each_strategy_runs_its_own_alphas(tmp_path: Path) -> None:
    out = tmp_path / "out"
    opts = "--period week --min-period-size 50 --backbones fm --seeds 1 --protocols streaming --no-river"
    tiny = "--batch-size 64 --buckets 64 --embedding-dim 4"
    grid = ["--strategies", "ce,kd@0.5,reloop", "--alphas", "0.2,0.8"]
    argv = ["backtest", "--dataset", "movielens-100k", *opts.split(" "), *tiny.split(" "), *grid]
    assert main([*argv, "--data", str(_movielens(tmp_path / "ml")), "--out", str(out)]) == 0
    with (out / "results.csv").open() as fh:
        assert {r["strategy"] for r in csv.DictReader(fh)} == {"ce", "kd@0.5", "reloop@0.2", "reloop@0.8"}


def test_memory_and_label_noise_from_the_command_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    opts = "--period week --min-period-size 50 --backbones fm --seeds 1 --protocols streaming --no-river"
    tiny = "--batch-size 64 --buckets 64 --embedding-dim 4 --strategies ce"
    extra = ["--memory", "n_tables=2,n_bits=4,lams=0.1/0.5", "--label-noise", "0.1"]
    argv = ["backtest", "--dataset", "movielens-100k", *opts.split(" "), *tiny.split(" "), *extra]
    assert main([*argv, "--data", str(_movielens(tmp_path / "ml")), "--out", str(out)]) == 0
    # The "prepared" line gave the flipped labels' click rate as the data's.
    prepared = re.search(
        r"ctr (\S+) \((\S+) in the labels trained on, after --label-noise\)", capsys.readouterr().err
    )
    assert prepared and prepared[1] != prepared[2]
    with (out / "results.csv").open() as fh:
        strategies = {r["strategy"] for r in csv.DictReader(fh)}
    assert strategies == {"ce", "ce+mem2x4@0.1", "ce+mem2x4@0.5"}  # the base and one row per weight
    report = (out / "report.md").read_text()
    assert "error memory MemorySpec(n_tables=2, n_bits=4" in report
    assert "label noise: 10% of the training labels flipped" in report
    assert f"click rate {prepared[1]}," in report  # the header gave the flipped labels' rate too
    for bad, message in (("n_bitz=4", "n_bitz=4"), ("form=foo", "one of residual, label")):
        with pytest.raises(SystemExit):
            main([*argv, "--data", "x", "--out", str(out), "--memory", bad])
        assert message in capsys.readouterr().err


def test_a_bad_strategy_fails_before_the_data_is_read(tmp_path: Path, capsys) -> None:
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(tmp_path / "missing")]
    # a message (stderr, exit 2), not a traceback
    assert main([*argv, "--out", str(tmp_path / "out"), "--strategies", "ce,kd@half"]) == 2
    assert "kd@half" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--strategies", "--alphas", "--backbones", "--protocols"])
def test_an_empty_grid_fails_before_the_data_is_read(tmp_path: Path, capsys, option: str) -> None:
    # "--backbones ," made no run and failed reading the results it never wrote (a traceback); "--alphas
    # ''" dropped every strategy that needs one and ran the rest.
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(tmp_path / "missing")]
    assert main([*argv, "--out", str(tmp_path / "out"), option, " , "]) == 2
    assert f"{option}: expected comma-separated values, got ' , '" in capsys.readouterr().err


def test_an_output_folder_that_is_a_file_fails_at_parse_time(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(tmp_path / "missing")]
    for out, why in (
        (tmp_path / "file", "is a file, expected a folder"),
        (tmp_path / "file" / "x", "is a file, so"),
    ):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--out", str(out)])
        assert (
            stop.value.code == 2 and f"argument --out: '{tmp_path / 'file'}' {why}" in capsys.readouterr().err
        )


def test_a_bad_model_option_fails_before_the_data_is_read(tmp_path: Path, capsys) -> None:
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(tmp_path / "missing")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--backbones", "fm,dcn", "--embedding-dim", "0"]) == 2
    assert "backbone 'fm': bad config: embedding_dim" in capsys.readouterr().err


def test_each_backbone_takes_the_model_options_it_has() -> None:
    options = (("embedding_dim", 4), ("hidden_units", (8,)))
    assert learner_options("dcn", options) == {"embedding_dim": 4, "hidden_units": (8,)}
    assert learner_options("fm", options) == {"embedding_dim": 4}  # no MLP to size
    # LR's and FTRL's table has one column whatever the run's dimension (their configs pin it to 1)
    assert learner_options("lr", options) == {} and learner_options("ftrl", options) == {}


def test_one_run_trains_linear_and_deep_backbones_at_its_embedding_dim(tmp_path: Path) -> None:
    # Before: LR's config refused the run's --embedding-dim 4 at its first run, after the runs before it.
    out = tmp_path / "out"
    argv = [
        "backtest",
        "--dataset",
        "movielens-100k",
        "--data",
        str(_movielens(tmp_path / "ml")),
        "--out",
        str(out),
    ]
    options = (
        "--period week --min-period-size 50 --backbones fm,lr,ftrl --hidden-units 8 --strategies ce "
        "--seeds 1 --batch-size 64 --buckets 64 --embedding-dim 4 --protocols streaming --no-river"
    )
    assert main([*argv, *options.split(" ")]) == 0
    with (out / "results.csv").open() as fh:
        assert {r["backbone"] for r in csv.DictReader(fh)} == {"fm", "lr", "ftrl"}


def _noise_log(path: Path, n: int = 3000) -> np.ndarray:
    """An impression log whose clicks are coin flips (p = 0.3), independent of every feature."""
    rng = np.random.default_rng(0)
    labels = (rng.random(n) < 0.3).astype(int)
    lines = ["timestamp,user_id,item_id,genre,click"]
    for i in range(n):
        user, item, genre = rng.integers(50), rng.integers(80), rng.integers(6)
        lines.append(f"{1_700_000_000_000 + i * 60_000},u{user},i{item},g{genre},{labels[i]}")
    path.write_text("\n".join(lines) + "\n")
    return labels


def test_a_log_with_no_signal_gives_no_wins(tmp_path: Path) -> None:
    """Coin-flip clicks: the premise, checked first, is that a constant predictor (the click rate of
    the earlier periods) has a better LogLoss than every model in every period; with nothing to learn,
    no verdict may read "wins". An end-to-end guard only: on this log ReLoop at 0.5 ties on AUC and
    loses on LogLoss under the old over-seeds-only rule as well; the rule itself (both intervals,
    at least 3 seeds) is tested on the Comparison object in test_report.py."""
    labels = _noise_log(tmp_path / "noise.csv")
    out = tmp_path / "out"
    options = (
        "--period chunks:6 --backbones fm --strategies ce,reloop --alphas 0.5 --seeds 3 "
        "--protocols streaming --no-river --batch-size 64 --buckets 256 --embedding-dim 4 "
        # (the log's user and item counters, on by default, carry the running click rate: a model
        # with them can match the constant's LogLoss on noise, which is not the premise's point)
        "--counters none"
    )
    data = ["--dataset", "impression-log", "--data", str(tmp_path / "noise.csv")]
    assert main(["backtest", *data, "--out", str(out), *options.split(" ")]) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    bounds = [round(i * len(labels) / 6) for i in range(7)]
    for t in range(1, 6):
        y = labels[bounds[t] : bounds[t + 1]]
        constant = logloss(y, np.full(len(y), labels[: bounds[t]].mean()))
        models = [float(r["logloss"]) for r in rows if int(r["period"]) == t]
        assert len(models) == 6 and constant < min(models), t  # the premise: nothing to learn
    report = (out / "report.md").read_text()
    verdicts = report.split("## ReLoop verdicts")[1].split("##")[0]
    assert "reloop@0.5: auc" in verdicts and "wins" not in verdicts
    assert "| wins" not in report and "wins /" not in report and "/ wins" not in report


DOCS = Path(__file__).resolve().parents[3] / "docs" / "backtest"
# The four reports docs/backtest/README.md presents as the learner defaults' results (with the datasets'
# own click counters, the default since 2026-12-06).
DOCUMENTED = (
    "counters/movielens-streaming-cross",
    "counters/movielens-periodic-cross",
    "counters/frappe-streaming",
    "counters/frappe-periodic",
)
LEARNER = ("y_last", "batch_size", "lr", "optimizer", "replay_size", "embedding_dim", "hidden_units")
LEARNER += ("buckets",)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_cli_defaults_are_the_settings_the_documented_reports_used(name: str) -> None:
    report = (DOCS / name / "report.md").read_text()
    match = re.search(r"^Command: `reloop backtest (.+?)`", report, re.M)
    assert match, name
    used = _parse(shlex.split(match.group(1)))
    defaults = _parse(["--dataset", "d", "--data", "d", "--out", "d"])
    assert {k: getattr(defaults, k) for k in LEARNER} == {k: getattr(used, k) for k in LEARNER}
    # the counters it spelled out are what --counters auto counts on its dataset
    declared = open_dataset(used.dataset, "unread").counters
    counted = [counted_fields(a, declared) for a in (defaults, used)]
    assert counted[0] == counted[1] != []
    assert counted_windows(defaults, counted[0]) == counted_windows(used, counted[1])
    assert defaults.counter_prior == used.counter_prior
    defaults.counted = (counted[0], counted_windows(defaults, counted[0]))
    # The settings line the report printed (the optimizer's own defaults included) is the defaults' line;
    # epochs matter to the periodic protocol only (a streaming report printed the default of its day).
    printed = next(line for line in report.splitlines() if line.startswith("- y_last:"))
    epochs = int(re.search(r"\(periodic\): (\d+);", printed).group(1))
    if used.protocols == "periodic":
        assert defaults.epochs == used.epochs == epochs
    # (the dense rate differs by protocol: the line names the report's, --periodic-lr for periodic)
    shown = argparse.Namespace(**{**vars(defaults), "epochs": epochs, "protocols": used.protocols})
    assert printed == f"- {learner_settings(shown)}"


def test_run_and_the_backtest_step_on_batches_of_the_same_size_by_default() -> None:
    """The backtests' learner tables (docs/backtest/) are what `reloop run` does by default: 512, chosen on
    their selection periods over 1024 (docs/operations.md)."""
    from reloop.engine.runtime.config import TrainSection
    from reloop.engine.train.stream import StreamTrainerConfig

    backtest = _parse(["--dataset", "d", "--data", "d", "--out", "d"])
    assert TrainSection().batch_size == StreamTrainerConfig().batch_size == backtest.batch_size == 512


@pytest.mark.parametrize("cut", ["mid_row", "mid_run"])
def test_a_resume_after_a_run_cut_short_while_written_makes_that_run_again(tmp_path: Path, cut: str) -> None:
    # The process killed while it appended a run's rows: --resume took the run for finished with the
    # periods it had (a report without the rest, silently), or failed on the torn last line.
    data = _movielens(tmp_path / "ml")
    out = tmp_path / "out"
    opts = "--period week --min-period-size 50 --backbones fm --strategies ce --seeds 2 --protocols streaming"
    tiny = "--batch-size 64 --buckets 64 --embedding-dim 4 --no-river"
    argv = ["backtest", "--dataset", "movielens-100k", *opts.split(" "), *tiny.split(" ")]
    argv += ["--data", str(data), "--out", str(out)]
    assert main(argv) == 0
    path = out / "results.csv"
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    assert len(lines) > 4
    # the last run's rows written up to the middle of its second row (or of its last one)
    kept = lines[:-2] if cut == "mid_run" else lines[:-1]
    path.write_bytes(b"".join(kept) + lines[len(kept)][: len(lines[len(kept)]) // 2])
    assert main([*argv, "--resume"]) == 0

    def rows(data: bytes) -> list[tuple]:
        return sorted(
            (r["strategy"], r["seed"], r["period"], r["n"], r["auc"])
            for r in csv.DictReader(data.decode().splitlines())
        )

    assert rows(path.read_bytes()) == rows(whole)


def test_click_counters_from_the_command_line(tmp_path: Path, capsys) -> None:
    data = _movielens(tmp_path / "ml")
    opts = "--period week --min-period-size 50 --seeds 1 --protocols streaming --strategies ce --no-river"
    tiny = "--batch-size 64 --buckets 64 --embedding-dim 4 --hidden-units 8"
    argv = ["backtest", "--dataset", "movielens-100k", *opts.split(), *tiny.split(), "--data", str(data)]

    def scores(name: str, *extra: str) -> dict[str, list[str]]:
        folder = tmp_path / name
        assert main([*argv, "--backbones", "dcn,fm,lr,ftrl", *extra, "--out", str(folder)]) == 0
        with (folder / "results.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        return {b: [r["auc"] for r in rows if r["backbone"] == b] for b in ("dcn", "fm", "lr", "ftrl")}

    counted = scores(
        "counted", "--counters", "user_id,item_id", "--counter-prior", "3", "--counter-windows", "7200"
    )
    plain = scores("plain", "--counters", "none")
    # every backbone reads the counters' inputs: none scores as it does without them
    assert all(counted[b] != plain[b] for b in plain), (counted, plain)
    report = (tmp_path / "counted" / "report.md").read_text()
    line = (
        "click counters of user_id, item_id (prior strength 3, also forgetting in 7200 s; not the river peer)"
    )
    assert line in report
    assert "; no click counters" in (tmp_path / "plain" / "report.md").read_text()
    # By default the dataset's own counters, with the window chosen on the selection weeks: the same
    # scores as those settings spelled out.
    chosen = ("--counters", "user_id,item_id,user_id*genres", "--counter-windows", "600")
    assert scores("default") == scores("spelled", *chosen) != plain
    line = "click counters of user_id, item_id, user_id*genres (prior strength 5, also forgetting in 600 s;"
    assert line in (tmp_path / "default" / "report.md").read_text()
    assert scores("lifetime", "--counter-windows", "none") not in (plain, counted, scores("default"))
    # a field the spec lacks, or a strength that is not one, fails with the option's name
    assert main([*argv, "--counters", "user_id,genre", "--out", str(tmp_path / "bad")]) == 2
    assert (
        "--counters / --counter-prior / --counter-windows: counters: 'genre' is not a categorical field"
        in capsys.readouterr().err
    )
    assert main([*argv, "--counters", "user_id", "--counter-prior", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--counter-prior: expected a strength > 0, got 0" in capsys.readouterr().err
    bad = ["--counters", "none", "--counter-windows", "600", "--out", str(tmp_path / "bad")]
    assert main([*argv, *bad]) == 2
    assert "--counter-windows: windows of no counters; give --counters" in capsys.readouterr().err
    assert main([*argv, "--counter-windows", "ten", "--out", str(tmp_path / "bad")]) == 2
    assert "--counter-windows: expected seconds, auto or none, got 'ten'" in capsys.readouterr().err
    assert main([*argv, "--counters", "", "--out", str(tmp_path / "bad")]) == 2
    assert "--counters: empty; give names, auto or none" in capsys.readouterr().err
    assert main([*argv, "--counters", "none,user_id", "--out", str(tmp_path / "bad")]) == 2
    assert "--counters: auto and none stand alone, got 'none,user_id'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert (
        main([*argv, "--counters", "user_id", "--counter-windows", "0", "--out", str(tmp_path / "bad")]) == 2
    )
    assert "windows must be distinct and > 0 seconds" in capsys.readouterr().err


def test_y_last_takes_the_name_the_config_and_replay_use(tmp_path: Path) -> None:
    # --y-last snapshot (train.y_last's and `reloop replay --y-last`'s name) was refused by the backtest.
    base = ["--dataset", "movielens-100k", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert _parse([*base, "--y-last", "snapshot"]).y_last == "recomputed"
    assert _parse([*base, "--y-last", "logged"]).y_last == "logged"
    with pytest.raises(SystemExit):
        _parse([*base, "--y-last", "live"])
