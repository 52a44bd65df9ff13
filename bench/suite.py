"""The benchmark suite's small framework: result rows, same-process alternation, the markdown report.

This machine changes speed between processes (docs/performance.md), so every figure is measured
against its baseline in the same process, alternating the two over several rounds, and quoted as the
median of the per-round ratios:

>>> a, b, ratio = alternate(lambda: 2.0, lambda: 4.0, rounds=3, warmup=False)
>>> a, b, ratio
([2.0, 2.0, 2.0], [4.0, 4.0, 4.0], 0.5)
>>> median_ratio([1.0, 3.0, 10.0], [2.0, 2.0, 2.0])
1.5

A figure is a function ``run(ctx: Context) -> Figure`` in a module of this package, listed in
``FIGURES``; ``python -m reloop.bench`` runs each in its own child process and writes ``docs/benchmarks.md``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Row:
    """One measured figure next to its baseline.

    ``ratio`` is value / baseline (median of per-round ratios when measured by ``alternate``), or None
    where the figure has no baseline. ``met`` is None where the figure has no target.
    """

    figure: str
    value: float
    unit: str
    baseline_name: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        return cls(**data)


@dataclass
class Figure:
    """What one figure module returns: rows for the summary table and free markdown under its heading."""

    key: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: str = ""
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "rows": [r.to_dict() for r in self.rows],
            "notes": self.notes,
            "error": self.error,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        return cls(
            key=data["key"],
            title=data["title"],
            rows=[Row.from_dict(r) for r in data.get("rows", [])],
            notes=data.get("notes", ""),
            error=data.get("error"),
            seconds=float(data.get("seconds", 0.0)),
        )


@dataclass(frozen=True)
class Context:
    """What a figure needs to know about the run: ``quick`` shrinks sizes and rounds to a smoke test."""

    quick: bool = False
    rounds: int = 5
    scale_counts: tuple[int, ...] = (2,)  # figure 10: the M ranks and K join processes compared with 1

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full


@dataclass(frozen=True)
class FigureSpec:
    key: str
    title: str
    target: str  # "module:function", the module under reloop.bench

    def load(self) -> Callable[[Context], Figure]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(f"reloop.{module}"), func)


FIGURES: dict[str, FigureSpec] = {
    s.key: s
    for s in (
        FigureSpec(
            "e2e", "1. End to end: Kafka -> decode -> join -> featurise -> train", "bench.suite_e2e:run"
        ),
        FigureSpec("joiner", "2. The joiner alone", "bench.suite_joiner:run"),
        FigureSpec("kafka", "3. Kafka clients: kafka-python vs confluent-kafka", "bench.suite_kafka:run"),
        FigureSpec("serve", "4. The scoring service", "bench.suite_serve:run"),
        FigureSpec("snapshots", "5. Snapshots: write and publish-to-serving time", "bench.snapshots:run"),
        FigureSpec("replay", "6. Replay on MovieLens-100K", "bench.suite_replay:run"),
        FigureSpec("river", "7. river backbones", "bench.suite_river:run"),
        FigureSpec(
            "trainer", "8. Streaming trainer: new learner defaults vs the old ones", "bench.suite_trainer:run"
        ),
        FigureSpec(
            "stages", "9. Data plane v2: join stage, samples topic, train stage", "bench.suite_stages:run"
        ),
        FigureSpec(
            "scale", "10. Scale-out: data-parallel train ranks and join processes", "bench.suite_scale:run"
        ),
    )
}


# ---------------------------------------------------------------------------------------- math
def median_ratio(a_values: Sequence[float], b_values: Sequence[float]) -> float:
    """Median of the per-round ratios a_i / b_i (rounds paired by index)."""
    if len(a_values) != len(b_values) or not a_values:
        raise ValueError(f"need the same non-zero number of rounds, got {len(a_values)} and {len(b_values)}")
    return statistics.median(a / b for a, b in zip(a_values, b_values, strict=True))


def alternate(
    a_fn: Callable[[], float],
    b_fn: Callable[[], float],
    rounds: int,
    *,
    warmup: bool = True,
    between: Callable[[], None] | None = None,
) -> tuple[list[float], list[float], float]:
    """Run A and B ``rounds`` times each, alternating which goes first (AB, BA, AB, ...), so a drift in
    machine speed hits both alike; returns (a_values, b_values, median of per-round a/b).

    Each function returns its measurement (a rate, a time ...). ``warmup`` runs each once unrecorded
    first (first calls pay for caches, allocator growth, lazy imports). ``between`` runs before every
    measured call (``gc.collect`` by default), so one side's garbage is not collected on the other's clock.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    settle = between if between is not None else gc.collect
    if warmup:
        a_fn()
        b_fn()
    a_values: list[float] = []
    b_values: list[float] = []
    for r in range(rounds):
        order = ((a_fn, a_values), (b_fn, b_values))
        for fn, values in order if r % 2 == 0 else order[::-1]:
            settle()
            values.append(float(fn()))
    return a_values, b_values, median_ratio(a_values, b_values)


