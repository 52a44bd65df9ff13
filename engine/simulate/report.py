"""Tables for the terminal (rich): live per-arm progress and the final summary."""

from __future__ import annotations

import math
from collections.abc import Mapping

from reloop.engine.simulate.config import ReportConfig
from reloop.engine.simulate.stats import SimStats, ab_plan, ab_report
from rich.table import Table


def _f(x: object, fmt: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if math.isnan(x) else format(x, fmt)
    return str(x)


def arms_table(stats: SimStats, *, title: str, serving: Mapping[str, int | None] | None = None) -> Table:
    # "AUC (all)" read 0.46-0.48 beside rolling and per-version AUCs of 0.5-0.75: it pools every version's
    # scores, whose scales differ (an early version scores all low), so it ranks across versions too.
    caption = (
        "pooled AUC: every version's scores ranked together (their scales differ, so it can sit below each "
        "version's own: the by-version table); rolling AUC: the last window's"
    )
    table = Table(title=title, caption=caption)
    for col in (
        "arm",
        "served v",
        "impressions",
        "clicks",
        "true CTR",
        "click CTR",
        "rolling AUC",
        "pooled AUC",
        "oracle AUC",
        "versions seen",
    ):
        table.add_column(col, justify="right" if col != "arm" else "left")
    with stats.lock:
        summaries = [a.summary() for a in stats.arms.values()]
    for s in sorted(summaries, key=lambda s: str(s["arm"])):
        live = serving.get(str(s["arm"])) if serving else s["last_version"]
        table.add_row(
            str(s["arm"]),
            _f(live),
            _f(s["impressions"]),
            _f(s["clicks"]),
            _f(s["true_ctr"]),
            _f(s["realized_ctr"]),
            _f(s["rolling_auc"]),
            _f(s["served_auc"]),
            _f(s["oracle_auc"]),
            f"{s['first_version']}..{s['last_version']}",
        )
    return table


def versions_table(stats: SimStats, arm: str, *, max_rows: int = 12) -> Table:
    """AUC and true CTR of the impressions each model version served: quality over time."""
    table = Table(title=f"arm {arm}: by model version")
    for col in ("version", "impressions", "true CTR", "AUC"):
        table.add_column(col, justify="right")
    with stats.lock:
        versions = stats.arms[arm].summary()["versions"]
    items = list(versions.items())  # type: ignore[union-attr]
    left_out = len(items) - max_rows
    for i, (v, s) in enumerate(items):
        if left_out > 0 and 2 <= i < 2 + left_out:  # keep the first and the most recent ones
            if i == 2:  # where they were, saying so (40 versions went without a mark)
                table.add_row(f"... {left_out} more", "", "", "")
            continue
        table.add_row(str(v), str(s["impressions"]), _f(s["true_ctr"]), _f(s["auc"]))
    return table


def progress_line(stats: SimStats, elapsed_s: float) -> str:
    """One line of what was sent so far (``reloop simulate`` prints it every PROGRESS_EVERY_S)."""
    with stats.lock:
        arms = sorted(stats.arms.items())
        requests = ", ".join(f"{name} {a.requests:,}" for name, a in arms)
        impressions = sum(a.impressions for _, a in arms)
        return (
            f"reloop simulate: {elapsed_s:.0f} s: requests answered {requests or 0}; impressions "
            f"{impressions:,}; clicks sent {stats.clicks_sent:,}; not-ready answers {stats.not_ready}, "
            f"errors {stats.errors}"
        )


def ab_lines(stats: SimStats, report: ReportConfig) -> list[str]:
    if not (report.treatment and report.control):
        return []
    with stats.lock:
        rep = ab_report(stats, treatment=report.treatment, control=report.control, aa=report.aa)
        plan = ab_plan(stats, treatment=report.treatment, control=report.control, aa=report.aa)
    lines = []
    for kind, label in (("true", "true CTR"), ("clicks", "drawn clicks")):
        if f"ab_lift_{kind}" not in rep:
            continue
        line = f"A/B lift {report.treatment} vs {report.control} ({label}): {rep[f'ab_lift_{kind}']:+.2%}"
        if f"aa_lift_{kind}" in rep and report.aa:
            line += (
                f"; A/A lift {report.aa[0]} vs {report.aa[1]}: {rep[f'aa_lift_{kind}']:+.2%}"
                f"; A/B minus A/A: {rep[f'ab_minus_aa_{kind}']:+.2%}"
            )
        lines.append(line)
    if plan and not math.isnan(plan["detectable"]):
        what = "A/B minus A/A" if report.aa else "A/B lift"
        line = (
            f"{what} on drawn clicks: this run can detect ±{plan['detectable']:.1%} "
            f"(5% two-sided, 80% power, {plan['unit']}s as the unit) after {plan['elapsed_s']:.0f} s"
        )
        if not math.isnan(plan["observed"]) and math.isfinite(plan["needed_s"]):
            times = plan["needed_s"] / max(plan["elapsed_s"], 1e-9)
            times_text = f"{times:.0f}" if times >= 10 else f"{times:.2g}"  # 150x, 2.4x, 0.49x
            line += (
                f"; to separate the observed {plan['observed']:+.2%} from noise it would need about "
                f"{_duration(plan['needed_s'])} ({times_text}x this run)"
            )
        lines.append(line)
    return lines


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86_400.0), ("h", 3_600.0), ("min", 60.0)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
