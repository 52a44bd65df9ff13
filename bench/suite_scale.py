"""Figure 10: scale-out on this machine: M data-parallel train ranks and K join processes.

Rows (named so they can be found by name):

* "train ranks, M = 2 vs M = 1, DCN, global batch 1024, sparse table sync": the train stage over an
  in-memory samples topic of Criteo-shaped samples (4 partitions), one process per rank (real
  torch.distributed, gloo, 1 torch thread each), samples/s from the first step to the last, against
  M = 1 (one process, the same stage) in the same round. The same with the table's gradient
  all-reduced dense instead of its touched rows all-gathered (``distributed.embedding_sync``).
* "join processes, K = 2 vs K = 1, kafka-python": K ``JoinStage`` processes in one consumer group
  over 4-partition raw topics on the local broker; samples/s once every process owns tasks (the
  rebalance itself is not timed), against K = 1 in the same round.

Both need more cores than they use to show scaling: on this 2-core machine the broker, the parent and
the ranks share two cores, so the rows say what two processes get here, and the notes say so. Where a
machine with more cores is available, ``--scale-counts 2,4`` (of ``python -m reloop.bench``) adds the rows
for M = 4 and K = 4 in the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from reloop.bench.suite import Context, Figure, Row

COMMAND = "python -m reloop.bench --only scale"
TITLE = "10. Scale-out: data-parallel train ranks and join processes"
PARTITIONS = 4
TOPIC = "samples"


# ------------------------------------------------------------------ train ranks
def _samples_log(n: int):
    from reloop.bench.suite_e2e import make_events
    from reloop.connectors.memory import MemoryLog
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
    from reloop.engine.events.schema import LabeledSample

    imps, clicks = make_events(n)
    clicked = {c.impression_id for c in clicks}
    parts: list[list[Any]] = [[] for _ in range(PARTITIONS)]
    for i, e in enumerate(imps[:n]):
        y = int(e.impression_id in clicked)
        parts[i % PARTITIONS].append(
            LabeledSample(
                e.impression_id, e.features, y, e.served_prediction, e.model_version, e.event_time_ms
            )
        )
    log = MemoryLog()
    log.create(TOPIC, PARTITIONS)
    for p, part in enumerate(parts):
        for i in range(0, len(part), 1024):
            chunk = part[i : i + 1024]
            log.append(TOPIC, encode_batch(batch_from_samples(chunk, task=p, first_seq=i)), None,
                       chunk[-1].event_time_ms, partition=p)  # fmt: skip
    return log


def _train_rank(rank: int, world: int, init: str | None, n: int, sync: str, work: str, out: Any) -> None:
    import torch
    from reloop.connectors.memory import MemorySource
    from reloop.engine.features.spec import criteo_spec
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.build import build_train_stage
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.streams import PartitionShare
    from reloop.engine.train.data_parallel import RankGroup

    torch.set_num_threads(1)
    log = _samples_log(n)
    cfg = load_config_dict(
        {
            "model": {"backbone": "dcn", "strategy": "reloop", "alpha": 0.2, "spec": criteo_spec().to_dict()},
            "train": {"batch_size": 1024, "threads": 1},
            "period": {"every_samples": 10**12},
            "stages": {"samples_topic": TOPIC},
            "checkpoint": {"dir": str(Path(work) / "snaps")},
            "consumer": {"group_id": None},
            "distributed": {"embedding_sync": sync, "max_wait_ms": 0},
        },
        env={},
    )
    group = RankGroup.start(rank=rank, world_size=world, init_method=init, timeout_s=600) if init else None
    stage = build_train_stage(
        cfg, source=MemorySource(log, [TOPIC], share=PartitionShare(rank, world)), stats=EngineStats(),
        group=group,
    )  # fmt: skip
    stage.open()
    target = (n // 1024) * 1024
    t0 = time.perf_counter()
    if group is None:
        while stage.trainer.counters.samples < target:
            stage.step()
    else:
        while not stage.stop_agreed:
            if stage._global_samples >= target:
                stage.request_stop()
            stage.step()
    out.put((rank, target, time.perf_counter() - t0))
    stage.close(final=None)
    if group is not None:
        group.close()


def train_rate(world: int, n: int, sync: str = "sparse") -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="reloop-bench-ranks-") as tmp:
        init = None if world == 1 else f"file://{tmp}/store"
        procs = [
            ctx.Process(target=_train_rank, args=(r, world, init, n, sync, tmp, out)) for r in range(world)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join(120)
    samples = results[0][1]
    return samples / max(seconds for _, _, seconds in results)


# ------------------------------------------------------------------ join processes
class PassStalled(RuntimeError):
    """A join process's consumer stalled (reloop.engine.runtime.join_stage.ConsumerStalled) in this pass."""


