"""The model check of ``reloop run``'s supervising parent, in a process of its own.

``python -m reloop.engine.runtime.model_check --config FILE [--log-level L]`` exits 0 when a learner can be
built from the config's model section, else prints ``reloop run: <why>`` and exits 2. The parent of a
two-process run does not import torch (the stages do): run here, the check's torch (~480 MB PSS, every byte
of it held while the stages ran) goes when it ends. About the time torch takes to import.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from reloop.engine.runtime.config import ConfigError, load_config
from reloop.engine.runtime.jsonlog import setup_json_logging


def check_in_a_child(config: str, log_level: str | None) -> int:
    """Run the check in a child process: its exit code (2 with the refusal printed on stderr)."""
    extra = ["--log-level", log_level] if log_level else []
    argv = [sys.executable, "-m", "reloop.engine.runtime.model_check", "--config", config, *extra]
    code = subprocess.run(argv, check=False).returncode
    if code not in (0, 2):
        print(f"reloop run: the model check ended with exit code {code}", file=sys.stderr, flush=True)
        return 1
    return code


def main(argv: list[str] | None = None) -> int:
    from reloop.engine.runtime.build import check_model

    parser = argparse.ArgumentParser(prog="reloop run (model check)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_json_logging(args.log_level)  # backbone plugins' warnings, as the stages log them
    try:
        check_model(load_config(args.config))
    except ConfigError as exc:
        print(f"reloop run: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
