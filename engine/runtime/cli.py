"""The ``reloop`` command. Each subcommand lives in its own module, imported only when used,
so ``reloop kafka status`` does not pay for importing torch.

A subcommand module exposes ``configure(parser: argparse.ArgumentParser) -> None`` and
``main(args: argparse.Namespace) -> int``.

``reloop --version`` prints the installed version. Errors go to stderr with a non-zero exit: 2 for a
usage error (an unknown command, bad arguments) or a missing optional dependency (named with the extra
that brings it, e.g. ``pip install 'reloop[serve]'``), 130 for Ctrl-C; a command's own errors keep its
exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.metadata
import os
import signal
import sys
import threading
from typing import NoReturn

from reloop.engine.runtime import early_stop

COMMANDS: dict[str, tuple[str, str]] = {
    "kafka": (
        "reloop.connectors.kafka.local_broker_cli",
        "start, inspect and stop the local Kafka broker; create a run config's topics",
    ),
    "models": ("reloop.engine.models.cli", "list the backbones and the training strategies"),
    "run": ("reloop.engine.runtime.run_cmd", "the long-running stream processor (join + train stages)"),
    "join": ("reloop.engine.runtime.join_cmd", "the join stage alone (one member of the join group)"),
    "train": ("reloop.engine.runtime.train_cmd", "the train stage alone (samples topic in, snapshots out)"),
    "serve": ("reloop.engine.serve.cli", "the scoring service"),
    "simulate": ("reloop.engine.simulate.cli", "the simulated world that sends requests and clicks"),
    "demo": ("reloop.engine.runtime.demo", "the whole loop live on a simulated world"),
    "config": (
        "reloop.engine.runtime.config_cmd",
        "check a config file, show it as the commands read it, or list every key",
    ),
    "deadletters": ("reloop.engine.runtime.deadletters_cmd", "read the dead letters back, send them again"),
    "versions": ("reloop.engine.runtime.versions_cmd", "list a checkpoint folder's versions; roll back"),
    "replay": ("reloop.engine.replay.replay_cmd", "replay logged topics through the pipeline"),
    "backtest": ("reloop.engine.replay.backtest_cmd", "strategies x backbones x seeds over periods"),
    "bench": ("reloop.bench.__main__", "the benchmark suite"),
}


#: Top-level modules that only an optional extra installs (pyproject.toml), and that extra.
EXTRAS: dict[str, str] = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "httptools": "serve",
    "uvloop": "serve",
    "matplotlib": "replay",
    "tqdm": "replay",
    "rich": "demo",
    "httpx": "demo",
    "msgpack": "dev",
}


def version() -> str:
    """The installed distribution's version (pyproject.toml's, through the package metadata)."""
    try:
        return importlib.metadata.version("reloop")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (reloop is not installed: pip install .)"


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(module_name)


def _missing(name: str, exc: ModuleNotFoundError) -> int | None:
    """A message naming the extra that brings the missing module, or None when no extra does."""
    top = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    print(
        f"reloop {name}: needs the Python package {top!r}, which comes with the [{extra}] extra: "
        f"pip install 'reloop[{extra}]'",
        file=sys.stderr,
    )
    return 2


def keep_triton_out() -> None:
    """Have torch find no triton in this process, unless ``RELOOP_ALLOW_TRITON=1``.

    torch's optimizers import torch._dynamo at their first step, and dynamo imports triton when it is
    installed (torch's CUDA wheel brings it). reloop trains eagerly on the CPU and never compiles, and
    triton's nanobind bindings print about 80 lines of "nanobind: leaked ..." when a train stage exits.
    Without triton torch behaves as its CPU wheel does. A plugin that calls torch.compile on a GPU sets
    the variable."""
    if os.environ.get("RELOOP_ALLOW_TRITON") != "1":
        sys.modules.setdefault("triton", None)  # type: ignore[arg-type]  # None: "import triton" fails


# The stream processors and the scoring service, which install their own stop handling once started
# (engine/runtime/stage_runner.py, engine/serve/cli.py). A SIGTERM before that exits 0: see
# engine/runtime/early_stop.py.
STOPPED_EARLY_CLEANLY = frozenset({"run", "join", "train", "serve"})


def main(argv: list[str] | None = None) -> int:
    whole_process = argv is None  # the `reloop` command itself, not a call from a test or a script
    argv = sys.argv[1:] if argv is None else argv
    keep_triton_out()
    parser = argparse.ArgumentParser(prog="reloop", description="Streaming continual learning with ReLoop.")
    parser.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if argv and argv[0] in {"-V", "--version"}:
        print(f"reloop {version()}")
        return 0
    if not argv or argv[0] in {"-h", "--help"}:
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"reloop: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    name = argv[0]
    early = name in STOPPED_EARLY_CLEANLY and threading.current_thread() is threading.main_thread()
    previous = early_stop.arm() if early else None
    try:
        code = _run(name, argv)
    except early_stop.StoppedBeforeStart:
        # A data-parallel rank tells its launcher it owes nothing (engine/runtime/train_cmd.py).
        told = getattr(sys.modules.get(COMMANDS[name][0]), "stopped_before_start", None)
        if told is not None:
            told()
        # (A stream processor had read nothing; a scoring service had answered no request.)
        what = "nothing served" if name == "serve" else "nothing read, nothing to save"
        print(f"reloop {name}: stopped (SIGTERM) before it started: {what}", file=sys.stderr)
        code = 0
    finally:  # called in-process (tests): the caller's handler back, unless the command put its own
        if early:
            early_stop.disarm(previous)
            if whole_process:
                # Stopped, its exit code decided: a second signal during the interpreter's exit (0.5-3 s)
                # turned a clean stop into 130 or 143. SIGKILL still ends a hung exit.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
    if whole_process and early:
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """End a stopped stream processor or scoring service as the interpreter would, less its teardown:
    threads that are not daemons are waited for and the ``atexit`` hooks run (the exit guard, clients'
    cleanups), then the logs and stdio are flushed and the process ends. The teardown (every module's
    objects freed, a last collection over torch's and the models' objects) took 0.5-4 s after "stopped
    in 0.2 s", for nothing a stopped process still owes (a pod's stop, a supervisor's restart, waited
    on it)."""
    import atexit
    import logging

    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that left; a closed stream
            stream.flush()
    os._exit(code)


def _run(name: str, argv: list[str]) -> int:
    try:
        module = _load(name)
    except ModuleNotFoundError as exc:
        code = _missing(name, exc)
        if code is None:
            print(f"reloop {name}: not available ({exc})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while torch imports (the first seconds): no 40-line traceback
        print(f"reloop {name}: interrupted", file=sys.stderr)
        return 130
    early_stop.raise_if_pending()  # a SIGTERM that came during the imports (early_stop.py)
    try:
        # No abbreviated flags: "--conf" taken for --config would change meaning once a flag sharing the
        # prefix is added.
        cmd_parser = CommandParser(prog=f"reloop {name}", description=COMMANDS[name][1], allow_abbrev=False)
        module.configure(cmd_parser)
        args = cmd_parser.parse_args(argv[1:])
        return int(module.main(args) or 0)
    except ModuleNotFoundError as exc:
        code = _missing(name, exc)
        if code is None:
            raise
        return code
    except KeyboardInterrupt:
        print(f"reloop {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `reloop models --json | head`: the reader left; no traceback (Python's advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


class CommandParser(argparse.ArgumentParser):
    """A command's usage error in one line: the error, the nearest option to one misspelled, and where
    the options are listed. argparse put the whole usage first: 20 lines for `reloop backtest`, which
    buried the one that mattered."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}{self._nearest(message)}; see {self.prog} --help\n")

    def _nearest(self, message: str) -> str:
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return ""
        known = [flag for action in self._actions for flag in action.option_strings]
        guesses: dict[str, str] = {}
        for word in message[len(prefix) :].split():
            flag = word.split("=", 1)[0]
            if flag.startswith("-"):
                guesses.update((flag, match) for match in difflib.get_close_matches(flag, known, n=1))
        if len(guesses) < 2:
            return "".join(f" (did you mean {match}?)" for match in guesses.values())
        return f" (did you mean {', '.join(f'{match} for {flag}' for flag, match in guesses.items())}?)"


if __name__ == "__main__":
    sys.exit(main())
