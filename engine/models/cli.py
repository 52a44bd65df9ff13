"""``reloop models``: list the backbones (with their config keys and defaults) and the strategies."""

from __future__ import annotations

import argparse

import orjson


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    from reloop.engine.loss.losses import STRATEGIES, VARIANTS
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
            orjson.dumps(
                {"backbones": rows, "strategies": strategies, "backtest_only_strategies": list(VARIANTS)},
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
        return 0
    print("backbones:")
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"  {r['name']:<{width}} [{r['kind']}] {r['description']}\n      {defaults}")
    # The variants are research strategies: `reloop backtest` takes them; model.strategy of the live loop
    # and `reloop replay --strategy` do not (they were listed alike, and `reloop run` then refused them).
    print("strategies: " + ", ".join(STRATEGIES) + "  (alpha * aux + (1 - alpha) * CE; see engine/loss)")
    print("  reloop backtest only: " + ", ".join(VARIANTS) + "  (docs/backtest/self-correction.md)")
    return 0
