"""Every command line option that takes a Kafka bootstrap refuses a malformed one at parse time (exit 2,
naming the option), as kafka.bootstrap does in the config files."""

from __future__ import annotations

import argparse

import pytest
from reloop.engine.replay import replay_cmd
from reloop.engine.runtime import demo
from reloop.engine.serve import cli as serve_cli
from reloop.engine.simulate import cli as simulate_cli

# (command, its bootstrap option, the command's other required options: only the bootstrap may fail)
OPTIONS = [
    (replay_cmd, "--kafka", ["--out", "x"]),
    (demo, "--bootstrap", []),
    (serve_cli, "--bootstrap", ["--config", "x"]),
    (simulate_cli, "--bootstrap", ["--config", "x"]),
]


@pytest.mark.parametrize(("command", "option", "argv"), OPTIONS)
def test_a_malformed_bootstrap_option_exits_2_naming_it(command, option, argv, capsys):
    parser = argparse.ArgumentParser(prog="reloop x")
    command.configure(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([*argv, option, "a b c::"])
    assert stop.value.code == 2
    assert f"argument {option}: 'a b c::': entry 'a b c::' is not host:port" in capsys.readouterr().err
    assert (
        getattr(parser.parse_args([*argv, option, "127.0.0.1:9092"]), option.strip("-")) == "127.0.0.1:9092"
    )
