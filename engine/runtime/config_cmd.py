"""``reloop config {check,show,reference}``: a config file as the commands read it.

* ``check --config FILE``: refuses what the commands would refuse at their start (exit 2, the key named),
  without starting anything: for a deployment's CI, as ``promtool check config`` is for Prometheus.
* ``show --config FILE``: the file with every default filled in and the ``RELOOP__*`` variables applied,
  secrets hidden, as YAML.
* ``reference``: every key, its default, type and meaning (docs/configuration.md is this output).

A file is a run config (``reloop run``, ``join``, ``train``, ``replay``) or the service's (``reloop serve``,
``simulate``: it has ``serve`` or ``arms``); ``--kind`` says which where the sections do not.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Literal

import yaml
from reloop.engine.config_common import ConfigError, read_document

Kind = Literal["run", "serve"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("check", "show", "reference"), help="what to do")
    parser.add_argument("--config", help="the config file (check, show)")
    parser.add_argument(
        "--kind", choices=("run", "serve"), default=None,
        help="run (reloop run, join, train, replay) or serve (reloop serve, simulate); default: the "
        "service's when the file has a serve or arms section, else a run config",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    if args.action == "reference":
        from reloop.engine.runtime.config_reference import reference_markdown

        sys.stdout.write(reference_markdown())
        return 0
    if args.config is None:
        _say(f"{args.action} needs --config FILE")
        return 2
    from reloop.engine.runtime.config_pipe import reopenable

    # A piped config (--config <(envsubst < f)) is read twice, for its kind and then as that kind.
    with reopenable(args.config) as path:
        try:
            kind = args.kind or kind_of(read_document(path))
            effective = _checked(path, kind, build_model=args.action == "check")
        except (ConfigError, OSError) as exc:
            _say(str(exc))
            return 2
    if args.action == "show":
        sys.stdout.write(yaml.safe_dump(effective, sort_keys=False, allow_unicode=True))
    else:
        print(f"{args.config}: a valid {'run config' if kind == 'run' else 'service config'}")
    return 0


def kind_of(doc: Any) -> Kind:
    if not isinstance(doc, dict):
        raise ConfigError("top level must be a mapping")
    if "run" in doc or "demo" in doc:
        raise ConfigError(
            "a demo config: reloop config reads run configs and the service's file; reloop demo checks "
            "its own at its start, before anything runs"
        )
    return "serve" if "serve" in doc or "arms" in doc else "run"


def _checked(path: str, kind: Kind, *, build_model: bool) -> dict[str, Any]:
    """The effective config as JSON data, secrets hidden; ``build_model``: also what ``reloop run``
    checks before its stages start (a learner can be built from the model section)."""
    if kind == "run":
        from reloop.engine.runtime.config import load_config, load_feature_spec

        cfg = load_config(path)
        load_feature_spec(cfg.model)
        if build_model:
            from reloop.engine.runtime.build import check_model

            check_model(cfg)
        return cfg.redacted_dump()
    from pathlib import Path

    from reloop.engine.runtime.config_pipe import config_base_dir
    from reloop.engine.serve.config import load_serve_config

    config = load_serve_config(path)
    if build_model:
        from reloop.engine.serve.cli import config_problem

        problem = config_problem(config, config.workers)
        if problem:
            raise ConfigError(problem)
    data = config.redacted_dump()
    for arm in data["arms"]:  # as read: a spec_file's spec is inlined, so name the file alone (absolute)
        cold = arm.get("cold_start") or {}
        if cold.get("spec_file"):
            cold["spec_file"] = str(config_base_dir(Path(path)) / Path(cold["spec_file"]).expanduser())
            cold["spec"] = None
    at_top = {key: data.pop(key) for key in ("arms", "kafka", "salt")}
    return {"serve": data, **at_top}  # the file's own shape


def _say(text: str) -> None:
    print(f"reloop config: {text}", file=sys.stderr, flush=True)
