"""``reloop replay``: logged impressions/clicks (or the samples topic) through the engine, isolated state.

From Kafka, between two timestamps or two offset sets (no consumer group: nothing is committed)::

    reloop replay --config run.yaml --kafka 127.0.0.1:9092 --start-time 2026-11-27T10:00:00Z \\
        --end-time 2026-11-27T12:00:00Z --out runs/replay-1

From the samples topic (``stages.samples_topic``: the join already done, the train stage alone; a new
backbone, feature spec or strategy trained from the very samples the live model saw)::

    reloop replay --config run.yaml --kafka 127.0.0.1:9092 --from-samples --out runs/replay-3

From JSONL topic files (``<root>/<topic>/partition-*.jsonl``) or a dataset::

    reloop replay --config run.yaml --jsonl runs/log --out runs/replay-2
    reloop replay --dataset movielens-100k --data ../shared/data/movielens-100k --delay exponential:60000 \\
        --backbone dcn --strategy reloop --alpha 0.5 --out runs/replay-ml

Writes ``OUT/snapshots`` (its own registry), ``OUT/samples/samples/partition-00000.jsonl`` with
``--samples``, and ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
from reloop.engine.appending import replace_whole
from reloop.engine.config_common import folder_arg, int_at_least
from reloop.engine.netaddr import bootstrap_arg
from reloop.engine.replay.options import AUTO, counted_fields, counted_windows, key_value
from reloop.engine.streams import Positions, TopicPartition


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--kafka", metavar="BOOTSTRAP", type=bootstrap_arg, help="replay the config's topics from this broker"
    )
    src.add_argument("--jsonl", type=Path, metavar="ROOT", help="replay JSONL topic files under ROOT")
    src.add_argument(
        "--dataset",
        help="replay a dataset: movielens-100k, frappe, frappe-libfm, criteo, avazu, impression-log "
        "(docs/bring-your-own-log.md)",
    )
    parser.add_argument("--config", type=Path, help="run config (YAML/TOML); required except for --dataset")
    parser.add_argument(
        "--out", type=folder_arg, required=True, help="replay state: snapshots, samples, summary"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/snapshots instead of refusing"
    )
    parser.add_argument("--samples", action="store_true", help="also write the joined samples as JSONL")
    parser.add_argument(
        "--from-samples",
        action="store_true",
        help="with --kafka: replay the samples topic (stages.samples_topic) through the train stage alone",
    )
    kafka = parser.add_argument_group("Kafka range (default: from the beginning to the current end)")
    kafka.add_argument("--start-time", help="ISO-8601 or epoch ms: first record at or after this time")
    kafka.add_argument("--end-time", help="ISO-8601 or epoch ms: stop before the first record at this time")
    kafka.add_argument("--start-offsets", help="topic:partition=offset,... (overrides --start-time)")
    kafka.add_argument("--end-offsets", help="topic:partition=offset,... exclusive (overrides --end-time)")
    parser.add_argument(
        "--timestamps",
        choices=("record", "event"),
        default=None,
        help="merge order: record timestamps (Kafka default) or event time in the payload (files default)",
    )
    ds = parser.add_argument_group("dataset replay")
    ds.add_argument(
        "--data", type=Path, help="the dataset's file (movielens-100k, frappe, frappe-libfm: its folder too)"
    )
    ds.add_argument(
        "--delay",
        default="immediate",
        help="click delay: immediate | fixed:MS | exponential:MEAN_MS | lognormal:MEDIAN_MS[:SIGMA]",
    )
    ds.add_argument("--delay-seed", type=int, default=0)
    ds.add_argument(
        "--dataset-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="passed to the loader, as reloop backtest's: time_column=ts, label_column='rating >= 4', seed=1",
    )
    ds.add_argument("--max-rows", type=int_at_least(0), default=0, help="the first rows only (0: all)")
    # The run's settings for a dataset replay without --config (with one, the config decides: refused).
    # None = not given; DATASET_RUN_DEFAULTS fills in.
    ds.add_argument("--backbone", help="default: dcn")
    ds.add_argument("--strategy", choices=("ce", "kd", "reloop"), help="default: reloop")
    ds.add_argument("--alpha", type=float, help="default: 0.5")
    ds.add_argument("--batch-size", type=int_at_least(1), help="default: 512")
    ds.add_argument("--every-event-ms", type=int, help="snapshot period (event time); default: 7 days")
    ds.add_argument("--buckets", type=int_at_least(2), help="default: 10000")
    ds.add_argument("--window-ms", type=int, help="attribution window of the join; default: 1 hour")
    ds.add_argument(
        "--y-last",
        choices=("snapshot", "logged"),
        help="snapshot (default): the previous snapshot recomputed; logged: the placeholder in the events",
    )
    ds.add_argument(
        "--counters",
        metavar="FIELD,...",
        help="click counters as inputs (model.counters), their values made as a serving arm would have "
        "logged them with each impression; default auto: the dataset's user and item fields, as reloop "
        "backtest's; none: no counters",
    )
    ds.add_argument(
        "--counter-windows",
        metavar="SECONDS,...",
        help="the counters' forgetting time constants; default: 600",
    )


# What a dataset replay without --config runs with, unless its options say otherwise.
DATASET_RUN_DEFAULTS: dict[str, Any] = {
    "backbone": "dcn",
    "strategy": "reloop",
    "alpha": 0.5,
    "batch_size": 512,
    "every_event_ms": 7 * 86_400_000,
    "buckets": 10_000,
    "window_ms": 3_600_000,
    "y_last": "snapshot",
    "counters": AUTO,
    "counter_windows": AUTO,
}
# Options that only a dataset replay reads, with their defaults.
_DATASET_ONLY = {"data": None, "delay": "immediate", "delay_seed": 0, "dataset_option": [], "max_rows": 0}


def parse_time(text: str) -> int:
    """Epoch milliseconds from ``1764237600000`` or an ISO-8601 time (``Z`` or an offset; naive = UTC)."""
    if text.lstrip("-").isdigit():
        return int(text)
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def parse_offsets(text: str) -> Positions:
    """``impressions:0=10,clicks:0=4`` -> positions."""
    out: Positions = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, offset = part.rpartition("=")
        topic, sep2, partition = name.rpartition(":")
        if not sep or not sep2 or not partition.isdigit() or not offset.lstrip("-").isdigit():
            raise ValueError(f"offsets must look like topic:partition=offset, got {part!r}")
        tp = TopicPartition(topic, int(partition))
        if tp in out:  # the last one silently won
            raise ValueError(f"{topic}:{partition} is given twice")
        out[tp] = int(offset)
    return out


def _flag_value(flag: str, text: str | None, parse: Callable[[str], Any]) -> Any:
    """``parse(text)`` (None when not given); a ValueError names the flag (``Invalid isoformat string``
    or ``month must be in 1..12`` alone did not say which option was wrong)."""
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"{flag} {text}: {exc}") from None


def kafka_range_options(args: argparse.Namespace) -> tuple[int | None, int | None, Positions, Positions]:
    """(start time, end time, start offsets, end offsets) as given, checked before any connection."""
    start_ms = _flag_value("--start-time", args.start_time, _parse_time_or_explain)
    end_ms = _flag_value("--end-time", args.end_time, _parse_time_or_explain)
    if start_ms is not None and end_ms is not None and start_ms >= end_ms:
        # The range was empty: exit 0 with an untrained model and a summary of 0 records.
        raise ValueError(f"--start-time {args.start_time} is not before --end-time {args.end_time}")
    start = _flag_value("--start-offsets", args.start_offsets, parse_offsets) or {}
    end = _flag_value("--end-offsets", args.end_offsets, parse_offsets) or {}
    return start_ms, end_ms, start, end


def _parse_time_or_explain(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise ValueError(f"{exc} (expected ISO-8601 such as 2026-11-27T10:00:00Z, or epoch ms)") from None


def kafka_range(
    first: Positions,
    last: Positions,
    start: Positions,
    end: Positions,
    *,
    given_start: Positions,
    given_end: Positions,
) -> tuple[Positions, Positions, list[str]]:
    """(start, end, warnings) of a Kafka replay: ``start``/``end`` (from the times, else the oldest
    stored offsets ``first`` and the log ends ``last``) with the offsets given on top, each checked
    against the partitions. A partition the offsets leave out keeps its time's (or its log's) bound,
    as a JSONL replay's ends where its file does (it was a traceback: "replay end positions
    missing"); an offset of a partition the topics do not have was ignored, or a traceback; an end
    past the log end stalled 30 s and ended in a traceback."""
    _check_given(
        given_start,
        given_end,
        last,
        lambda tp: f"the partition (offsets 0..{last[tp]}, the oldest still stored {first[tp]})",
    )
    start = {**start, **given_start}
    end = {**end, **given_end}
    warnings = []
    for tp in sorted(last):
        if start[tp] > end[tp]:
            raise ValueError(
                f"{tp.topic}:{tp.partition} starts at offset {start[tp]} (--start-offsets/--start-time), "
                f"past its end {end[tp]} (--end-offsets/--end-time)"
            )
        if start[tp] < first[tp] and start[tp] < end[tp]:  # the consumer jumps to the oldest one
            warnings.append(
                f"{tp.topic}:{tp.partition}: offsets {start[tp]}..{min(first[tp], end[tp]) - 1} are no "
                f"longer stored (retention) and are not replayed; the oldest stored is {first[tp]}"
            )
    return start, end, warnings


def jsonl_end_positions(root: Path, topics: list[str]) -> Positions:
    """Complete lines per partition file now: a replay of files stops where they end when it starts."""
    from reloop.connectors.files.jsonl import partition_path

    out: Positions = {}
    for topic in topics:
        p = 0
        while (path := partition_path(root, topic, p)).exists():
            complete = partial = 0
            with path.open("rb") as fh:
                for line in fh:
                    if line.endswith(b"\n"):
                        complete += 1
                    else:
                        partial = len(line)
            out[TopicPartition(topic, p)] = complete
            if partial:  # it was dropped without a word
                print(
                    f"reloop replay: warning: {path}: its last line ({partial} bytes) has no newline and "
                    "is not replayed (a file still being written? end it with a newline to include it)",
                    file=sys.stderr,
                )
            p += 1
        if p == 0:
            raise ValueError(f"JSONL topic {topic!r} does not exist under {root}")
    return out


def _check_given(
    start: Positions, end: Positions, last: Positions, bounds: Callable[[TopicPartition], str]
) -> None:
    """Every offset given (``start``, ``end``) names a partition of the replay and lies within 0..``last``
    of it; the refusal names the flag and says the partition's ``bounds``."""
    for flag, given in (("--start-offsets", start), ("--end-offsets", end)):
        for tp, offset in given.items():
            if tp not in last:
                known = ", ".join(f"{t.topic}:{t.partition}" for t in sorted(last))
                raise ValueError(
                    f"{flag}: {tp.topic}:{tp.partition} is not a partition of this replay ({known})"
                )
            if not 0 <= offset <= last[tp]:
                raise ValueError(f"{flag}: {tp.topic}:{tp.partition}={offset} is outside {bounds(tp)}")


