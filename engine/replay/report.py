"""Backtest results -> paired comparisons against CE, a markdown report, PNG plots and the raw CSV.

A difference is always paired: strategy minus CE on the same backbone, seed and period. Two 95%
intervals (Student t) are given, because they answer different questions:

* over seeds: per seed, the mean difference over periods; the spread is training randomness;
* over periods: per period, the mean difference over seeds; the spread is how much the effect moves
  with the data (periods are not independent draws, so read this one as descriptive).

Verdict per (backbone, strategy), on AUC and LogLoss separately: "wins" when BOTH intervals lie
entirely on the better side of 0, "loses" when both lie entirely on the worse side, else "ties". An
effect that training randomness cannot explain but that flips sign from period to period is not a win.
"n/a" when there is no verdict to give: fewer than ``MIN_SEEDS`` seeds (a 2-seed t interval is too
wide and too unstable to judge on) or fewer than 2 of either (no interval).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from reloop.engine.appending import replace_whole

CSV_COLUMNS = (
    "dataset", "protocol", "backbone", "strategy", "loss", "alpha", "seed", "period", "n", "ctr",
    "auc", "logloss", "sc_active",
)  # fmt: skip
METRICS = ("auc", "logloss")
BETTER = {"auc": 1.0, "logloss": -1.0}
MIN_SEEDS = 3  # fewer seeds: verdict "n/a"


def columns_problem(path: Path) -> str | None:
    """Why this reloop's rows cannot be appended to the CSV at ``path``: its header names other columns
    (another reloop version wrote it; rows appended in this one's order would sit under the wrong names).
    None when they can (the header is this one's, or the file is empty)."""
    with path.open(newline="") as fh:
        header = next(csv.reader(fh), None)
    if header is None or tuple(header) == CSV_COLUMNS:
        return None
    return (
        f"{path} has the columns {header}, this reloop writes {list(CSV_COLUMNS)} (written by another "
        "reloop version)"
    )


def write_csv(rows: Iterable[dict[str, Any]], path: Path, append: bool = False) -> None:
    """Write (or append) ``rows`` in one write, made durable: a backtest appends each run's rows so, and
    a kill can only cut that one write short (``cut_torn_run`` takes such a run back out). Appending to a
    CSV of other columns raises ValueError (``columns_problem``); an empty one gets its header."""
    exists = append and path.exists() and path.stat().st_size > 0
    if exists and (problem := columns_problem(path)) is not None:
        raise ValueError(problem)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    if not exists:
        writer.writeheader()
    for row in rows:
        writer.writerow(row)
    with path.open("a" if append else "w", newline="") as fh:
        fh.write(text.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def cut_torn_run(path: Path) -> bool:
    """Take the run cut short by a kill out of the CSV at ``path``: one that does not end with a line
    break ends in the middle of a run's write (``write_csv``), whose complete rows before the torn one are
    not all of its periods. Cuts the torn line and the rows of the run it belonged to (when the torn line
    began a run, the run before it is made again too: it cannot be told apart). True when it cut."""
    data = path.read_bytes() if path.exists() else b""
    if not data or data.endswith(b"\n"):
        return False
    lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
    if len(lines) <= 1:  # at most the header: no run finished
        path.unlink()
        return True
    header = next(csv.reader([lines[0].decode()]))
    at = [header.index(k) for k in ("protocol", "backbone", "strategy", "seed")]

    def key(line: bytes) -> tuple[str, ...]:
        cells = next(csv.reader([line.decode()]))
        return tuple(cells[i] for i in at)

    last = key(lines[-1])
    while len(lines) > 1 and key(lines[-1]) == last:
        lines.pop()
    replace_whole(path, b"".join(lines))
    return True


def read_csv(path: Path) -> list[dict[str, Any]]:
    out = []
    with path.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            row: dict[str, Any] = dict(rec)
            for k in ("alpha", "ctr", "auc", "logloss", "sc_active"):
                row[k] = float(rec[k]) if rec.get(k) not in (None, "") else math.nan
            for k in ("seed", "period", "n"):
                row[k] = int(rec[k])
            out.append(row)
    return out


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student t interval); half-width NaN with fewer than 2 values."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) < 2:
        return float(x.mean()), math.nan
    from scipy.stats import t

    return float(x.mean()), float(t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


@dataclass(frozen=True)
class Comparison:
    dataset: str
    protocol: str
    backbone: str
    strategy: str
    metric: str
    mean: float  # mean of the strategy's metric (over seeds and periods)
    ce_mean: float
    diff_seeds: tuple[float, float]
    diff_periods: tuple[float, float]
    n_seeds: int
    n_periods: int
    seed_wins: int  # seeds whose mean difference is on the better side

    @property
    def verdict(self) -> str:
        """Wins / loses only when both 95% intervals clear 0 on the same side (module docstring)."""
        intervals = (self.diff_seeds, self.diff_periods)
        if self.n_seeds < MIN_SEEDS or any(math.isnan(h) for _, h in intervals):
            return "n/a"
        sign = BETTER[self.metric]
        sides = {_side(sign * m, h) for m, h in intervals}
        if sides == {1}:
            return "wins"
        if sides == {-1}:
            return "loses"
        return "ties"


def _side(m: float, h: float) -> int:
    """+1 when the interval ``m ± h`` lies above 0, -1 when below, 0 when it touches or straddles 0."""
    return 1 if m - h > 0 else -1 if m + h < 0 else 0


def _key(r: dict[str, Any]) -> tuple[str, str, str]:
    return (r.get("dataset", ""), r["protocol"], r["backbone"])


def against_ce(strategy: str) -> str | None:
    return None if strategy == "ce" else "ce"


def split_strategy(name: str) -> tuple[str, str, str]:
    """(loss, alpha, variant) of a row's strategy name ``LOSS[@ALPHA][+VARIANT]``: ``kd@0.5+mem4x6@0.3``
    is ``("kd", "0.5", "mem4x6@0.3")`` (a variant, an error memory say, has an ``@`` of its own)."""
    base, _, variant = name.partition("+")
    loss, _, alpha = base.partition("@")
    return loss, alpha, variant


def against_kd(strategy: str) -> str | None:
    """ReLoop (or one of its variants) at alpha against KD at the same alpha (the paper's closest
    baseline), an error memory's row against KD's with the same memory."""
    loss, alpha, variant = split_strategy(strategy)
    return f"kd@{alpha}{'+' if variant else ''}{variant}" if loss.startswith("reloop") and alpha else None


def compare(
    rows: Sequence[dict[str, Any]], baseline_of: Callable[[str], str | None] = against_ce
) -> list[Comparison]:
    """Each strategy against its baseline (``baseline_of``, CE by default) of the same (dataset,
    protocol, backbone), paired by seed and period; ``ce_mean`` is then the baseline's mean."""
    cells = _cells(rows)
    out = []
    for (dataset, protocol, backbone, strategy), cell in sorted(cells.items()):
        baseline = baseline_of(strategy)
        ce = cells.get((dataset, protocol, backbone, baseline)) if baseline else None
        if ce is not None:
            out += _paired((dataset, protocol, backbone, strategy), cell, ce)
    return out


RIVER = "river_lr"


def against_river(rows: Sequence[dict[str, Any]], peer: str | None = RIVER) -> list[Comparison]:
    """Each streaming learner against the river per-event LR peer of the same dataset, whose rows are
    backbone ``peer`` (None: no peer, the river_lr rows are a learner's). The peer is one run (seed 0,
    nothing random in it): every seed of a learner is paired with it period by period, so the interval
    over seeds is the learners' seed noise and the one over periods the periods'."""
    cells = _cells(rows)
    out = []
    for (dataset, protocol, backbone, strategy), cell in sorted(cells.items()):
        river = cells.get((dataset, protocol, peer, "ce")) if peer else None
        if backbone == peer or river is None:
            continue
        base = {(s, p): river[(0, p)] for s, p in cell if (0, p) in river}
        out += _paired((dataset, protocol, backbone, strategy), cell, base)
    return out


def _cells(rows: Sequence[dict[str, Any]]) -> dict[tuple, dict[tuple[int, int], dict[str, float]]]:
    """(dataset, protocol, backbone, strategy) -> (seed, period) -> metrics."""
    cells: dict[tuple, dict[tuple[int, int], dict[str, float]]] = defaultdict(dict)
    for r in rows:
        cells[(*_key(r), r["strategy"])][(r["seed"], r["period"])] = {m: r[m] for m in METRICS}
    return cells


def _paired(key: tuple[str, str, str, str], cell: dict, base: dict) -> list[Comparison]:
    """``cell`` against ``base`` over their common (seed, period) pairs, per metric: the periods every
    seed has (a seed whose run stopped early was averaged over fewer, and periods differ in difficulty
    far more than strategies do), and of those the pairs where both sides have a finite value."""
    pairs = sorted(set(cell) & set(base))
    seeds = sorted({s for s, _ in pairs})
    per_seed_periods = [{p for s2, p in pairs if s2 == s} for s in seeds]
    periods = sorted(set.intersection(*per_seed_periods)) if seeds else []
    pairs = [k for k in pairs if k[1] in periods]
    out = []
    for metric in METRICS:
        # A period with one class has no AUC, a diverged model no finite metric: the pair is left out of
        # both sides' means too (the strategy's mean was over fewer periods than its baseline's).
        both = [k for k in pairs if math.isfinite(cell[k][metric]) and math.isfinite(base[k][metric])]
        d = {k: cell[k][metric] - base[k][metric] for k in both}
        per_seed = _finite_means([[d[k] for k in both if k[0] == s] for s in seeds])
        per_period = _finite_means([[d[k] for k in both if k[1] == p] for p in periods])
        out.append(
            Comparison(
                *key,
                metric=metric,
                mean=float(np.mean([cell[k][metric] for k in both])) if both else math.nan,
                ce_mean=float(np.mean([base[k][metric] for k in both])) if both else math.nan,
                diff_seeds=t_interval(per_seed),
                diff_periods=t_interval(per_period),
                n_seeds=len(per_seed),
                n_periods=len(per_period),
                seed_wins=sum(BETTER[metric] * v > 0 for v in per_seed),
            )
        )
    return out


def _finite_means(groups: Sequence[Sequence[float]]) -> list[float]:
    """The mean of the finite values of each group that has one."""
    out = []
    for g in groups:
        x = np.asarray(g, dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size:
            out.append(float(x.mean()))
    return out


def _fmt(mean: float, half: float, scale: float = 1.0, digits: int = 2) -> str:
    if math.isnan(half):
        return f"{mean * scale:+.{digits}f}"
    return f"{mean * scale:+.{digits}f} ± {half * scale:.{digits}f}"


def _strategy_order(name: str) -> tuple[int, float, str]:
    loss, alpha, variant = split_strategy(name)
    return ({"ce": 0, "kd": 1, "reloop": 2}.get(loss, 3), float(alpha or 0), variant)


def markdown_tables(rows: Sequence[dict[str, Any]], peer: str | None = RIVER) -> str:
    """One table per (dataset, protocol, backbone): metrics and paired differences in 1e-3 units; then
    the differences against KD and against the river peer (``against_river``)."""
    comps = compare(rows)
    by_cell: dict[tuple, dict[str, dict[str, Comparison]]] = defaultdict(lambda: defaultdict(dict))
    for c in comps:
        by_cell[(c.dataset, c.protocol, c.backbone)][c.strategy][c.metric] = c
    means: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        means[(*_key(r), r["strategy"])]["auc"].append(r["auc"])
        means[(*_key(r), r["strategy"])]["logloss"].append(r["logloss"])
    parts = []
    header = (
        "| strategy | AUC | LogLoss | ΔAUC ×1e3 (seeds) | ΔAUC ×1e3 (periods) | ΔLogLoss ×1e3 (seeds) "
        "| ΔLogLoss ×1e3 (periods) | seeds better AUC / LogLoss | verdict AUC / LogLoss |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    cells = sorted({_key(r) for r in rows})
    for cell in cells:
        strategies = sorted({r["strategy"] for r in rows if _key(r) == cell}, key=_strategy_order)
        lines = [f"#### {cell[0]} · {cell[1]} · {cell[2]}".replace("#### ·", "####"), "", header]
        for s in strategies:
            m = means[(*cell, s)]
            auc_m, ll_m = _nanmean(m["auc"]), _nanmean(m["logloss"])
            comp = by_cell.get(cell, {}).get(s)
            if s == "ce" or not comp:
                lines.append(f"| {s} | {auc_m:.4f} | {ll_m:.4f} | | | | | | |")
                continue
            a, ll = comp["auc"], comp["logloss"]
            lines.append(
                f"| {s} | {auc_m:.4f} | {ll_m:.4f} "
                f"| {_fmt(*a.diff_seeds, 1e3)} | {_fmt(*a.diff_periods, 1e3)} "
                f"| {_fmt(*ll.diff_seeds, 1e3)} | {_fmt(*ll.diff_periods, 1e3)} "
                f"| {a.seed_wins}/{a.n_seeds} · {ll.seed_wins}/{ll.n_seeds} | {a.verdict} / {ll.verdict} |"
            )
        parts.append("\n".join(lines))
    titled = (
        ("ReLoop (and its variants) − KD at the same alpha", "vs kd", compare(rows, against_kd)),
        (
            "Each learner − the river per-event LR peer (one run, paired by period)",
            "vs river",
            against_river(rows, peer),
        ),
    )
    for title, versus, comps in titled:
        if comps:
            parts.append(_versus_table(title, versus, comps))
    return "\n\n".join(parts) + "\n"


def _versus_table(title: str, versus: str, comps: Sequence[Comparison]) -> str:
    lines = [
        f"#### {title} (×1e3, 95% over seeds / over periods)",
        "",
        "| dataset · protocol · backbone | strategy | ΔAUC (seeds) | ΔAUC (periods) | ΔLogLoss (seeds) "
        "| ΔLogLoss (periods) | verdict AUC / LogLoss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    by: dict[tuple, dict[str, Comparison]] = defaultdict(dict)
    for c in comps:
        by[(c.dataset, c.protocol, c.backbone, c.strategy)][c.metric] = c
    for (d, p, b, s), m in sorted(by.items()):
        a, ll = m["auc"], m["logloss"]
        cell = " · ".join(x for x in (d, p, b) if x)
        lines.append(
            f"| {cell} | {s} {versus} | {_fmt(*a.diff_seeds, 1e3)} | {_fmt(*a.diff_periods, 1e3)} "
            f"| {_fmt(*ll.diff_seeds, 1e3)} | {_fmt(*ll.diff_periods, 1e3)} "
            f"| {a.verdict} / {ll.verdict} |"
        )
    return "\n".join(lines)


def plot(
    rows: Sequence[dict[str, Any]], out_dir: Path, prefix: str = "", peer: str | None = RIVER
) -> list[Path]:
    """Per (protocol, backbone): metrics per period per strategy and the paired difference vs CE per
    period (band = 95% interval over seeds); plus one summary of all differences with both intervals.
    The river peer's rows (backbone ``peer``) are a dotted line in the panels of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    river = [r for r in rows if r["backbone"] == peer]
    for cell in sorted({_key(r) for r in rows if r["backbone"] != peer}):
        cell_rows = [r for r in rows if _key(r) == cell]
        strategies = sorted({r["strategy"] for r in cell_rows}, key=_strategy_order)
        colour = {s: f"C{i}" for i, s in enumerate(strategies)}  # the same colour in every panel
        periods = sorted({r["period"] for r in cell_rows})
        fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
        for j, metric in enumerate(METRICS):
            ax = axes[0, j]
            for s in strategies:
                ys = [
                    _nanmean([r[metric] for r in cell_rows if r["strategy"] == s and r["period"] == p])
                    for p in periods
                ]
                ax.plot(periods, ys, label=s, lw=2 if s == "ce" else 1, color=colour[s])
            riv = [r for r in river if r.get("dataset", "") == cell[0] and r["protocol"] == "streaming"]
            if riv:
                ax.plot(
                    [r["period"] for r in riv], [r[metric] for r in riv], "k:", label="river LR (per event)"
                )
            ax.set_title(f"{metric} per period (mean over seeds)")
            ax.grid(alpha=0.3)
            ax = axes[1, j]
            ce = {(r["seed"], r["period"]): r[metric] for r in cell_rows if r["strategy"] == "ce"}
            for s in strategies:
                if s == "ce":
                    continue
                mid, half = [], []
                for p in periods:
                    d = [
                        r[metric] - ce[(r["seed"], p)]
                        for r in cell_rows
                        if r["strategy"] == s and r["period"] == p and (r["seed"], p) in ce
                    ]
                    m, h = t_interval(d)
                    mid.append(m)
                    half.append(0.0 if math.isnan(h) else h)
                mid_a, half_a = np.array(mid), np.array(half)
                ax.plot(periods, mid_a, label=s, color=colour[s])
                ax.fill_between(periods, mid_a - half_a, mid_a + half_a, color=colour[s], alpha=0.12)
            ax.axhline(0, color="k", lw=0.8)
            better = "higher" if metric == "auc" else "lower"
            ax.set_title(f"{metric}: strategy − CE per period (95% over seeds; {better} is better)")
            ax.set_xlabel("period")
            ax.grid(alpha=0.3)
        _legend(axes[0, 0], fontsize=7, ncol=2)
        _legend(axes[1, 0], fontsize=7, ncol=2)
        fig.suptitle(" · ".join(x for x in cell if x))
        fig.tight_layout()
        path = out_dir / f"{prefix}{'_'.join(x for x in cell if x)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    comps = [c for c in compare([r for r in rows if r["backbone"] != peer])]
    if comps:
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * len(comps) / 2 + 2.5))
        for j, metric in enumerate(METRICS):
            ax = axes[j]
            cs = [c for c in comps if c.metric == metric]
            labels = [f"{c.protocol} {c.backbone} {c.strategy}" for c in cs]
            y = np.arange(len(cs))
            for off, attr, colour, name in (
                (-0.15, "diff_seeds", "C0", "over seeds"),
                (0.15, "diff_periods", "C1", "over periods"),
            ):
                m = np.array([getattr(c, attr)[0] for c in cs]) * 1e3
                h = np.nan_to_num(np.array([getattr(c, attr)[1] for c in cs]) * 1e3)
                ax.errorbar(m, y + off, xerr=h, fmt="o", color=colour, label=name, ms=3, capsize=2)
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(y, labels, fontsize=7)
            ax.set_title(f"Δ{metric} ×1e3 vs CE (95% intervals)")
            ax.grid(alpha=0.3)
        _legend(axes[0], fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{prefix}differences.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend where the axes have labelled artists (CE alone draws no differences: matplotlib would
    warn of an empty legend)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _nanmean(values: Any) -> float:
    """The mean of the values that are numbers; nan, without numpy's "Mean of empty slice" warning on the
    user's terminal, when none is (AUC is undefined on a period whose labels are all one class)."""
    a = np.asarray(values, dtype=np.float64)
    kept = a[~np.isnan(a)]
    return float(kept.mean()) if kept.size else math.nan
