"""`reloop demo` without an extra its later steps import says which one to install, at once
(engine/runtime/demo.py check_extras): without httpx it started the Kafka broker and the trainers, then
printed "reloop demo failed: ModuleNotFoundError(...)" without the extra, exit 1."""

from __future__ import annotations

import signal
import sys

import pytest
from reloop.engine.runtime import demo
from reloop.engine.runtime.cli import main as cli_main


def _no_start(*args, **kwargs):
    raise AssertionError("the demo started its work before checking its extras")


@pytest.fixture
def nothing_starts(monkeypatch):
    monkeypatch.setattr(demo, "start_broker", _no_start)
    monkeypatch.setattr(demo, "TrainerProcess", _no_start)
    monkeypatch.setattr(demo, "plan_arms", _no_start)
    monkeypatch.setattr(demo, "_plans_problem", _no_start)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield monkeypatch
    for s, h in handlers.items():  # (the demo of before installed its own)
        signal.signal(s, h)


@pytest.mark.parametrize(
    ("module", "extra"), [("httpx", "demo"), ("rich", "demo"), ("fastapi", "serve"), ("uvicorn", "serve")]
)
def test_a_missing_extra_is_named_before_the_broker_starts(module, extra, nothing_starts, tmp_path, capsys):
    nothing_starts.setitem(sys.modules, module, None)  # None: "import httpx" fails, as when not installed
    rc = cli_main(["demo", "--workdir", str(tmp_path), "--no-live", "--duration", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"reloop demo: needs the Python package {module!r}" in err
    assert f"pip install 'reloop[{extra}]'" in err


def test_the_extra_modules_are_the_clis_extras_of_demo_and_serve():
    from reloop.engine.runtime.cli import EXTRAS

    assert {EXTRAS[m] for m in demo.EXTRA_MODULES} <= {"demo", "serve"}
    assert {m for m, e in EXTRAS.items() if e == "demo"} <= set(demo.EXTRA_MODULES)
    demo.check_extras()  # installed here: no error