def join_rate_retried(
    bootstrap: str, raw: tuple[str, str], expected: int, k: int, stalls: list[str]
) -> float:
    """``join_rate``, run again (up to 3 times) when a consumer stalls; each stall is noted in ``stalls``."""
    for _ in range(3):
        try:
            return join_rate(bootstrap, raw, expected, k)
        except PassStalled as exc:
            stalls.append(str(exc))
    raise RuntimeError(f"K = {k}: the join consumers stalled 3 times in a row")


def join_rate(bootstrap: str, raw: tuple[str, str], expected: int, k: int) -> float:
    from reloop.connectors.kafka.admin import create_topics

    samples_topic = f"bench.kjoined.{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {samples_topic: PARTITIONS})
    ctx = mp.get_context("spawn")
    sent = ctx.Value("q", 0)
    owners = ctx.Array("b", k)
    stalled = ctx.Value("b", 0)
    ready = ctx.Barrier(k)  # the K members join the group together, after their imports
    group_id = f"bench-k{k}-{uuid.uuid4().hex[:8]}"
    procs = [
        ctx.Process(
            target=_join_owner,
            args=(bootstrap, raw, group_id, samples_topic, expected, sent, owners, ready, stalled, i),
        )
        for i in range(k)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 900

    def waiting(done: Callable[[], bool]) -> bool:
        dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if dead:  # a join process that died would leave this loop waiting for the deadline
            codes = [procs[i].exitcode for i in dead]
            raise RuntimeError(f"K = {k}: join process(es) {dead} exited with {codes}")
        if stalled.value:
            raise PassStalled(f"K = {k}: a join consumer stalled")
        if not done() and all(p.exitcode is not None for p in procs):
            raise RuntimeError(f"K = {k}: the join processes finished before every one of them owned a task")
        return not done() and time.monotonic() < deadline

    while waiting(lambda: all(owners[:])):
        time.sleep(0.01)
    t1, start = time.perf_counter(), sent.value
    while waiting(lambda: sent.value >= expected):
        time.sleep(0.01)
    t2, end = time.perf_counter(), sent.value
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    if end < expected:
        raise RuntimeError(f"K = {k} join processes emitted {end} of {expected} samples")
    if end - start < expected // 4:
        raise RuntimeError(f"K = {k}: only {end - start} samples after the group settled; use more events")
    return (end - start) / (t2 - t1)


def _join_owner(bootstrap: str, raw: tuple[str, str], group_id: str, samples_topic: str, expected: int,
                sent: Any, owners: Any, ready: Any, stalled: Any, index: int) -> None:  # fmt: skip
    from reloop.bench.suite_stages import join_stage_parts
    from reloop.engine.runtime.join_stage import ConsumerStalled

    tmp = tempfile.mkdtemp(prefix="reloop-bench-kjoin-")
    stage = join_stage_parts(bootstrap, raw, group_id, samples_topic, tmp)
    ready.wait(300)
    last = 0
    try:
        while sent.value < expected:
            stage.step()
            owners[index] = 1 if stage.tasks else 0
            new = stage.samples_sent - last
            if new:
                with sent.get_lock():
                    sent.value += new
                last = stage.samples_sent
    except ConsumerStalled:
        stalled.value = 1  # the pass is run again (the supervisor's rebuild would be timed otherwise)
    finally:
        stage.abort()


# ------------------------------------------------------------------ the figure
def run(ctx: Context) -> Figure:
    from reloop.bench.suite_broker import local_broker
    from reloop.bench.suite_e2e import make_events
    from reloop.bench.suite_stages import fill_partitioned_topics

    n = ctx.pick(40_960, 8_192)
    rounds = min(ctx.rounds, 3)
    counts = sorted({2, *(c for c in ctx.scale_counts if 2 <= c <= PARTITIONS)})  # M and K; 2 always
    rows: list[Row] = []
    lines = ["| row | engine per round | baseline per round | ratio |", "|---|---|---|---:|"]
    # M = 1 and every M of ``counts`` with the sparse table sync; M = 2 also with the dense one.
    setups = [("m1", 1, "sparse"), *[(f"m{m}", m, "sparse") for m in counts], ("m2d", 2, "dense")]
    ranks: dict[str, list[float]] = {key: [] for key, _, _ in setups}
    for r in range(rounds + 1):  # round 0 warms up (imports, first compilation), unrecorded
        order = setups if r % 2 == 0 else setups[::-1]
        got = {key: train_rate(world, n, sync) for key, world, sync in order}
        if r:
            for key in ranks:
                ranks[key].append(got[key])
    m1 = ranks["m1"]
    for m in counts:
        mm = ranks[f"m{m}"]
        ratio = statistics.median(a / b for a, b in zip(mm, m1, strict=True))
        name = f"train ranks, M = {m} vs M = 1, DCN, global batch 1024, sparse table sync"
        rows.append(
            Row(figure=name, value=float(np.median(mm)), unit="samples/s", baseline_name="M = 1, same stage",
                baseline_value=float(np.median(m1)), ratio=ratio, target=f">= {0.8 * m:g} (0.8 x M)",
                met=ratio >= 0.8 * m, command=COMMAND)
        )  # fmt: skip
        lines.append(f"| {name} | {', '.join(f'{x:,.0f}' for x in mm)} | "
                     f"{', '.join(f'{x:,.0f}' for x in m1)} | {ratio:.3f} |")  # fmt: skip
    m2, m2_dense = ranks["m2"], ranks["m2d"]
    dense_ratio = statistics.median(a / b for a, b in zip(m2_dense, m2, strict=True))
    dname = "train ranks, M = 2, dense table all-reduce vs sparse row all-gather"
    rows.append(
        Row(figure=dname, value=float(np.median(m2_dense)), unit="samples/s",
            baseline_name="M = 2, sparse row all-gather", baseline_value=float(np.median(m2)),
            ratio=dense_ratio, command=COMMAND)
    )  # fmt: skip
    lines.append(f"| {dname} | {', '.join(f'{x:,.0f}' for x in m2_dense)} | "
                 f"{', '.join(f'{x:,.0f}' for x in m2)} | {dense_ratio:.3f} |")  # fmt: skip

    # More events for more processes: K members take longer to settle into the group, and a pass must
    # time at least a quarter of its events after they have.
    events = ctx.pick(163_840, 32_768) * max(1, counts[-1] // 2)
    imps, clicks = make_events(events)
    joins: dict[int, list[float]] = {k: [] for k in (1, *counts)}
    stalls: list[str] = []
    with local_broker() as bootstrap:
        raw = fill_partitioned_topics(bootstrap, imps, clicks, PARTITIONS)
        expected = events  # the sentinels close every window; each impression but them is one sample
        for r in range(rounds):
            for k in list(joins) if r % 2 == 0 else list(joins)[::-1]:
                joins[k].append(join_rate_retried(bootstrap, raw, expected, k, stalls))
    k1 = joins[1]
    for k in counts:
        kk = joins[k]
        jratio = statistics.median(a / b for a, b in zip(kk, k1, strict=True))
        jname = f"join processes, K = {k} vs K = 1, kafka-python"
        rows.append(
            Row(figure=jname, value=float(np.median(kk)), unit="samples/s",
                baseline_name="K = 1, same topics", baseline_value=float(np.median(k1)), ratio=jratio,
                target=f">= {0.8 * k:g} (0.8 x K)", met=jratio >= 0.8 * k, command=COMMAND)
        )  # fmt: skip
        lines.append(f"| {jname} | {', '.join(f'{x:,.0f}' for x in kk)} | "
                     f"{', '.join(f'{x:,.0f}' for x in k1)} | {jratio:.3f} |")  # fmt: skip
    load = os.getloadavg()
    notes = "\n".join(
        [
            f"Train ranks: {n:,} Criteo-shaped samples in 4 partitions (in memory), DCN registry defaults "
            f"with the default optimizer, ReLoop 0.2, global batch 1024 (1024 / M per rank), one torch "
            f"thread per rank, {rounds} rounds after a warm-up, the set-ups rotated each round. Join "
            f"processes: {events:,} impressions over 4-partition topics on the local broker, one consumer "
            f"group per pass, timed once every process owns tasks; a pass whose consumer stalled (not in its "
            f"group, or fetching nothing, for 30 s) was run again: {len(stalls)} time(s). "
            f"Load average at the end {load[0]:.1f} / "
            f"{load[1]:.1f} (1/5 min) on {os.cpu_count()} cores, shared with the broker: M or K processes "
            f"cannot get more than the cores there are, so these ratios bound what this machine shows, not "
            f"what more cores would. M and K compared with 1: {', '.join(map(str, counts))} "
            f"(`--scale-counts`).",
            "",
            *lines,
        ]
    )
    return Figure(key="scale", title=TITLE, rows=rows, notes=notes)
