"""Figure 7: samples/s of the engine's river paths against river's own ``learn_one`` loop.

The measurement is the river engineer's ``reloop.bench.river_throughput.measure`` (every variant on the same
synthetic stream in one process, variants alternating round by round, predict-then-learn with the
ReLoop loss); this module turns its medians and per-round ratios into rows.
"""

from __future__ import annotations

import argparse

from reloop.bench.suite import Context, Figure, Row

COMMAND = "python -m reloop.bench --only river"
TITLE = "7. river backbones"
# (engine variant, what it is) in the order the rows appear.
VARIANTS = (
    ("river_lr", "engine river_lr (wraps river LogisticRegression)"),
    ("river_fm", "engine river_fm (wraps river FMClassifier)"),
    ("river_fm_np sequential", "engine river_fm_np, river's per-sample update in numpy"),
    ("river_fm_np minibatch", "engine river_fm_np, one step per mini-batch"),
)


def run(ctx: Context) -> Figure:
    from reloop.bench import river_throughput as rt

    args = argparse.Namespace(
        fields=ctx.pick([3, 10, 39], [3]),
        river_fm_max_fields=39,
        buckets=10_000,
        samples=ctx.pick(60_000, 10_000),
        chunk=256,
        rounds=max(2, min(ctx.rounds, 3)),
        seconds=ctx.pick(2.0, 0.5),
    )
    rows: list[Row] = []
    lines = [
        "| fields | variant | samples/s | river's own loop | samples/s | ratio |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for fields in args.fields:
        res = rt.measure(fields, args)
        for name, label in VARIANTS:
            r = res.get(name)
            if r is None or not r.get("baseline"):
                continue
            base = res[r["baseline"]]
            rows.append(
                Row(
                    figure=f"{label}, {fields} fields",
                    value=r["median"],
                    unit="samples/s",
                    baseline_name=f"{r['baseline']} (predict_proba_one + learn_one)",
                    baseline_value=base["median"],
                    ratio=r["ratio"],
                    command=COMMAND,
                )
            )
        for name, r in res.items():
            base = r.get("baseline") or ""
            ratio = "" if r.get("ratio") is None else f"{r['ratio']:.2f}"
            base_rate = f"{res[base]['median']:,.0f}" if base else ""
            lines.append(f"| {fields} | {name} | {r['median']:,.0f} | {base} | {base_rate} | {ratio} |")
    notes = "\n".join(
        [
            f"Synthetic Zipf click stream, {args.samples:,} samples per field count, "
            f"{args.buckets:,} buckets per field, ReLoop loss (alpha 0.5) with a y_last per sample, "
            f"10 factors, engine learners fed chunks of {args.chunk}; {args.rounds} rounds of "
            f"~{args.seconds:g} s per variant, alternating; ratio = median per-round ratio to river's "
            f"own loop of the same model. Measured by `reloop.bench.river_throughput.measure` (full report: "
            f"`python -m reloop.bench.river_throughput`). No target was set for this figure.",
            "",
            *lines,
        ]
    )
    return Figure(key="river", title=TITLE, rows=rows, notes=notes)
