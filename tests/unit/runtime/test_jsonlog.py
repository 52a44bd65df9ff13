"""The stage processes' stderr is JSON lines only: Python's warnings included."""

from __future__ import annotations

import subprocess
import sys

import orjson

_CODE = """
import warnings
from reloop.engine.runtime.jsonlog import setup_json_logging
setup_json_logging("INFO")
warnings.warn("Sparse invariant checks are implicitly disabled", UserWarning)
"""


def test_a_warning_is_one_json_line() -> None:
    done = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert done.returncode == 0 and lines
    [record] = [orjson.loads(ln) for ln in lines]  # not JSON: raises
    assert record["logger"] == "py.warnings" and "Sparse invariant" in record["msg"]
