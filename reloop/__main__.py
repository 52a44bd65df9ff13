"""``python -m reloop ...``: the ``reloop`` command (engine/runtime/cli.py)."""

from __future__ import annotations

import sys

from reloop.engine.runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