def jsonl_range(args: argparse.Namespace, topics: list[str]) -> tuple[Positions | None, Positions]:
    """(start, end) of a JSONL replay: the offsets given, checked against the files' complete lines;
    a partition the end offsets leave out ends where its file does."""
    files = jsonl_end_positions(args.jsonl, topics)
    start = parse_offsets(args.start_offsets) if args.start_offsets else None
    end = {**files, **(parse_offsets(args.end_offsets) if args.end_offsets else {})}
    _check_given(start or {}, end, files, lambda tp: f"its file (0..{files[tp]} lines)")
    for tp, offset in (start or {}).items():
        if offset > end[tp]:
            raise ValueError(
                f"--start-offsets {tp.topic}:{tp.partition}={offset} is past its end ({end[tp]})"
            )
    return start, end


def _parse_delay(text: str, seed: int):
    from reloop.connectors.files.datasets import make_delay

    kind, _, rest = text.partition(":")
    takes = {"immediate": 0, "fixed": 1, "exponential": 1, "lognormal": 2}
    try:
        parts = [float(x) for x in rest.split(":")] if rest else []
    except ValueError:
        raise ValueError(f"--delay {text}: {rest!r} is not milliseconds") from None
    if not all(math.isfinite(x) and x >= 0 for x in parts):  # nan failed converting it to an int
        raise ValueError(f"--delay {text}: expected finite values >= 0")
    # "fixed" alone was a 0 ms delay, "immediate:5000" immediate: a typo must not change the experiment
    if kind in takes and not (takes[kind] == len(parts) or (kind == "lognormal" and len(parts) == 1)):
        usage = {"immediate": "immediate", "fixed": "fixed:MS", "exponential": "exponential:MEAN_MS"}
        raise ValueError(f"--delay {text}: use {usage.get(kind, 'lognormal:MEDIAN_MS[:SIGMA]')}")
    ms = parts[0] if parts else 0.0
    sigma = parts[1] if len(parts) > 1 else 1.0
    return make_delay(kind, ms=ms, sigma=sigma, seed=seed)  # type: ignore[arg-type]


