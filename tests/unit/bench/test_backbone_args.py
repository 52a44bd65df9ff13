"""The benchmarks' ``--backbones``: spaces or commas, as ``reloop backtest`` takes them; an unknown name is
argparse's one-line error (``dcn,deepfm`` used to fail as one unknown name, with a traceback)."""

from __future__ import annotations

import argparse

import pytest
from reloop.bench.backbone_args import Backbones


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--backbones", nargs="+", action=Backbones, default=["dcn"])
    return parser


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        ([], ["dcn"]),
        (["--backbones", "lr", "fm"], ["lr", "fm"]),
        (["--backbones", "lr,fm"], ["lr", "fm"]),
        (["--backbones", "lr,fm", "dcn"], ["lr", "fm", "dcn"]),
    ],
)
def test_names_by_spaces_or_commas(argv, names):
    assert _parser().parse_args(argv).backbones == names


@pytest.mark.parametrize("argv", [["--backbones", "lr,nope"], ["--backbones", ","]])
def test_an_unknown_name_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--backbones: unknown backbone(s)" in err and "choose from" in err and "Traceback" not in err
