"""``reloop backtest``: bad inputs fail before the data is read, with one line and exit 2; the report of
memory rows, of a river_lr learner, of one seed, and of ``--report-only``."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from reloop.engine.replay import backtest_cmd
from reloop.engine.replay.backtest import RunSpec, Strategy, run_streaming, stream_batches
from reloop.engine.runtime.cli import main

from .test_backtest_cmd import _movielens

TINY = [
    *("--period", "week", "--min-period-size", "50", "--seeds", "1", "--protocols", "streaming"),
    *("--batch-size", "64", "--buckets", "64", "--embedding-dim", "4", "--hidden-units", "8"),
]


def _code(argv: list[str]) -> int:
    """The exit status, whether the parser (SystemExit) or the command (return value) gives it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


BAD = [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-64"], "--batch-size"),
    (["--period", "chunks:0"], "--period"),
    (["--period", "hours:0"], "--period"),
    (["--period", "week:2"], "--period"),
    (["--protocols", "streaming,bogus"], "--protocols"),
    (["--alphas", "1.5"], "kd@1.5"),
    (["--alphas=-0.5"], "kd@-0.5"),
    (["--optimizer", "foo=1"], "foo"),
    (["--optimizer", "wide=bogus"], "wide"),
    (["--periodic-lr", "-1", "--protocols", "periodic"], "lr"),
    (["--replay-size", "-5"], "--replay-size"),
    (["--epochs", "0", "--protocols", "periodic"], "--epochs"),  # trained nothing, exit 0
    (["--replay-ratio", "-1"], "--replay-ratio"),
    (["--buckets", "0"], "--buckets"),
    (["--seeds", "0"], "--seeds"),
    (["--hidden-units", "8,x"], "--hidden-units"),
    (["--max-rows=-1"], "--max-rows"),  # every row, silently
    (["--workers=-3"], "--workers"),
    (["--min-period-size=-1"], "--min-period-size"),
    (["--dataset", "nosuch"], "unknown dataset 'nosuch'"),
    # it said only "__init__() got an unexpected keyword argument": now the options the loader takes
    (
        ["--dataset-option", "foo=1"],
        "--dataset-option: dataset 'movielens-100k' takes no option 'foo' (it takes: click",
    ),
    # values of the wrong type failed inside the loader in its words, or were taken (time_kind=bogus)
    (
        ["--dataset-option", "click_threshold=abc"],
        "option click_threshold='abc': Input should be a valid number",
    ),
    (
        ["--dataset-option", "time_kind=bogus"],
        "option time_kind='bogus': Input should be 'event' or 'pseudo'",
    ),
    (["--report-only"], "--report-only"),
    (["--backbones", "fm,ftrl", "--memory", "n_tables=2,n_bits=4"], "--memory: backbone 'ftrl'"),
    (["--backbones", "fm,river_lr"], "--no-river"),
    (["--backbones", "fm,nosuch"], "reloop backtest: --backbones: unknown backbone 'nosuch'"),
    # streaming options without the streaming protocol steered only the river peer
    (["--protocols", "periodic", "--batch-by", "time"], "--batch-by"),
    (["--protocols", "periodic", "--publish-every", "3600"], "--publish-every"),
    (["--protocols", "periodic", "--replay-size", "64", "--memory", "n_bits=4"], "--replay-size, --memory"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(e) for e, _ in BAD])
def test_a_bad_input_fails_in_one_line_before_the_data_is_read(
    tmp_path: Path, monkeypatch, capsys, extra: list[str], message: str
) -> None:
    def never(*_: object, **__: object) -> None:
        raise AssertionError("the data was read")

    monkeypatch.setattr(backtest_cmd, "prepare", never)
    monkeypatch.setattr(backtest_cmd, "run_one", never)
    data = _movielens(tmp_path / "ml")
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(data), "--out", str(tmp_path / "out")]
    argv += [*TINY, "--backbones", "fm", "--strategies", "ce,kd,reloop", *extra]
    assert _code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("reloop backtest:")