def dataset_config(
    args: argparse.Namespace,
    fields: tuple,
    declared_counters: Sequence[str] = (),
    dataset: str = "the dataset",
) -> dict[str, Any]:
    """The run config of a dataset replay without --config; ``declared_counters``: the dataset's own
    (``Dataset.counters``), what ``--counters auto`` counts. ValueError: bad counter windows."""
    from reloop.connectors.files.datasets.spec import feature_spec

    given = {k: getattr(args, k) for k in DATASET_RUN_DEFAULTS if getattr(args, k, None) is not None}
    args = argparse.Namespace(**{**vars(args), **DATASET_RUN_DEFAULTS, **given})
    counted = counted_fields(args, declared_counters)
    windows = counted_windows(args, counted, dataset)
    return {
        "model": {
            "backbone": args.backbone,
            "strategy": args.strategy,
            "alpha": args.alpha,
            "spec": feature_spec(fields, buckets=args.buckets).to_dict(),
            **({"counters": {"fields": counted, "windows_s": windows}} if counted else {}),
        },
        # A dataset's logged predictions are placeholders (version 0), so by default y_last is the previous
        # snapshot's prediction, recomputed.
        "train": {"batch_size": args.batch_size, "y_last": args.y_last},
        "period": {"every_event_ms": args.every_event_ms},
        # A click later than the window turns into a correction; keep the window well above the delays.
        "join": {
            "window_ms": args.window_ms,
            "retention_ms": 2 * args.window_ms,
            "ttl_ms": max(6 * 3_600_000, 4 * args.window_ms),
        },
        "consumer": {"group_id": None},
    }