def alternate_many(
    fns: Sequence[Callable[[], float]],
    rounds: int,
    *,
    warmup: bool = True,
    between: Callable[[], None] | None = None,
) -> list[list[float]]:
    """``alternate`` for several contenders: round r runs them rotated by r (ABC, BCA, CAB, ...), so
    each takes every position equally often; returns one list of values per function."""
    if rounds < 1 or not fns:
        raise ValueError("need rounds >= 1 and at least one function")
    settle = between if between is not None else gc.collect
    if warmup:
        for fn in fns:
            fn()
    values: list[list[float]] = [[] for _ in fns]
    k = len(fns)
    for r in range(rounds):
        for i in range(k):
            j = (i + r) % k
            settle()
            values[j].append(float(fns[j]()))
    return values


def percentiles(values: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Linear-interpolated percentiles (numpy's default), without importing numpy."""
    if not values:
        return [math.nan for _ in qs]
    data = sorted(values)
    out = []
    for q in qs:
        pos = (len(data) - 1) * q / 100.0
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        out.append(data[lo] + (data[hi] - data[lo]) * (pos - lo))
    return out


# ---------------------------------------------------------------------------------------- report
def machine_info() -> dict[str, str]:
    info = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(terse=True),
    }
    for name in ("torch", "numpy", "river", "kafka", "confluent_kafka", "orjson"):
        try:
            mod = importlib.import_module(name)
            info[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            info[name] = "not installed"
    try:
        info["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        info["load"] = "?"
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_number(x: float | None) -> str:
    """Compact, human-sized numbers: 1,234,567 / 12,345 / 123.4 / 1.23 / 0.0123."""
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax == 0:
        return "0"
    return f"{x:.3g}"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: ""}[met]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: Sequence[Row]) -> str:
    head = "| figure | value | baseline | baseline value | ratio | target | met | command |\n"
    head += "|---|---:|---|---:|---:|---|---|---|\n"
    lines = []
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.3f}"
        base = "" if r.baseline_value is None else fmt_number(r.baseline_value)
        cells = [
            _cell(r.figure),
            f"{fmt_number(r.value)} {r.unit}".strip(),
            _cell(r.baseline_name),
            base,
            ratio,
            _cell(r.target),
            _met(r.met),
            f"`{r.command}`" if r.command else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def render_markdown(figures: Sequence[Figure], machine: dict[str, str], command: str, quick: bool) -> str:
    rows = [r for f in figures for r in f.rows]
    targeted = [r for r in rows if r.met is not None]
    met = sum(1 for r in targeted if r.met)
    parts = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {machine.get('date', '?')}"
        + (" (**--quick smoke run: sizes and rounds cut, numbers not representative**)" if quick else "")
        + ".",
        "",
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items() if k not in {"date", "load"})
        + f"; load average at the start {machine.get('load', '?')} (1/5/15 min).",
        "",
        "Method: each figure is measured against its baseline in the same process, alternating the two "
        "over several rounds (the machine changes speed from one process to the next); *ratio* is the "
        "median of the per-round ratios value/baseline, not the ratio of the medians shown. "
        "Each figure runs in its own child process.",
        "",
        f"Targets met: {met} of {len(targeted)}.",
        "",
        "## Summary",
        "",
        render_table(rows),
    ]
    for f in figures:
        parts += [f"## {f.title}", ""]
        if f.error:
            parts += [f"**Failed**: {f.error}", ""]
        if f.notes:
            parts += [f.notes.strip(), ""]
        parts += [f"_Figure run time: {f.seconds:.0f} s._", ""]
    return "\n".join(parts).rstrip() + "\n"