def test_what_only_the_data_can_refuse_is_refused_in_one_line_and_keeps_earlier_results(
    tmp_path: Path, capsys
) -> None:
    data = _movielens(tmp_path / "ml")
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--out", str(out), *TINY, "--backbones", "fm"]
    argv += ["--strategies", "ce", "--no-river"]
    assert main([*argv, "--data", str(data)]) == 0
    before = (out / "results.csv").read_text()
    for extra, message in (
        (["--data", str(tmp_path / "nonexistent")], "dataset file not found"),
        (["--data", str(data), "--period", "chunks:100000"], "--period chunks:100000"),
        # one publishing interval holds every row: each would be scored by the untrained model
        (["--data", str(data), "--publish-every", str(3650 * 86_400)], "from the untrained model"),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert (out / "results.csv").read_text() == before  # a refused run deletes nothing


def test_reported_rows_scored_by_the_untrained_model_are_counted_in_a_warning(tmp_path: Path, capsys) -> None:
    data = _movielens(tmp_path / "ml")  # one row an hour over 25 days
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(data), "--out", str(tmp_path / "out")]
    argv += [*TINY, "--backbones", "fm", "--strategies", "ce", "--no-river"]
    assert main([*argv, "--publish-every", "86400"]) == 0
    assert "untrained" not in capsys.readouterr().err  # the first day is warm-up
    assert main([*argv, "--publish-every", str(30 * 86_400)]) == 0
    err = capsys.readouterr().err
    assert "rows of the reported periods fall in the data's first publishing interval" in err, err


def test_a_batch_size_below_one_is_refused_not_an_empty_stream() -> None:
    # Before: range(0, n, -1) gave no batch, and the scores were np.empty's leftovers.
    times = np.arange(10)
    for by in ("count", "time"):
        with pytest.raises(ValueError, match="batch size"):
            list(stream_batches(times, -1, by))
        with pytest.raises(ValueError, match="batch size"):
            list(stream_batches(times, 0, by))


def test_an_error_memory_on_a_backbone_without_a_hidden_layer_fails_before_the_first_batch() -> None:
    from reloop.engine.memory.stream_eval import MemorySpec

    class NoHidden:
        def predict_proba(self, batch: object) -> np.ndarray:
            raise AssertionError("scored a batch")

        learn = predict_proba

    run = RunSpec("streaming", "ftrl", Strategy("ce"), 0, memory=(MemorySpec(n_tables=2, n_bits=4),))
    with pytest.raises(ValueError, match="'ftrl'"):
        run_streaming(SimpleNamespace(spec=None), run, lambda *_: NoHidden())  # type: ignore[arg-type]


def test_a_river_lr_learner_without_the_peer_is_reported_as_a_learner(tmp_path: Path) -> None:
    # Before: its rows were taken for the peer's: dropped from the plots, the others paired against it.
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(_movielens(tmp_path / "ml"))]
    argv += ["--out", str(out), *TINY, "--backbones", "fm,river_lr", "--strategies", "ce", "--no-river"]
    assert main(argv) == 0
    with (out / "results.csv").open() as fh:
        assert {r["backbone"] for r in csv.DictReader(fh)} == {"fm", "river_lr"}
    report = (out / "report.md").read_text()
    assert "#### movielens-100k · streaming · river_lr" in report and "vs river" not in report
    assert (out / "movielens-100k_streaming_river_lr.png").exists()