def main(args: argparse.Namespace) -> int:
    from reloop.engine.replay.replay import run_replay
    from reloop.engine.runtime.build import check_model
    from reloop.engine.runtime.config import ConfigError, load_config, load_config_dict
    from tqdm import tqdm

    refused = _options_refused(args)
    if refused:
        print(f"reloop replay: {refused}", file=sys.stderr)
        return 2
    snapshots = args.out / "snapshots"
    started = snapshots.exists() and any(snapshots.iterdir())
    if started and not args.resume:
        print(
            f"reloop replay: {snapshots} already holds snapshots; use --resume or another --out",
            file=sys.stderr,
        )
        return 2
    failures: tuple[type[Exception], ...] = ()
    try:
        if args.dataset:
            source, end, timestamps, cfg = _dataset_source(args, load_config, load_config_dict)
            check_model(cfg)
            start = None
        else:
            if args.config is None:
                print("reloop replay: --config is required with --kafka/--jsonl", file=sys.stderr)
                return 2
            cfg = load_config(args.config)
            check_model(cfg)
        refused = check_replay_options(args, cfg.period.model_dump(), resuming=started)
        if refused:
            print(f"reloop replay: {refused}", file=sys.stderr)
            return 2
        if cfg.period.every_wall_s is not None:
            # 137 s of records gave 1 version at every_wall_s 10, 8 at every_event_ms 10000.
            print(
                f"reloop replay: warning: period.every_wall_s ({cfg.period.every_wall_s:g} s) counts this "
                "replay's own running time, checked between polls, not the records' times: its versions "
                "depend on how fast this machine replays; period.every_event_ms gives periods of the "
                "log's time",
                file=sys.stderr,
            )
        if args.resume and not started:
            print(
                f"reloop replay: --resume: {snapshots} holds no snapshot yet: starting from the beginning",
                file=sys.stderr,
            )
        if not args.dataset:
            topics = [cfg.source.impressions_topic, cfg.source.clicks_topic]
            if args.from_samples:
                if not args.kafka:
                    raise ValueError("--from-samples needs --kafka")
                return _replay_samples(args, cfg, snapshots)
            if args.kafka:
                source, start, end = _kafka_source(args, cfg, topics)
                timestamps = args.timestamps or "record"
                failures = _client_errors()
            else:
                from reloop.connectors.files.jsonl import JsonlSource

                source = JsonlSource(root=args.jsonl, topics=topics)
                start, end = jsonl_range(args, topics)
                timestamps = args.timestamps or "event"
    except (ConfigError, ValueError) as exc:
        print(f"reloop replay: {exc}", file=sys.stderr)
        return 2
    sink = None
    keep_samples = None
    if args.samples:
        from reloop.connectors.files.jsonl import JsonlSink, partition_path

        sink = JsonlSink(root=args.out / "samples", topic="samples")
        samples_file = partition_path(args.out / "samples", "samples", 0)

        def keep_samples(n: int) -> None:
            keep_lines(samples_file, n)

    dead = _dead_letter_sink(args, cfg)
    total = sum(end.values()) - sum((start or {}).values())
    bar = tqdm(total=max(total, 0), desc="replay", unit="rec")

    def progress(n: int) -> None:
        bar.update(n - bar.n)

    result = _summarised(
        args,
        bar,
        dead,
        lambda: run_replay(
            cfg,
            source=source,
            end=end,
            start=start,
            checkpoint_dir=snapshots,
            timestamps=timestamps,
            samples_sink=sink,
            dead_letter_sink=dead,
            on_progress=progress,
            on_restored=keep_samples,
            on_dead_letters_restored=functools.partial(keep_dead_letters, dead),
        ),
        failures,
    )
    if isinstance(result, int):
        return result
    if result.records == 0 and not args.resume:  # exit 0 with an untrained model said nothing
        print("reloop replay: warning: the range holds no records; nothing was trained", file=sys.stderr)
    if result.final_version is None:
        print(
            "reloop replay: warning: no sample was trained, so no model version was published",
            file=sys.stderr,
        )
    span = (result.last_time_ms or 0) - (result.first_time_ms or 0)
    if result.records and span < cfg.join.window_ms:
        # 2,000 Frappe rows span 11 minutes: against a 1-hour window every positive (joined when its click
        # came) was trained before any negative (at the window's close, the replay's end): AUC 0.25.
        print(
            f"reloop replay: warning: the events span {span / 1000:,.0f} s, less than join.window_ms "
            f"({cfg.join.window_ms / 1000:,.0f} s): every negative is joined at the end, after every "
            "positive, so the progressive metrics read low (a shorter window: --window-ms, or more rows)",
            file=sys.stderr,
        )
    imps, clicks, orphans = (
        result.join.get(k, 0) for k in ("too_late_impressions", "too_late_clicks", "orphan_clicks")
    )
    if imps or clicks or orphans:  # lost to the join, counted only in the summary: say it where it is seen
        print(
            f"reloop replay: warning: {imps} impression(s) and {clicks} click(s) came after the watermark "
            f"had passed them (or, clicks, were stamped more than join.click_grace_ms before their "
            f"impression), and {orphans} click(s) found no impression: are the input files (or "
            "partitions) in event-time order, and the event times in milliseconds? "
            "(join.allowed_lateness_ms bounds the disorder taken; a range that starts after some "
            "impressions, or an impression sent to the dead letters, also leaves its clicks without one)",
            file=sys.stderr,
        )
    dupes = result.join.get("duplicate_impressions", 0)
    if dupes:  # a live join drops a redelivered impression by design; in a log it is a row lost
        print(
            f"reloop replay: warning: {dupes} impression(s) repeated an impression_id seen before and were "
            "dropped (the first one was kept)",
            file=sys.stderr,
        )
    return 0


