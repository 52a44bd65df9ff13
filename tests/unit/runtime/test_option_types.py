"""Command line options whose bad values failed later (a traceback, or a broker started and stopped) are
refused at parse time: exit 2 with argparse's line naming the option."""

from __future__ import annotations

import os

import pytest
from reloop.engine.runtime.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--config", "x", "--log-level", "bogus"], "argument --log-level: invalid choice: 'BOGUS'"),
        (["join", "--config", "x", "--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
        (["train", "--config", "x", "--log-level", "1"], "argument --log-level: invalid choice: '1'"),
        (["kafka", "up", "--port", "99999"], "argument --port: expected a port in 1..65535, got 99999"),
        (["kafka", "up", "--timeout", "-1"], "argument --timeout: expected a finite number > 0, got '-1'"),
    ],
)
def test_a_bad_option_value_exits_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_log_level_in_lower_case_is_taken(tmp_path, capsys):
    # Parsed (upper-cased), then the missing config is what fails: one line, exit 2.
    assert main(["run", "--config", str(tmp_path / "missing.yaml"), "--log-level", "debug"]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_more_train_ranks_than_cores_are_refused_before_torchrun_starts(tmp_path, capsys):
    # 1,000 ranks on 2 cores took the machine, and 67 of them outlived the stop.
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n  backbone: lr\n  spec: {fields: [{kind: categorical, name: u, buckets: 10}]}\n"
    )
    cores = len(os.sched_getaffinity(0))
    assert main(["train", "--config", str(config), "--world-size", str(cores + 1)]) == 2
    assert (
        f"--world-size {cores + 1} is more ranks than this machine's {cores} cores" in capsys.readouterr().err
    )


def test_one_port_for_the_broker_and_its_controller_is_refused(tmp_path, capsys):
    # The broker moved the controller to a random port without a word.
    argv = ["kafka", "up", "--state-dir", str(tmp_path), "--port", "19999", "--controller-port", "19999"]
    assert main(argv) == 2
    assert "--port and --controller-port must differ" in capsys.readouterr().err
    assert not (tmp_path / "broker.json").exists()
