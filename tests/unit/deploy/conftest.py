"""Finding the offline deploy checkers: scripts/setup.sh installs them (pip extras, deploy/tools.sh).
Without one, its tests skip on a developer's machine and fail with CI=true."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[3]


def find_tool(name: str, how: str, unavailable: Callable[[str], NoReturn]) -> str:
    """The path of a checker: .state/bin, the test interpreter's bin folder, then PATH."""
    for candidate in (ROOT / ".state" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    unavailable(f"{name} is not installed ({how})")


@pytest.fixture(scope="session")
def tool(unavailable):
    """``tool("hadolint", "how to install it")`` -> its path (skips, or fails in CI, when missing)."""
    return lambda name, how: find_tool(name, how, unavailable)
