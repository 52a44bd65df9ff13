"""`reloop backtest` without the [replay] extra says so at once (engine/replay/backtest_cmd.py
check_extras): without matplotlib it ran every backtest run and failed only when it drew the plots."""

from __future__ import annotations

import sys

import pytest
from reloop.engine.replay import backtest_cmd
from reloop.engine.runtime.cli import main as cli_main


def _no_work(*args, **kwargs):
    raise AssertionError("the backtest started its work (read the data) before checking its extras")


@pytest.mark.parametrize("module", ["matplotlib", "tqdm"])
@pytest.mark.parametrize("report_only", [False, True])
def test_a_missing_replay_extra_is_named_before_any_run(module, report_only, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # None: "import matplotlib" fails, as when not installed
    monkeypatch.setattr(backtest_cmd, "load_data", _no_work)
    monkeypatch.setattr(backtest_cmd, "run_river_baseline", _no_work)
    monkeypatch.setattr(backtest_cmd, "_work", _no_work)
    out = tmp_path / "out"
    if report_only:  # the plots of a rebuilt report need matplotlib as much
        out.mkdir()
        (out / "results.csv").write_text("")
        monkeypatch.setattr(backtest_cmd, "read_csv", _no_work)
    argv = ["backtest", "--dataset", "movielens-100k", "--data", str(tmp_path / "data"), "--out", str(out)]
    assert cli_main([*argv, *(["--report-only"] if report_only else [])]) == 2
    err = capsys.readouterr().err
    assert f"reloop backtest: needs the Python package {module!r}" in err
    assert "pip install 'reloop[replay]'" in err


def test_check_extras_passes_when_the_extra_is_installed():
    backtest_cmd.check_extras()
