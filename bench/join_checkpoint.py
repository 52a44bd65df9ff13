"""A join task's checkpoint: the joiner's state as columns against the same state as lists.

The join stage checkpoints every task's whole join state (engine/runtime/join_stage.py): every pending
impression with its payload. This times what one checkpoint and one restore cost for N pending
impressions of ~850 B (distinct payloads, Criteo-sized), plus N/4 closed ones, in the two layouts the
joiner can write: ``columns`` (format 2: ids, times and payloads each one uint8 tensor, with lengths)
and ``lists`` (format 1: ``[id, time, payload]`` per impression, what it wrote before). Both go through
the same ``SnapshotRegistry`` (torch.save, CRC32C, fsync) on the same disk, alternating, one process;
the ratio is the median of the per-round ratios lists / columns.

    .venv/bin/python -m reloop.bench.join_checkpoint [--pending 50000,200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def make_joiner(pending: int) -> Any:
    from reloop.engine.join.joiner import Joiner, JoinerConfig

    clock = [0]
    j = Joiner(JoinerConfig(window_ms=60_000, retention_ms=3_600_000), clock=lambda: clock[0])
    base = os.urandom(419).hex().encode()  # 838 B + a 12-digit counter
    t0 = 1_700_000_000_000
    closed = pending // 4
    for i in range(closed):  # these windows close (the watermark passes them below): closed entries
        j.on_impression(f"imp-{i:012d}", t0 + i, base + b"%012d" % i)
    late = t0 + closed + 120_000
    for i in range(closed, closed + pending):  # spread over 30 s: all inside the 60 s window, pending
        j.on_impression(f"imp-{i:012d}", late + (i - closed) * 30_000 // pending, base + b"%012d" % i)
    return j


def lists_state(j: Any) -> dict[str, Any]:
    return j.state_dict(columns=False)


def columns_state(j: Any) -> dict[str, Any]:
    from reloop.engine.checkpoint.blobs import saveable

    return saveable(j.state_dict())


def one_round(j: Any, layout: str, work: Path) -> dict[str, float]:
    from reloop.engine.checkpoint.blobs import loadable
    from reloop.engine.checkpoint.registry import SnapshotRegistry
    from reloop.engine.join.joiner import Joiner

    root = work / f"{layout}-{time.perf_counter_ns()}"
    reg = SnapshotRegistry(root, keep=1)
    t = time.perf_counter()
    state = lists_state(j) if layout == "lists" else columns_state(j)
    t_state = time.perf_counter() - t
    t = time.perf_counter()
    reg.publish({"state": {"joiner": state}})
    t_publish = time.perf_counter() - t
    size = sum(f.stat().st_size for f in reg.path(1).iterdir())
    t = time.perf_counter()
    restored = Joiner(j.config, j.clock)
    restored.load_state_dict(loadable(reg.load(1).state["state"]["joiner"]))
    t_restore = time.perf_counter() - t
    if restored.pending_count != j.pending_count or restored.closed_count != j.closed_count:
        raise AssertionError(f"{layout}: restored joiner differs")
    shutil.rmtree(root, ignore_errors=True)
    return {"checkpoint_s": t_state + t_publish, "state_s": t_state, "restore_s": t_restore, "mb": size / 1e6}


def measure(pending: int, rounds: int) -> dict[str, Any]:
    j = make_joiner(pending)
    out: dict[str, list[dict[str, float]]] = {"columns": [], "lists": []}
    with tempfile.TemporaryDirectory(prefix="bench-join-ckpt-") as tmp:
        for _ in range(rounds):
            for layout in ("columns", "lists"):
                out[layout].append(one_round(j, layout, Path(tmp)))
    med = {layout: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for layout, rs in out.items()}
    ratio = {
        k: statistics.median(b[k] / a[k] for a, b in zip(out["columns"], out["lists"], strict=True))
        for k in ("checkpoint_s", "restore_s")
    }
    return {"pending": j.pending_count, "closed": j.closed_count, "median": med, "ratio": ratio}


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--pending", default="50000,200000")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"load average at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| pending | closed | layout | checkpoint s | of which state s | restore s | MB | lists/columns |")
    print("|---:|---:|---|---:|---:|---:|---:|---|")
    for n in (int(x) for x in args.pending.split(",")):
        res = measure(n, args.rounds)
        for layout in ("columns", "lists"):
            m = res["median"][layout]
            ratio = (
                f"checkpoint {res['ratio']['checkpoint_s']:.1f}x, restore {res['ratio']['restore_s']:.1f}x"
                if layout == "lists"
                else ""
            )
            print(f"| {res['pending']:,} | {res['closed']:,} | {layout} | {m['checkpoint_s']:.3f} | "
                  f"{m['state_s']:.3f} | {m['restore_s']:.3f} | {m['mb']:.0f} | {ratio} |")  # fmt: skip
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