# What a replay is, recorded in OUT at its start: a --resume that says otherwise is refused (a changed
# --start-time was ignored, the positions going on from the snapshot; a --samples given to one run of
# the two left a samples file with part of the samples; another mode named a "newer format").
OPTIONS_FILE = "replay-options.json"


def replay_options(args: argparse.Namespace, period: dict[str, Any]) -> dict[str, Any]:
    modes = (("dataset", args.dataset), ("jsonl", args.jsonl), ("kafka-samples", args.from_samples))
    mode = next((name for name, given in modes if given), "kafka")
    options: dict[str, Any] = {"mode": mode, "--samples": bool(args.samples), "--timestamps": args.timestamps}
    if args.dataset:
        data = None if args.data is None else str(args.data.resolve())
        options |= {"--dataset": args.dataset, "--data": data, "--max-rows": args.max_rows}
        # The clicks' arrival: a resume under another delay model labelled the rest of the stream otherwise.
        options |= {"--delay": args.delay, "--delay-seed": args.delay_seed}
        options |= {"--dataset-option": list(args.dataset_option or [])}
    else:
        options |= {"--start-time": args.start_time, "--start-offsets": args.start_offsets}
    # Where versions are cut: not in the config fingerprint (a live service may change its cadence at a
    # restart), but a resumed replay cut at another one is not the replay it resumes.
    return options | {f"period.{key}": value for key, value in period.items()}


def check_replay_options(args: argparse.Namespace, period: dict[str, Any], *, resuming: bool) -> str | None:
    """Record this replay's options in OUT (a fresh start), or compare them with those recorded (a
    resume): the refusal naming what differs, or None. An OUT from before the record is not checked,
    nor an option the record lacks (written by a reloop that did not record it)."""
    path = args.out / OPTIONS_FILE
    now = replay_options(args, period)
    if not resuming:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(now, option=orjson.OPT_INDENT_2) + b"\n")
        return None
    try:
        recorded = orjson.loads(path.read_bytes())
    except FileNotFoundError:  # an OUT an older reloop wrote: later resumes are checked against this one
        path.write_bytes(orjson.dumps(now, option=orjson.OPT_INDENT_2) + b"\n")
        print(
            f"reloop replay: warning: {args.out} has no record of the options its replay was started with "
            "(a replay by an older reloop): they could not be checked; this resume's are recorded now",
            file=sys.stderr,
        )
        return None
    except (OSError, ValueError):
        return None
    changed = [
        f"{key} {recorded.get(key)!r} -> {value!r}"
        for key, value in now.items()
        if key in recorded and recorded[key] != value
    ]
    if not changed:
        return None
    return (
        f"--resume with other options than the replay in {args.out} was started with ({'; '.join(changed)}): "
        "a resume goes on from its snapshot's positions, in the same mode, writing the same outputs; "
        "give the first run's options and period settings (an end may change: --end-time, "
        "--end-offsets), or another --out"
    )


