"""The ``reloop`` command. Each subcommand lives in its own module, imported only when used,
so ``reloop kafka status`` does not pay for importing torch.

A subcommand module exposes ``configure(parser: argparse.ArgumentParser) -> None`` and
``main(args: argparse.Namespace) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "kafka": ("connectors.kafka.local_broker_cli", "start, inspect and stop the local Kafka broker"),
    "models": ("engine.models.cli", "list the backbones and the training strategies"),
    "run": ("engine.runtime.run_cmd", "the long-running stream processor (join + train stages)"),
    "join": ("engine.runtime.join_cmd", "the join stage alone (one member of the join group)"),
    "train": ("engine.runtime.train_cmd", "the train stage alone (the samples topic in, snapshots out)"),
    "serve": ("engine.serve.cli", "the scoring service"),
    "simulate": ("engine.simulate.cli", "the simulated world that sends requests and clicks"),
    "demo": ("engine.runtime.demo", "the whole loop live on a simulated world"),
    "replay": ("engine.replay.replay_cmd", "replay logged topics through the pipeline"),
    "backtest": ("engine.replay.backtest_cmd", "strategies x backbones x seeds over periods"),
    "bench": ("bench.__main__", "the benchmark suite"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    return importlib.import_module(module_name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="reloop", description="Streaming continual learning with ReLoop.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in {"-h", "--help"} else 2
    name = argv[0]
    try:
        module = _load(name)
    except ModuleNotFoundError as exc:
        print(f"reloop {name}: not available ({exc})", file=sys.stderr)
        return 2
    cmd_parser = argparse.ArgumentParser(prog=f"reloop {name}", description=COMMANDS[name][1])
    module.configure(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