def test_one_seed_verdicts_say_n_a_and_report_only_keeps_the_runs_settings(tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = _movielens(tmp_path / "ml")
    argv = ["backtest", "--dataset", "movielens-100k", "--out", str(out), *TINY, "--backbones", "fm"]
    argv += ["--strategies", "ce,reloop", "--alphas", "0.5", "--no-river", "--title", "T"]
    assert main([*argv, "--data", str(data)]) == 0
    report = (out / "report.md").read_text()
    verdict = next(line for line in report.splitlines() if line.startswith("- streaming · fm · reloop@0.5"))
    assert "± n/a over seeds" in verdict and "0.00 over seeds" not in verdict  # 1 seed: no interval
    command = next(line for line in report.splitlines() if line.startswith("Command:"))
    # Rebuilt with other settings (and no data to read): the header still tells of the run behind the CSV.
    rebuilt = [*argv, "--data", str(tmp_path / "gone"), "--embedding-dim", "8", "--report-only"]
    assert main(rebuilt) == 0
    text = (out / "report.md").read_text()
    assert command in text and "embedding dim 4" in text and "embedding dim 8" not in text
    assert "rebuilt by --report-only" in text and "## ReLoop verdicts" in text
    # No report of the run to take it from: nothing claimed but what the CSV holds.
    (out / "report.md").unlink()
    assert main(rebuilt) == 0
    text = (out / "report.md").read_text()
    assert "Command: not known" in text and "embedding dim" not in text and "samples:" not in text


def test_data_that_leaves_no_period_to_report_is_refused(tmp_path: Path, capsys) -> None:
    # 100 hourly rows are one week, one period: the warm-up. The run exited 0 with empty tables.
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(_movielens(tmp_path / "ml", 100))]
    argv += ["--out", str(out), *TINY, "--backbones", "fm", "--strategies", "ce"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing to report: the data makes 1 period(s)" in err and "Traceback" not in err, err
    assert not (out / "results.csv").exists()


def test_a_file_that_is_not_text_is_named_not_blamed_on_the_period(tmp_path: Path, capsys) -> None:
    # Reading rows and cutting periods shared one `except ValueError`: undecodable bytes were reported as
    # "--period chunks:2: 'utf-8' codec can't decode ..." with no file named.
    data = tmp_path / "day_0.gz"
    data.write_bytes(gzip.compress(b"0\t1\t2\n" * 50))
    argv = ["backtest", "--dataset", "criteo", "--data", str(data), "--out", str(tmp_path / "out"), *TINY]
    assert main([*argv, "--backbones", "fm", "--strategies", "ce", "--no-river", "--period", "chunks:2"]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "--period" not in err and "Traceback" not in err, err


def test_a_resume_over_other_rows_or_periods_is_refused(tmp_path: Path, capsys) -> None:
    # --resume skipped runs by (protocol, backbone, strategy, seed) only: a second seed on 1,500 rows was
    # added to a first on 600, and the report compared them as one.
    data = _movielens(tmp_path / "ml")
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(data), "--out", str(out), *TINY]
    argv += ["--backbones", "fm", "--strategies", "ce", "--no-river"]
    assert main([*argv, "--max-rows", "400"]) == 0
    before = (out / "results.csv").read_text()
    assert main([*argv, "--max-rows", "500", "--seeds", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "other data or periods" in err, err
    assert (out / "results.csv").read_text() == before
    assert main([*argv, "--max-rows", "400", "--seeds", "2", "--resume"]) == 0  # the same rows: resumed
    assert {r["seed"] for r in backtest_cmd.read_csv(out / "results.csv")} == {0, 1}


def test_report_only_keeps_the_runs_report_from(tmp_path: Path) -> None:
    # Rebuilt without --report-from, the tables started at period 1 again under a header that named the
    # run's --report-from: the periods its settings were chosen on were counted as evidence.
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--out", str(out), *TINY, "--backbones", "fm"]
    argv += ["--strategies", "ce", "--no-river", "--data", str(_movielens(tmp_path / "ml"))]
    assert main([*argv, "--report-from", "2"]) == 0
    assert "- tables: periods 2 and later" in (out / "report.md").read_text()
    assert main([*argv, "--report-only"]) == 0
    assert "- tables: periods 2 and later" in (out / "report.md").read_text()
    assert main([*argv, "--report-only", "--report-from", "1"]) == 0  # asked for: done
    text = (out / "report.md").read_text()
    assert "- tables: periods 1 and later" in text
    # Every period of MovieLens, where the defaults were chosen on weeks 1-10: said, with the way out
    # (a bare run's report counted those weeks as results without a word).
    assert "defaults were chosen on weeks 1-10 of MovieLens-100K; --report-from 11" in text
    assert main([*argv, "--report-only", "--report-from", "2"]) == 0
    assert "defaults were chosen on" not in (out / "report.md").read_text()
    # The rebuild reads results.csv alone: the data's flags are not asked for (they were required).
    assert main(["backtest", "--out", str(out), "--report-only", "--report-from", "1"]) == 0
    assert "defaults were chosen on weeks 1-10" in (out / "report.md").read_text()
    # The run's command line stays (with its --report-from); the rebuild says where its tables start, once.
    assert text.count("- rebuilt from results.csv by --report-only, the tables from period 1") == 1, text
    assert main([*argv, "--report-only", "--report-from", "1"]) == 0
    assert (out / "report.md").read_text().count("- rebuilt") == 1


@pytest.mark.parametrize(
    ("options", "hint"),
    [
        ([], "if they are epoch seconds, say so (--dataset-option time_unit=s)"),
        (["--dataset-option", "time_kind=pseudo"], "has no event time (its rows are stamped in file order)"),
        (["--dataset-option", "time_unit=s", "--max-rows", "100"], None),  # few rows: no hint
    ],
)
def test_too_few_periods_say_the_likely_cause(tmp_path: Path, capsys, options: list[str], hint) -> None:
    # Frappe and Criteo (no event time) with the default week made 1 period, and epoch seconds read as
    # ms made 1 week of 1970: both were told to "give more rows".
    path = tmp_path / "log.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "user_id", "item_id", "click"])
        for i in range(600):  # 6 weeks in epoch seconds
            w.writerow([1_714_550_400 + i * 6 * 3600, f"u{i % 7}", f"i{i % 5}", i % 3 == 0])
    argv = ["backtest", "--dataset", "impression-log", "--data", str(path), "--out", str(tmp_path / "o")]
    assert _code([*argv, *TINY, "--backbones", "lr", "--no-river", *options]) == 2
    err = capsys.readouterr().err
    assert "nothing to report" in err
    if hint is None:
        assert "epoch seconds" not in err and "no event time" not in err
    else:
        assert hint in err


def test_a_backbone_that_breaks_the_output_contract_is_refused_in_one_line(
    tmp_path: Path, monkeypatch, capsys
):
    # Known only once a learner is built on the data's spec: it ended the run in a traceback.
    import torch
    from reloop.engine.models import registry
    from reloop.engine.models.blocks import FeatureEmbedding
    from reloop.engine.models.config import BackboneConfig
    from reloop.engine.models.learner import CTRModel

    class ColumnLogit(CTRModel):  # a [B, 1] logit
        def __init__(self, spec, cfg, sparse) -> None:
            super().__init__()
            self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)
            self.out = torch.nn.Linear(cfg.embedding_dim, 1)

        def forward(self, x):
            emb = self.embedding(x)
            return {"logit": self.out(emb.sum(1)), "hidden": emb.sum(1), "embeddings": [emb]}

    registry.available_backbones()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_backbone("column", BackboneConfig, registry.torch_backbone(ColumnLogit), "[B, 1]")
    data = _movielens(tmp_path / "ml")
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(data), "--out", str(tmp_path / "out")]
    assert _code([*argv, *TINY, "--backbones", "column", "--strategies", "ce", "--no-river"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    refused = "reloop backtest: --backbones: backbone 'column': its forward must return"
    assert any(line.startswith(refused) for line in err.splitlines()), err  # (after tqdm's bar)


def test_a_resume_with_other_learner_settings_is_refused_and_more_seeds_are_not(
    tmp_path: Path, capsys
) -> None:
    # --resume checked the data and periods only: seeds made without counters were averaged with a seed
    # made with them, under a settings line that said every run counted clicks.
    data = _movielens(tmp_path / "ml")
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(data), "--out", str(out), *TINY]
    argv += ["--backbones", "fm", "--strategies", "ce", "--no-river", "--max-rows", "400"]
    assert main([*argv, "--counters", "none"]) == 0
    before = (out / "results.csv").read_text()
    assert main([*argv, "--seeds", "2", "--resume"]) == 2  # the default counters now
    err = capsys.readouterr().err
    assert "--resume:" in err and "other settings" in err and "counters: 'none' then, 'auto' now" in err, err
    assert main([*argv, "--counters", "none", "--batch-size", "32", "--seeds", "2", "--resume"]) == 2
    assert "batch-size: " in capsys.readouterr().err
    assert (out / "results.csv").read_text() == before
    # The same settings, more seeds and another backbone: resumed.
    assert main([*argv, "--counters", "none", "--seeds", "2", "--backbones", "fm,lr", "--resume"]) == 0
    rows = backtest_cmd.read_csv(out / "results.csv")
    assert {(r["backbone"], r["seed"]) for r in rows} == {("fm", 0), ("fm", 1), ("lr", 0), ("lr", 1)}


def test_a_resume_of_a_folder_that_recorded_no_settings_is_refused(tmp_path: Path, capsys) -> None:
    data = _movielens(tmp_path / "ml")
    out = tmp_path / "out"
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(data), "--out", str(out), *TINY]
    argv += ["--backbones", "fm", "--strategies", "ce", "--no-river", "--max-rows", "400"]
    assert main(argv) == 0
    (out / "settings.json").unlink()  # a folder from before the record was kept
    assert main([*argv, "--resume"]) == 2
    assert "records no settings.json" in capsys.readouterr().err


def test_a_run_names_the_data_flags_it_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backtest", "--out", str(tmp_path / "out"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "reloop backtest: the following arguments are required: --dataset (not with --report-only)" in err
    assert not (tmp_path / "out").exists()