def _options_refused(args: argparse.Namespace) -> str | None:
    """What is wrong with the options for this source, or None: times apply to Kafka topics only,
    offsets to Kafka and JSONL topics (a file or dataset replay ignored them and replayed everything);
    the dataset options to a dataset only, the run's settings only where no --config decides them."""
    if not args.dataset:
        stray = [_flag(k) for k, default in _DATASET_ONLY.items() if getattr(args, k, default) != default]
        if stray:
            return f"{', '.join(stray)}: for --dataset only (this replay would ignore them)"
    if args.dataset is None or args.config is not None:
        stray = [_flag(k) for k in DATASET_RUN_DEFAULTS if getattr(args, k, None) is not None]
        if stray:
            return (
                f"{', '.join(stray)}: with --config the config decides them (set them there, or in "
                "RELOOP__* variables); they are for a --dataset replay without --config"
            )
    if args.from_samples:
        # --dataset/--jsonl replayed the raw events as if it was not given; the others were ignored.
        if not args.kafka:
            return "--from-samples: with --kafka only (it reads the samples topic)"
        stray = [flag for flag, v in (("--samples", args.samples), ("--timestamps", args.timestamps)) if v]
        if stray:
            return f"{', '.join(stray)}: not with --from-samples (its samples are joined already, in order)"
    if args.jsonl is not None and args.timestamps == "record":
        return "--timestamps record: JSONL files keep no record timestamps; they replay by event time"
    if args.kafka:
        return None
    options = {"--start-time": args.start_time, "--end-time": args.end_time}
    if args.dataset:
        options |= {"--start-offsets": args.start_offsets, "--end-offsets": args.end_offsets}
    given = [flag for flag, value in options.items() if value]
    if not given:
        return None
    if args.dataset:
        return f"{' and '.join(given)}: not for --dataset (--max-rows takes its first rows)"
    return f"{' and '.join(given)}: --kafka only (with --jsonl, give --start-offsets/--end-offsets)"


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _replay_samples(args: argparse.Namespace, cfg: Any, snapshots: Path) -> int:
    from reloop.engine.replay.replay import run_samples_replay
    from tqdm import tqdm

    source, start, end = _kafka_source(args, cfg, [cfg.stages.samples_topic])
    total = sum(end.values()) - sum((start or {}).values())
    bar = tqdm(total=max(total, 0), desc="replay", unit="batch")
    dead = _dead_letter_sink(args, cfg)
    result = _summarised(
        args,
        bar,
        dead,
        lambda: run_samples_replay(
            cfg,
            source=source,
            end=end,
            start=start,
            checkpoint_dir=snapshots,
            dead_letter_sink=dead,
            on_progress=lambda n: bar.update(n - bar.n),
            on_dead_letters_restored=functools.partial(keep_dead_letters, dead),
            starts_mid_topic=args.start_time is not None or args.start_offsets is not None,
        ),
        _client_errors(),
    )
    return result if isinstance(result, int) else 0


def _summarised(
    args: argparse.Namespace,
    bar: Any,
    dead: Any,
    replay: Callable[[], Any],
    failures: tuple[type[Exception], ...] = (),
) -> Any:
    """``replay()``'s result, also written to OUT/summary.json and printed; else the exit code (and why,
    on stderr): 2 when ``--resume`` found snapshots it cannot use or training diverged (``TrainingDiverged``:
    resumed under the same settings, it would diverge again), 1 when the source stopped delivering
    or failed (``failures``: the Kafka client's errors) or the final snapshot was not written, 130 on
    Ctrl-C (OUT/summary.json then says the replay was interrupted; a summary left by an earlier run would
    read as this one's result)."""
    from reloop.engine.models.finite import TrainingDiverged
    from reloop.engine.replay.replay import ReplaySaveFailed
    from reloop.engine.replay.sources import ReplayStalled
    from reloop.engine.runtime.restore import NoUsableSnapshot, SnapshotMismatch

    summary = args.out / "summary.json"
    # SIGTERM as Ctrl-C: the snapshot write in flight finished, the summary marked interrupted (it died
    # at once, leaving a serving bundle without its snapshot and no summary).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        result = replay()
    except (SnapshotMismatch, NoUsableSnapshot) as exc:
        print(f"reloop replay: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:  # was a traceback
        print(
            f"reloop replay: {exc}. OUT/snapshots keeps the last snapshot from before the divergence, but "
            "--resume under the same settings would diverge again: change them first (and replay from "
            "scratch, or --resume with checkpoint.allow_fingerprint_change)",
            file=sys.stderr,
        )
        summary.unlink(missing_ok=True)
        return 2
    except (ReplayStalled, ReplaySaveFailed, *failures) as exc:  # was a traceback (or exit 0: a failed save)
        print(
            f"reloop replay: {exc}{_broker_note(args, exc)}; OUT/snapshots keeps the last snapshot: --resume "
            "goes on",
            file=sys.stderr,
        )
        summary.unlink(missing_ok=True)
        return 1
    except KeyboardInterrupt as exc:
        bar.close()  # its line ended first: the message was written after the bar's, on the same line
        args.out.mkdir(parents=True, exist_ok=True)
        partial = {"interrupted": True, "records_read": bar.n, "snapshots": str(args.out / "snapshots")}
        summary.write_bytes(orjson.dumps(partial, option=orjson.OPT_INDENT_2))
        how = " (SIGTERM)" if isinstance(exc, Terminated) else ""
        print(
            f"reloop replay: interrupted{how} after {bar.n} records; {args.out / 'snapshots'} keeps the last "
            "snapshot: --resume goes on from it",
            file=sys.stderr,
        )
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        dead.close()
        bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    text = orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2)
    summary.write_bytes(text)
    print(text.decode())
    return result


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as Ctrl-C is (exit 143)."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def _broker_note(args: argparse.Namespace, exc: BaseException) -> str:
    """For a replay from Kafka that stopped receiving: whether the broker answers at all (a stall
    blamed retention while the broker was down)."""
    from reloop.engine.replay.sources import ReplayStalled

    if not isinstance(exc, ReplayStalled) or not getattr(args, "kafka", None):
        return ""
    from reloop.connectors.kafka.client_start import unreachable

    down = unreachable(args.kafka)
    return f" (no Kafka broker answers at {args.kafka} now: {down})" if down else ""


