"""Finding the offline deploy checkers: scripts/setup.sh installs them (pip extras, deploy/tools.sh).
Without one, its tests skip on a developer's machine and fail with CI=true."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def find_tool(name: str, how: str) -> str:
    """The path of a checker: .state/bin, the test interpreter's bin folder, then PATH."""
    for candidate in (ROOT / ".state" / "bin" / name, Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed ({how})"
    if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def tool():
    """``tool("hadolint", "how to install it")`` -> its path (skips, or fails in CI, when missing)."""
    return find_tool
