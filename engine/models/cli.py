"""``reloop models``: list the backbones (with their config keys and defaults) and the strategies."""

from __future__ import annotations

import argparse

import orjson


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    from reloop.engine.models.registry import available_backbones, available_strategies, backbone_entry

    rows = []
    for name in available_backbones():
        entry = backbone_entry(name)
        rows.append(
            {
                "name": name,
                "kind": entry.kind,
                "description": entry.description,
                "config": entry.config_cls().model_dump(mode="json"),
            }
        )
    strategies = available_strategies()
    if args.json:
        print(
            orjson.dumps({"backbones": rows, "strategies": strategies}, option=orjson.OPT_INDENT_2).decode()
        )
        return 0
    print("backbones:")
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"  {r['name']:<{width}} [{r['kind']}] {r['description']}\n      {defaults}")
    print("strategies: " + ", ".join(strategies) + "  (alpha * aux + (1 - alpha) * CE; see engine/loss)")
    return 0
