"""Quality parity of data-parallel train ranks: MovieLens-100K through the train stage with M = 1, 2, 4
ranks (real torch.distributed, gloo, one process per rank), progressive AUC / LogLoss against M = 1.

The samples topic is built in memory the way the join stage writes it: P = 4 partitions, a sample's
partition from its id (as Kafka's key partitioner would), time order inside each partition, Arrow
batches of 256. Rank r trains the partitions p % M == r; the global batch stays ``--batch`` (each rank
takes batch // M per step, data-parallel steps average the gradients over all ranks' samples), the lr
is unchanged. Every rank keeps its progressive (predict-then-learn) scores; the figure is AUC / LogLoss
over the union, so every sample is scored once by the model of its step. Seeds change the model's
initialisation (model.seed); the sample order is the data's.

    python -m reloop.bench.ranks_parity [--rows 100000] [--seeds 0,1,2] [--ranks 1,2,4] [--out docs/...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(os.environ.get("RELOOP_DATA", "/work/shared/data")) / "movielens-100k"
PARTITIONS = 4
TOPIC = "samples"


def _samples(rows: int) -> list[Any]:
    import itertools

    from reloop.connectors.files.datasets import open_dataset
    from reloop.connectors.files.datasets.events import to_samples

    ds = open_dataset("movielens-100k", DATA)
    return list(to_samples(itertools.islice(ds.rows(), rows)))


def _config(rows: int, batch: int, seed: int, work: Path) -> dict[str, Any]:
    from reloop.connectors.files.datasets import open_dataset
    from reloop.connectors.files.datasets.spec import feature_spec

    fields = open_dataset("movielens-100k", DATA).fields
    return {
        "model": {"backbone": "dcn", "strategy": "reloop", "alpha": 0.2, "seed": seed,
                  "spec": feature_spec(fields, buckets=10_000).to_dict()},
        "train": {"batch_size": batch, "y_last": "snapshot", "threads": 1, "progressive_window": rows + 1},
        "period": {"every_samples": 10_000},
        # One message (256 samples) per poll, the partitions in turn. The figure depends on the order in
        # which the partitions reach the trainer: M = 1 scored 0.9e-3 AUC higher with 64 messages per poll.
        "stages": {"samples_topic": TOPIC, "train_poll_messages": 1},
        "checkpoint": {"dir": str(work / "snaps"), "keep": 2},
        "consumer": {"group_id": None},
        # Full shares only (a partial step after 2 s: the end of the data). With 0, ranks step on whatever
        # they hold, and which samples share a step then depends on the machine's scheduling: M = 4 on 2
        # cores moved AUC by +-8e-3 between runs that way.
        "distributed": {"max_wait_ms": 2000},
    }  # fmt: skip


def _partitions(rows: int) -> list[list[Any]]:
    parts: list[list[Any]] = [[] for _ in range(PARTITIONS)]
    for s in _samples(rows):
        parts[zlib.crc32(s.sample_id.encode()) % PARTITIONS].append(s)
    return parts


def _log(rows: int, same_steps_as: int | None = None, batch: int = 512):
    """The samples topic; with ``same_steps_as=M``, one partition whose messages are the steps of an
    M-rank run in order (each rank's batch // M, from its partitions' 256-sample messages in the train
    stage's merge order): a single process trained on it sees exactly the M ranks' steps."""
    from reloop.connectors.memory import MemoryLog
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch

    parts = _partitions(rows)
    total = sum(len(p) for p in parts)
    log = MemoryLog()
    if same_steps_as is None:
        log.create(TOPIC, PARTITIONS)
        for p, part in enumerate(parts):
            for i in range(0, len(part), 256):
                chunk = part[i : i + 256]
                log.append(TOPIC, encode_batch(batch_from_samples(chunk, task=p, first_seq=i)), None,
                           chunk[-1].event_time_ms, partition=p)  # fmt: skip
        return log, total
    world = same_steps_as
    share = batch // world
    streams = []
    for r in range(world):
        # The train stage merges its partitions' messages by (timestamp, partition, offset): merge.py.
        messages = [
            (part[i : i + 256][-1].event_time_ms, p, i, part[i : i + 256])
            for p, part in enumerate(parts)
            if p % world == r
            for i in range(0, len(part), 256)
        ]
        streams.append([x for *_, chunk in sorted(messages, key=lambda m: m[:3]) for x in chunk])
    log.create(TOPIC, 1)
    seq = 0
    for k in range(0, max(len(s) for s in streams), share):
        step = [x for stream in streams for x in stream[k : k + share]]
        log.append(TOPIC, encode_batch(batch_from_samples(step, task=0, first_seq=seq)), None,
                   max(x.event_time_ms for x in step), partition=0)  # fmt: skip
        seq += len(step)
    return log, total


def _rank(
    rank: int, world: int, init: str | None, cfg: dict, rows: int, out: str, same_steps_as: int | None = None
) -> None:
    import torch
    from reloop.connectors.memory import MemorySource
    from reloop.engine.metrics.rolling_batch import window_arrays
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.build import build_train_stage
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.streams import PartitionShare
    from reloop.engine.train.data_parallel import RankGroup

    torch.set_num_threads(1)
    log, total = _log(rows, same_steps_as, cfg["train"]["batch_size"])
    group = RankGroup.start(rank=rank, world_size=world, init_method=init, timeout_s=300) if init else None
    stage = build_train_stage(
        load_config_dict(cfg, env={}),
        source=MemorySource(log, [TOPIC], share=PartitionShare(rank, world)),
        stats=EngineStats(),
        group=group,
    )
    stage.open()
    t0 = time.perf_counter()
    if group is None:
        while stage.trainer.counters.samples + stage.buffered_samples < total or stage.buffered_samples:
            if stage.step() == 0 and stage.buffered_samples:
                stage.train_remaining()
    else:
        while not stage.stop_agreed:
            if stage._global_samples >= total:
                stage.request_stop()
            stage.step()
    seconds = time.perf_counter() - t0
    window = stage.trainer.progressive.state_dict()
    ys, ps = window_arrays(window["y"], window["p"])
    stage.close(final=None)
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"y": ys.tolist(), "p": ps.tolist(), "seconds": seconds, "samples": len(ys)})
    )
    if group is not None:
        group.close()


def run_once(world: int, seed: int, rows: int, batch: int, same_steps: bool = False) -> dict[str, float]:
    """M ranks, or (``same_steps``) one process fed exactly the steps M ranks take."""
    from reloop.engine.metrics.offline import auc, logloss

    with tempfile.TemporaryDirectory(prefix="reloop-parity-") as tmp:
        work = Path(tmp)
        cfg = _config(rows, batch, seed, work)
        if same_steps:
            _rank(0, 1, None, cfg, rows, tmp, same_steps_as=world)
            world_run = 1
        elif world == 1:
            _rank(0, 1, None, cfg, rows, tmp)
            world_run = 1
        else:
            ctx = mp.get_context("spawn")
            init = f"file://{work / 'store'}"
            procs = [ctx.Process(target=_rank, args=(r, world, init, cfg, rows, tmp)) for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(3600)
            if any(p.exitcode != 0 for p in procs):
                raise RuntimeError(f"a rank failed: {[p.exitcode for p in procs]}")
            world_run = world
        parts = [json.loads((work / f"rank{r}.json").read_text()) for r in range(world_run)]
    y = np.concatenate([np.asarray(p["y"], dtype=np.float64) for p in parts])
    s = np.concatenate([np.asarray(p["p"], dtype=np.float64) for p in parts])
    return {
        "ranks": world, "seed": seed, "samples": len(y), "auc": auc(y, s), "logloss": logloss(y, s),
        "seconds": max(p["seconds"] for p in parts), "same_steps": same_steps,
    }  # fmt: skip


def report(all_results: list[dict[str, float]], rows: int, batch: int, command: str) -> str:
    results = [r for r in all_results if not r.get("same_steps")]
    same = {(r["ranks"], r["seed"]): r for r in all_results if r.get("same_steps")}
    by_seed_m1 = {r["seed"]: r for r in results if r["ranks"] == 1}
    lines = [
        "# Data-parallel train ranks: quality parity on MovieLens-100K",
        "",
        f"Command: `{command}` (load average at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, one torch thread per rank).",
        "",
        f"{rows:,} rows, DCN (registry defaults), ReLoop alpha 0.2 with y_last from the previous "
        f"snapshot (every 10,000 samples), global batch {batch} (each of M ranks takes {batch} // M per "
        "step, a partial step only after a rank waited 2 s, i.e. at the end of the data; gradients "
        "averaged over the step's samples), lr unchanged, one message of 256 samples per poll, merged "
        "by timestamp across a rank's partitions, the samples topic in 4 "
        "partitions (rank r trains p % M == r). Progressive metrics: each sample scored by the model of "
        "its step before it is learned, over every sample. Seeds vary the initialisation.",
        "",
        "*Same steps, one process*: a single process trained on a one-partition topic whose messages are "
        "exactly the M ranks' steps in order (each rank's batch // M from its partitions' messages, in the "
        "order the train stage merges them: by timestamp, partition, offset). "
        "It separates what data parallelism does (M ranks against it: gradient sync, agreement rounds) from "
        "what the order of the data does (it against M = 1: which samples share a step).",
        "",
        "| ranks | seed | samples | AUC | LogLoss | AUC - M=1 (same seed) | LogLoss - M=1 "
        "| AUC same steps, one process | AUC - same steps | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = by_seed_m1.get(r["seed"])
        da = f"{(r['auc'] - base['auc']) * 1e3:+.2f}e-3" if base else ""
        dl = f"{(r['logloss'] - base['logloss']) * 1e3:+.2f}e-3" if base else ""
        twin = same.get((r["ranks"], r["seed"]))
        ta = f"{twin['auc']:.4f}" if twin else ""
        td = f"{(r['auc'] - twin['auc']) * 1e3:+.2f}e-3" if twin else ""
        lines.append(
            f"| {r['ranks']} | {r['seed']} | {r['samples']:,} | {r['auc']:.4f} | {r['logloss']:.4f} | "
            f"{da} | {dl} | {ta} | {td} | {r['seconds']:.1f} |"
        )
    lines += ["", "| ranks | AUC mean +- sd over seeds | LogLoss mean +- sd |", "|---:|---|---|"]
    worlds = sorted({r["ranks"] for r in results})
    for m in worlds:
        a = [r["auc"] for r in results if r["ranks"] == m]
        ll = [r["logloss"] for r in results if r["ranks"] == m]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(f"| {m} | {np.mean(a):.4f} +- {sd(a):.4f} | {np.mean(ll):.4f} +- {sd(ll):.4f} |")
    m1 = [r["auc"] for r in by_seed_m1.values()]
    seed_sd = statistics.stdev(m1) if len(m1) > 1 else float("nan")
    verdict = []
    for m in worlds[1:]:
        diffs = [r["auc"] - by_seed_m1[r["seed"]]["auc"] for r in results if r["ranks"] == m]
        if len(m1) < 2:  # it printed "nane-3 ... (OUTSIDE 2 sd)"
            verdict.append(
                f"M = {m}: mean AUC difference to M = 1 {np.mean(diffs) * 1e3:+.2f}e-3; one seed, so no "
                "seed standard deviation to judge it against (run two or more seeds)."
            )
            continue
        verdict.append(
            f"M = {m}: mean AUC difference to M = 1 {np.mean(diffs) * 1e3:+.2f}e-3 against a seed "
            f"standard deviation of {seed_sd * 1e3:.2f}e-3 at M = 1 "
            f"({'within' if abs(np.mean(diffs)) <= 2 * seed_sd else 'OUTSIDE'} 2 sd)."
        )
        twins = [
            r["auc"] - same[(m, r["seed"])]["auc"]
            for r in results
            if r["ranks"] == m and (m, r["seed"]) in same
        ]
        if twins:
            verdict.append(
                f"M = {m} against one process fed the same steps: mean AUC difference "
                f"{np.mean(twins) * 1e3:+.2f}e-3, largest {max(twins, key=abs) * 1e3:+.2f}e-3 "
                f"({'within' if abs(np.mean(twins)) <= 2 * seed_sd else 'OUTSIDE'} 2 seed sd)."
            )
    lines += ["", *verdict, "", "Seconds are wall time on this shared machine (M ranks share its cores): "
              "not a scaling figure (bench figure 10 is)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--check-same-steps",
        action="store_true",
        help="also, for each M, one process fed exactly the M ranks' steps in order: it separates what data "
        "parallelism does from what the order of the data does (the twin of M = 1 differs from M = 1 by "
        "a few 1e-4 AUC: its one partition merges the messages otherwise; docs/scale-out-parity.md)",
    )
    args = parser.parse_args()
    results = []
    for seed in [int(x) for x in args.seeds.split(",")]:
        for world in [int(x) for x in args.ranks.split(",")]:
            res = run_once(world, seed, args.rows, args.batch)
            print(json.dumps(res), flush=True)
            results.append(res)
            if world > 1 or args.check_same_steps:
                res = run_once(world, seed, args.rows, args.batch, same_steps=True)
                print(json.dumps(res), flush=True)
                results.append(res)
    command = (f"python -m reloop.bench.ranks_parity --rows {args.rows} --batch {args.batch} "
               f"--seeds {args.seeds} --ranks {args.ranks}"
               + (" --check-same-steps" if args.check_same_steps else ""))  # fmt: skip
    text = report(results, args.rows, args.batch, command)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
