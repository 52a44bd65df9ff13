"""Joiner benchmark: events/s on one core, and memory per pending impression.

    .venv/bin/python -m reloop.bench.joiner                      # defaults: 1M events, 1M pending
    .venv/bin/python -m reloop.bench.joiner --events 300000 --pending 200000   # quick

Throughput: a time-ordered stream of impressions and clicks (30% of impressions clicked inside the
window, 5% clicked after it, 3% duplicated), window 60 s of event time at 1,000 impressions/s, so about
60k impressions are pending in steady state; events/s counts impressions + clicks fed.

Memory: ``--pending`` impressions inserted with a window that never closes; RSS growth divided by the
count, (a) with the payload bytes already alive elsewhere (the joiner's own structures), and (b) with
payloads created for the joiner alone (what a run really holds: the raw record value is the payload).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import psutil
from reloop.bench.suite_joiner import make_stream
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Impression
from reloop.engine.join.joiner import Joiner, JoinerConfig


def _payload(i: int, fields: int) -> bytes:
    feats: dict[str, str | int] = {f"C{k}": f"{(i * 7919 + k) % 100000:x}" for k in range(fields - 13)}
    feats.update({f"I{k}": (i + k) % 1000 for k in range(13)})
    return encode(Impression(
        impression_id=f"{i:032x}", request_id=f"r{i:031x}", user_id=f"u{i % 100000}", item_id=f"it{i % 5000}",
        features=feats, event_time_ms=1_700_000_000_000 + i, served_prediction=0.1234, model_version=7,
    ))


def _joiner_pass(events: list[tuple[int, str, int]], payload: bytes) -> float:
    j = Joiner(JoinerConfig(window_ms=60_000, allowed_lateness_ms=1_000, late_click_policy="correct",
                            retention_ms=120_000), clock=lambda: 0)
    on_imp, on_click = j.on_impression, j.on_click
    gc.collect()
    t0 = time.perf_counter()
    for kind, iid, t in events:
        if kind == 0:
            on_imp(iid, t, payload)
        else:
            on_click(iid, t)
    j.flush()
    return len(events) / (time.perf_counter() - t0)


def _dict_pass(events: list[tuple[int, str, int]], payload: bytes) -> float:
    """The floor of any Python joiner: insert on impression, pop on click, the rest emitted at the end
    (no window, watermark, dedup, late clicks or bounds)."""
    pending: dict[str, tuple[int, bytes]] = {}
    out: list[tuple[str, int]] = []
    gc.collect()
    t0 = time.perf_counter()
    for kind, iid, t in events:
        if kind == 0:
            pending[iid] = (t, payload)
        else:
            e = pending.pop(iid, None)
            if e is not None:
                out.append((iid, 1))
    out.extend((k, 0) for k in pending)
    return len(events) / (time.perf_counter() - t0)


def bench_throughput(n_events: int, rounds: int) -> dict[str, float]:
    """Joiner and bare dict join alternate round by round in this process (A B, B A, ...)."""
    events = make_stream(n_events)
    payload = _payload(1, 39)
    joiner: list[float] = []
    bare: list[float] = []
    for r in range(rounds):
        order = [(_joiner_pass, joiner), (_dict_pass, bare)]
        for fn, into in order if r % 2 == 0 else order[::-1]:
            into.append(fn(events, payload))
    ratios = [a / b for a, b in zip(joiner, bare, strict=True)]
    return {"events_per_s_median": statistics.median(joiner), "events_per_s_min": min(joiner),
            "events_per_s_max": max(joiner), "dict_median": statistics.median(bare),
            "ratio_median": statistics.median(ratios)}


def _rss() -> int:
    gc.collect()
    return psutil.Process(os.getpid()).memory_info().rss


def bench_memory(n_pending: int, fields: int) -> dict[str, float]:
    ids = [f"{i:032x}" for i in range(n_pending)]  # ids arrive with the record anyway
    size = len(_payload(1, fields))
    shared = _payload(1, fields)
    cfg = JoinerConfig(window_ms=10**12, max_pending=n_pending + 1, ttl_ms=10**12)
    base = _rss()
    j = Joiner(cfg, clock=lambda: 0)
    for i, iid in enumerate(ids):
        j.on_impression(iid, 1_700_000_000_000 + i, shared)
    own = (_rss() - base) / n_pending
    del j
    gc.collect()
    base = _rss()
    j = Joiner(cfg, clock=lambda: 0)
    for i, iid in enumerate(ids):
        # A distinct bytes object per impression, as the raw record values are.
        j.on_impression(iid, 1_700_000_000_000 + i, shared[:-1] + b"}")
    total = (_rss() - base) / n_pending
    assert j.pending_count == n_pending
    return {"pending": n_pending, "payload_bytes": size, "own_bytes_per_pending": own,
            "total_bytes_per_pending": total, "id_chars": len(ids[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--pending", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"python {os.sys.version.split()[0]}, pid {os.getpid()}")
    t = bench_throughput(args.events, args.rounds)
    print(f"throughput: {t['events_per_s_median']:,.0f} events/s median over {args.rounds} rounds "
          f"(min {t['events_per_s_min']:,.0f}, max {t['events_per_s_max']:,.0f}); bare dict join "
          f"{t['dict_median']:,.0f} events/s; joiner/dict {t['ratio_median']:.3f} (median per-round ratio)")
    for fields in (3, 39):
        mem = bench_memory(args.pending, fields)
        print(f"memory, {mem['pending']:,} pending, {fields}-field impressions "
              f"({mem['payload_bytes']} B payload, "
              f"{mem['id_chars']}-char ids): joiner structures {mem['own_bytes_per_pending']:.0f} B/pending, "
              f"with payload {mem['total_bytes_per_pending']:.0f} B/pending")


if __name__ == "__main__":
    main()
