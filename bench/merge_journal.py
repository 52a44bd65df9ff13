"""What the merge journal's fsync costs the join stage (engine/runtime/merge_journal.py).

A join task writes down each merge decision that took an input as complete, and fsyncs it before it
sends a sample that depends on it. This times that on the disk of ``--dir`` (the checkpoint folder's
disk; default: the system's temporary folder), in one process:

* one sync: add one decision, write and fsync it (``MergeJournal.sync``), ``--syncs`` times: the latency
  each send at the tail of a stream waits for (a caught-up task takes a decision on most steps);
* the join stage over an in-memory log (``bench/suite_stages.py``'s ``memory_join_rate``: decode, checks,
  merge, join, Arrow batches; Criteo-shaped), alternating rounds with the journal's fsync as it is and
  with it a no-op: samples/s, and how many syncs wrote something per 1,000 samples.

    .venv/bin/python -m reloop.bench.merge_journal [--dir PATH] [--syncs 500] [--rounds 6] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from reloop.bench.report import publish


def sync_latencies(folder: Path, syncs: int) -> np.ndarray:
    """Seconds per ``add`` + ``sync`` of one decision, ``syncs`` times, in a fresh journal in ``folder``."""
    from reloop.engine.runtime.merge_journal import MergeDecision, MergeJournal

    journal = MergeJournal.create(folder, "b0")
    out = np.empty(syncs)
    try:
        for i in range(syncs):
            t0 = time.perf_counter()
            journal.add([MergeDecision((i, 2 * i), (True, False))])
            journal.sync()
            out[i] = time.perf_counter() - t0
    finally:
        journal.close()
    return out


def filesystem_of(path: Path) -> str:
    """ "<type> on <device>, mounted at <point>" from /proc/mounts (the longest mount point above
    ``path``); "unknown" where there is no /proc/mounts."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown filesystem"
    real = str(path.resolve())
    above = [m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")]
    if not above:
        return "unknown filesystem"
    device, point, kind = max(above, key=lambda m: len(m[1]))
    return f"{kind} on {device}, mounted at {point}"


@contextlib.contextmanager
def counted_syncs(fsync: bool) -> Iterator[list[int]]:
    """Count the journal syncs that wrote something; with ``fsync=False`` their fsync is a no-op."""
    from reloop.engine.runtime import merge_journal

    count = [0]
    original_sync, original_os = merge_journal.MergeJournal.sync, merge_journal.os

    def sync(self: Any) -> None:
        if self._pending:
            count[0] += 1
        original_sync(self)

    merge_journal.MergeJournal.sync = sync  # type: ignore[method-assign]
    if not fsync:
        shim = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        shim.fsync = lambda fd: None
        merge_journal.os = shim  # type: ignore[assignment]
    try:
        yield count
    finally:
        merge_journal.MergeJournal.sync = original_sync  # type: ignore[method-assign]
        merge_journal.os = original_os


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="a folder on the checkpoint disk")
    ap.add_argument("--syncs", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--samples", type=int, default=40_960, help="Criteo-shaped samples per join pass")
    ap.add_argument("--out", type=Path, default=None, help="write the report here (else stdout only)")
    args = ap.parse_args(argv)

    from reloop.bench.suite_e2e import make_events
    from reloop.bench.suite_stages import memory_join_rate, stage_gc
    from reloop.engine.features.spec import criteo_spec
    from reloop.engine.runtime.config import StagesSection, default_of

    with tempfile.TemporaryDirectory(prefix="reloop-bench-journal-", dir=args.dir) as tmp:
        lat = sync_latencies(Path(tmp), args.syncs) * 1e3
        filesystem = filesystem_of(Path(tmp))
    imps, clicks = make_events(args.samples)
    spec = criteo_spec()
    rates: dict[bool, list[float]] = {True: [], False: []}
    per_k: dict[bool, list[float]] = {True: [], False: []}
    with stage_gc():
        for r in range(args.rounds):
            for fsync in (True, False) if r % 2 == 0 else (False, True):
                with counted_syncs(fsync) as count:
                    rates[fsync].append(memory_join_rate(imps, clicks, spec, args.samples))
                per_k[fsync].append(1000 * count[0] / args.samples)
    ratio = float(np.median([a / b for a, b in zip(rates[True], rates[False], strict=True)]))
    load = os.getloadavg()
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    lines = [
        "# The merge journal's fsync",
        "",
        f"Command: `.venv/bin/python -m reloop.bench.merge_journal {shlex.join(argv)}`",
        "",
        f"- folder: {args.dir or tempfile.gettempdir()} ({filesystem}); shared 2-core machine, load "
        f"average {load[0]:.1f} / {load[1]:.1f} (1 / 5 min) at the end",
        "",
        f"One sync (add one decision, write, fsync), {args.syncs} times: p50 {p50:.3f} ms, p90 {p90:.3f} ms, "
        f"p99 {p99:.3f} ms, max {lat.max():.3f} ms. A task that takes a decision before every send "
        f"(caught up at the tail) can send at most {1000 / p50:,.0f} messages/s at the p50.",
        "",
        f"The join stage over an in-memory log ({args.samples:,} Criteo-shaped samples per pass, "
        f"{args.rounds} alternating rounds):",
        "",
        "| journal fsync | samples/s per round | syncs that wrote, per 1,000 samples |",
        "| --- | --- | --- |",
    ]
    for fsync, label in ((True, "as it is"), (False, "a no-op")):
        lines.append(
            f"| {label} | {', '.join(f'{x:,.0f}' for x in rates[fsync])} | "
            f"{', '.join(f'{x:.1f}' for x in per_k[fsync])} |"
        )
    syncs_s = float(np.median(per_k[True])) * float(np.median(rates[True])) / 1000
    delay_ms = default_of(StagesSection, "max_delay_ms")
    lines += [
        "",
        f"Ratio (median of the rounds' ratios, fsync as it is / a no-op): {ratio:.3f}. What the syncs "
        f"should cost here: {syncs_s:,.1f} syncs/s x {p50:.3f} ms = {syncs_s * p50 / 10:.2f}% of the "
        "stage's time (a backlog: the merge seldom waits on a complete input). At the tail, with a "
        f"message every `stages.max_delay_ms` ({delay_ms} ms) and a decision before each: "
        f"{p50 / delay_ms:.2%} of the time, and each message {p50:.3f} ms later.",
    ]
    return publish(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