def _client_errors() -> tuple[type[Exception], ...]:
    from reloop.connectors.kafka.source import CLIENT_ERRORS

    return CLIENT_ERRORS


def keep_lines(path: Path, n: int) -> None:
    """Cut ``path`` after its first ``n`` lines (a partial last line too): what a resumed replay's
    restore point had sent; it sends the rest again."""
    if not path.exists():
        return
    size = 0
    with path.open("rb") as fh:
        for line in islice(fh, n):
            if not line.endswith(b"\n"):
                break
            size += len(line)
    if size < path.stat().st_size:
        with path.open("r+b") as fh:
            fh.truncate(size)


def keep_dead_letters(sink: Any, lines: int | None, positions: Positions) -> dict[str, int]:
    """Cut the dead-letter file of ``sink`` (a JsonlSink, nothing sent yet) to what a resumed replay's
    restore point had sent: its first ``lines`` (all: None), less those of records at or past
    ``positions``, which the resumed replay refuses again. Returns the kept letters' counts by reason."""
    from reloop.connectors.files.jsonl import partition_path

    path = partition_path(sink.root, sink.topic, 0)
    counts: dict[str, int] = {}
    if not path.exists():
        return counts
    kept: list[bytes] = []
    with path.open("rb") as fh:
        for line in fh if lines is None else islice(fh, lines):
            if not line.endswith(b"\n"):
                break  # torn by a kill: the replay sends it again
            try:
                letter = orjson.loads(line)
                topic, partition, offset = letter["topic"], letter["partition"], letter["offset"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
            if isinstance(partition, int) and isinstance(offset, int):
                at = positions.get(TopicPartition(topic, partition))
                if at is not None and offset >= at:
                    continue
            kept.append(line)
            reason = str(letter.get("reason"))
            counts[reason] = counts.get(reason, 0) + 1
    replace_whole(path, b"".join(kept))
    return counts


def _dead_letter_sink(args: argparse.Namespace, cfg: Any) -> Any:
    """The refused records, with their reasons, as JSONL under ``OUT/dead-letters`` (never the live
    dead-letter topic: a replay writes only under OUT). A resumed replay keeps those its restore point
    had written and writes the rest (keep_dead_letters): each refused record once."""
    from reloop.connectors.files.jsonl import JsonlSink

    return JsonlSink(root=args.out / "dead-letters", topic=cfg.sink.dead_letter_topic or "deadletter")


# The dataset flags that set a run-config key, and that key's variable.
_FLAG_VARIABLES = {
    "backbone": "RELOOP__MODEL__BACKBONE",
    "strategy": "RELOOP__MODEL__STRATEGY",
    "alpha": "RELOOP__MODEL__ALPHA",
    "batch_size": "RELOOP__TRAIN__BATCH_SIZE",
    "every_event_ms": "RELOOP__PERIOD__EVERY_EVENT_MS",
    "window_ms": "RELOOP__JOIN__WINDOW_MS",
}


def _check_spec_reads_dataset(config: Any, cfg: Any, ds: Any) -> None:
    """A ``--config`` whose model reads none of ``--dataset``'s fields is refused, one that misses some is
    warned about: the example config's Criteo spec on MovieLens trained a bias alone (AUC 0.48), exit 0."""
    from reloop.engine.runtime.config import load_feature_spec

    spec = load_feature_spec(cfg.model.model_copy(update={"counters": None}))
    reads = [f.name for f in spec.fields]
    has = {f.name for f in ds.fields}
    missing = [name for name in reads if name not in has]
    if len(missing) == len(reads):
        raise ValueError(
            f"--config {config}: its model reads none of {ds.name}'s fields ({', '.join(sorted(has))}); it "
            f"reads {', '.join(reads[:6])}{' ...' if len(reads) > 6 else ''} (leave --config out: the "
            "replay then builds its config from the dataset's fields)"
        )
    if missing:
        print(
            f"reloop replay: warning: {len(missing)} of the model's {len(reads)} fields are not in {ds.name} "
            f"and read as missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}",
            file=sys.stderr,
        )


def _kafka_source(args: argparse.Namespace, cfg: Any, topics: list[str]):
    # Kafka is imported only by this entry point, never by the engine.
    from reloop.connectors.kafka.admin import offsets_for_times
    from reloop.connectors.kafka.source import CLIENT_ERRORS, KafkaSource

    start_ms, end_ms, given_start, given_end = kafka_range_options(args)  # before any connection
    # kafka-python here whatever kafka.client says: the connection in its names.
    consumer = cfg.consumer.client_config if cfg.kafka.client == "kafka-python" else {}
    client = {**cfg.kafka.connection("kafka-python"), **consumer}
    source = KafkaSource(bootstrap=args.kafka, topics=topics, group_id=None, client_config=client)
    try:
        source.open()  # assigned at the oldest stored offsets; ReplaySource opens it again at the start
        first = source.position()
        last = source.end_positions(timeout_s=30.0)
        start = (
            first
            if start_ms is None
            else offsets_for_times(args.kafka, topics, start_ms, client_config=client)
        )
        # No record at or after the end time: offsets_for_times answers with the end offsets.
        end = last if end_ms is None else offsets_for_times(args.kafka, topics, end_ms, client_config=client)
        clicks = cfg.source.clicks_topic
        if end_ms is not None and clicks in topics:
            # An impression shortly before the end keeps the click that came after it: clicks are read
            # one attribution window further (it was labelled 0, 17 of 1,150 in a 10-s range).
            late = offsets_for_times(args.kafka, [clicks], end_ms + cfg.join.window_ms, client_config=client)
            end = {**end, **late}
            print(
                "reloop replay: clicks are read up to --end-time + join.window_ms "
                f"({cfg.join.window_ms} ms), so that the range's last impressions keep the clicks that came "
                "after it",
                file=sys.stderr,
            )
        start, end, warnings = kafka_range(
            first, last, start, end, given_start=given_start, given_end=given_end
        )
    except CLIENT_ERRORS as exc:  # an unreachable broker, refused credentials: was a traceback
        source.close()
        raise ValueError(f"--kafka {args.kafka}: {exc}") from None
    except ValueError:  # refused (offsets outside the partitions too): the client not left running
        source.close()
        raise
    for line in warnings:
        print(f"reloop replay: warning: {line}", file=sys.stderr)
    return source, start, end


def _dataset_source(args: argparse.Namespace, load_config, load_config_dict):
    import itertools

    from reloop.connectors.files.datasets import (
        DatasetError,
        UnknownOption,
        UnloggedPredictions,
        open_dataset,
        to_events,
    )
    from reloop.connectors.files.datasets.served_counters import with_served_counters
    from reloop.engine.replay.sources import EventListSource
    from reloop.engine.runtime.config import load_feature_spec

    if args.data is None:
        raise ValueError("--dataset needs --data")
    try:
        ds = open_dataset(args.dataset, args.data, **dict(args.dataset_option))
    except (UnknownOption, TypeError) as exc:  # a keyword the loader does not take
        raise ValueError(f"--dataset-option: {exc}") from None
    # RELOOP__* variables apply as to any run config (RELOOP__MODEL__BACKBONE=fm: they were ignored), but
    # under the flags given (--backbone fm wins over RELOOP__MODEL__BACKBONE=dcn).
    given = {var for flag, var in _FLAG_VARIABLES.items() if getattr(args, flag, None) is not None}
    env = {k: v for k, v in os.environ.items() if k.upper() not in given}
    cfg = (
        load_config(args.config)
        if args.config
        else load_config_dict(dataset_config(args, ds.fields, ds.counters, ds.name), env=env)
    )
    if args.config:
        _check_spec_reads_dataset(args.config, cfg, ds)
    rows = ds.rows() if args.max_rows <= 0 else itertools.islice(ds.rows(), args.max_rows)
    unlogged = UnloggedPredictions()
    rows = unlogged.counted(rows)
    delay = _parse_delay(args.delay, args.delay_seed)
    try:
        if cfg.model.counters is not None:  # the inputs an arm serving with them would have logged
            rows = with_served_counters(rows, load_feature_spec(cfg.model), cfg.model.counters, delay)
        source = EventListSource(  # encodes the events as it reads them: the rows are read here
            to_events(rows, delay), cfg.source.impressions_topic, cfg.source.clicks_topic
        )
    except DatasetError:
        raise
    except (ValueError, TypeError) as exc:  # bytes that are not UTF-8, a --dataset-option value it cannot use
        raise ValueError(f"{args.data}: {exc}") from None
    warning = unlogged.warning("replay", "--y-last snapshot") if cfg.train.y_last == "logged" else None
    if warning is not None:
        print(warning, file=sys.stderr)
    return source, source.end_positions(), args.timestamps or "record", cfg
