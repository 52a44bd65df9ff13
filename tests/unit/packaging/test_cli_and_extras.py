"""The `reloop` command as a user meets it: --version, errors on stderr with a non-zero exit, and the
optional extras (a command whose extra is missing says which one to install; training needs none)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from reloop.engine.runtime import cli

ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

# Blocks imports of the given top-level modules in a child interpreter, as if they were not installed.
BLOCKER = """
import os, sys
BLOCK = set(filter(None, os.environ.get("RELOOP_TEST_BLOCK", "").split(",")))
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!\[;~ ]", requirement, maxsplit=1)[0].lower()


def _reloop(args: list[str], tmp_path: Path, block: set[str] = frozenset()) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site), "RELOOP_TEST_BLOCK": ",".join(sorted(block))}
    return subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=240, check=False,
    )  # fmt: skip


def test_version_comes_from_the_installed_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out == f"reloop {importlib.metadata.version('reloop')}\n"
    assert importlib.metadata.version("reloop") == PYPROJECT["project"]["version"]
    assert cli.main(["-V"]) == 0 and capsys.readouterr().out == out


def test_unknown_command_goes_to_stderr_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trian"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "reloop: unknown command 'trian'" in captured.err and "usage: reloop" in captured.err


def test_bad_arguments_of_a_command_exit_2_on_stderr(tmp_path: Path) -> None:
    done = _reloop(["kafka", "explode"], tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert "invalid choice: 'explode'" in done.stderr


def test_an_abbreviated_flag_and_an_unknown_bench_figure_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # "--conf" was taken for --config (it would change meaning once a flag sharing the prefix came);
    # an unknown figure exited 1, a failure, not 2.
    with pytest.raises(SystemExit) as done:
        cli.main(["models", "--js"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "unrecognized arguments: --js (did you mean --json?)" in err
    # the error and where the options are, not the whole usage first (20 lines for `reloop backtest`)
    said = (
        "reloop models: error: unrecognized arguments: --js (did you mean --json?); see reloop models --help"
    )
    assert err == said + "\n"
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "--only", "joiner,nosuch"])
    assert done.value.code == 2 and "unknown figure(s) ['nosuch']" in capsys.readouterr().err


def test_the_cli_names_the_extra_of_every_optional_module() -> None:
    core = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    for dist, extra in cli.EXTRAS.items():  # each module here has its distribution's name
        assert dist not in core, f"{dist} is a core dependency: the extras split would not matter"
        assert dist in {_dist(r) for r in EXTRAS[extra]}, f"{dist} is not in the [{extra}] extra"


def test_dev_installs_every_other_extra_and_the_core_has_no_server_or_plots() -> None:
    others = sorted(set(EXTRAS) - {"dev", "all"})
    assert others == ["demo", "replay", "serve"]
    dev_self = [r for r in EXTRAS["dev"] if _dist(r) == "reloop"]
    assert dev_self and set(re.search(r"\[(.*)\]", dev_self[0]).group(1).split(",")) >= set(others)
    core = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    assert not core & {"fastapi", "uvicorn", "httptools", "uvloop", "matplotlib", "rich", "httpx", "pytest"}


def test_training_commands_run_without_any_extra_and_the_others_name_theirs(tmp_path: Path) -> None:
    optional = set(cli.EXTRAS)
    models = _reloop(["models"], tmp_path, optional)
    assert models.returncode == 0, models.stderr
    assert "deepfm" in models.stdout
    for command in ("run", "join", "train", "replay", "backtest", "serve"):
        done = _reloop([command, "--help"], tmp_path, optional)
        assert done.returncode == 0, (command, done.stderr)
    status = _reloop(["kafka", "status", "--state-dir", str(tmp_path / "k")], tmp_path, optional)
    assert status.returncode == 1 and "not running" in status.stdout  # ran; no broker there
    demo = _reloop(["demo", "--help"], tmp_path, optional)
    assert demo.returncode == 2 and demo.stdout == ""
    assert "pip install 'reloop[demo]'" in demo.stderr


def test_a_missing_extra_inside_a_command_is_named_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("serve: {port: 0}\narms: [{name: a, registry: " + str(tmp_path / "reg") + "}]\n")
    done = _reloop(["serve", "--config", str(config)], tmp_path, {"fastapi", "uvicorn"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    hint = r"needs the Python package '(fastapi|uvicorn)'.*pip install 'reloop\[serve\]'"
    assert re.search(hint, done.stderr), done.stderr[-2000:]


def test_license_is_the_apache_2_text_pyproject_declares() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) > 150


def test_python_dash_m_reloop_is_the_reloop_command() -> None:
    # "No module named reloop.__main__": the command was reachable only as `reloop` or through the
    # module path of its CLI.
    done = subprocess.run(
        [sys.executable, "-m", "reloop", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.startswith("reloop "), done.stderr
