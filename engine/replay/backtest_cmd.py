"""``reloop backtest``: strategies x backbones x seeds over periods of a dataset -> CSV, markdown, plots.

    reloop backtest --dataset movielens-100k --data ../shared/data/movielens-100k --period week \\
        --backbones deepfm,dcn --alphas 0.2,0.5 --seeds 5 --out docs/backtest/movielens

``--strategies ce,kd@0.5,reloop`` gives a strategy its own alphas (KD at 0.5 only, ReLoop at each of
``--alphas``).

Results are appended to ``OUT/results.csv`` run by run, so an interrupted backtest resumes with
``--resume`` (finished runs are skipped) and the report can be rebuilt from the CSV alone.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

from reloop.engine.config_common import folder_arg, int_at_least
from reloop.engine.replay.backtest import (
    BATCH_BY,
    PERIODIC_LR,
    PROTOCOLS,
    RIVER_LR,
    BacktestData,
    RunSpec,
    Strategy,
    check_learner_options,
    period_bounds_by_count,
    period_bounds_by_time,
    prepare,
    run_one,
    run_river_baseline,
    strategy_grid,
    with_click_counters,
    with_label_noise,
)
from reloop.engine.replay.options import (
    AUTO,
    COUNTER_WINDOWS_S,
    counted_fields,
    counted_windows,
    key_value,
)
from reloop.engine.replay.report import (
    MIN_SEEDS,
    RIVER,
    columns_problem,
    cut_torn_run,
    markdown_tables,
    plot,
    read_csv,
    write_csv,
)
from reloop.engine.replay.resume_settings import check_or_record, run_settings

DAY_MS = 86_400_000


class Refused(ValueError):
    """A bad input: ``main`` prints ``reloop backtest: MESSAGE`` and exits 2, before any run where it can."""


def _machine() -> str:
    """What the report's wall time was measured on: the cores this process could use and the load at
    the end (it said "a shared 2-core machine" wherever it ran)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores, load {os.getloadavg()[0]:.1f} when the report was written"


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def memory_spec(text: str) -> Any:
    """``--memory`` as an engine/memory/stream_eval.MemorySpec: comma-separated KEY=VALUE, the weights as
    ``lams=0.1/0.3``; an unknown key or a bad value fails naming it."""
    import typing

    from reloop.engine.memory.stream_eval import MemorySpec

    fields = typing.get_type_hints(MemorySpec)
    values: dict[str, Any] = {}
    for item in (part for part in text.split(",") if part):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise argparse.ArgumentTypeError(
                f"--memory: {item!r} is not KEY=VALUE with KEY one of {sorted(fields)}"
            )
        try:
            if key == "lams":
                values[key] = tuple(float(v) for v in value.split("/"))
            elif key in ("n_tables", "n_bits", "seed"):
                values[key] = int(value)
            elif key == "prior_count":
                values[key] = float(value)
            elif value in typing.get_args(fields[key]):
                values[key] = value
            else:
                raise ValueError
        except ValueError:
            choices = typing.get_args(fields[key])
            hint = f" (one of {', '.join(choices)})" if choices else ""
            raise argparse.ArgumentTypeError(f"--memory: bad value for {key}: {value!r}{hint}") from None
    try:
        return MemorySpec(**values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--memory: {exc}") from None


def configure(parser: argparse.ArgumentParser) -> None:
    # Both needed for runs, neither by --report-only (it rebuilds from OUT/results.csv): checked in _check.
    parser.add_argument(
        "--dataset",
        help="movielens-100k, frappe, frappe-libfm, criteo, avazu, impression-log (not with --report-only)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="the dataset's file (MovieLens, Frappe: its folder too); not with --report-only",
    )
    parser.add_argument(
        "--dataset-option",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="passed to the loader, e.g. seed=1 (Frappe negatives)",
    )
    parser.add_argument(
        "--period",
        default="week",
        help="week (default) | day | hours:N | chunks:N: N equal parts of the rows (for the datasets "
        "without event time: frappe, frappe-libfm, criteo)",
    )
    parser.add_argument(
        "--min-period-size",
        type=int_at_least(1),
        default=500,
        help="a smaller period is merged into the one before",
    )
    parser.add_argument(
        "--max-rows", type=int_at_least(0), default=0, help="use only the first N rows (0 = all)"
    )
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="RATE",
        help="flip this fraction of the TRAINING labels (the same flips for every run); every score is "
        "still judged against the true labels",
    )
    parser.add_argument("--backbones", default="deepfm,dcn", help="comma-separated (default: %(default)s)")
    parser.add_argument(
        "--strategies",
        default="ce,kd,reloop",
        help="ce, kd, reloop: a bare name runs at each of --alphas, NAME@ALPHA at that alpha only "
        "(e.g. ce,kd@0.5,reloop@0.2,reloop@0.5: KD at 0.5 alone, ReLoop at 0.2 and 0.5; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--alphas", default="0.2,0.5", help="the alpha grid of every strategy named without @ALPHA"
    )
    parser.add_argument(
        "--seeds", type=int_at_least(1), default=5, help="seeds 0..N-1 (default: %(default)s)"
    )
    parser.add_argument(
        "--protocols", default=",".join(PROTOCOLS), help="comma-separated (default: %(default)s)"
    )
    parser.add_argument(
        "--y-last",
        type=lambda v: "recomputed" if v == "snapshot" else v,  # the name train.y_last and replay use
        choices=("recomputed", "logged"),
        default="recomputed",
        help="recomputed (default; also `snapshot`, as train.y_last and `reloop replay` name it): y_last is "
        "the previous period's model's prediction; logged: the prediction the data logged",
    )
    # The learner defaults below are the settings the reports in docs/backtest/ used (their "y_last: ..."
    # line; tests/unit/replay/test_backtest_cmd.py holds the two together).
    parser.add_argument(
        "--epochs", type=int_at_least(1), default=3, help="epochs per period (periodic protocol)"
    )
    parser.add_argument(
        "--periodic-lr",
        type=float,
        default=PERIODIC_LR,
        help="Adam's dense rate in the periodic protocol unless --lr is given (default 1e-3: chosen for it "
        "with its 3 epochs on the selection periods; the learner's own defaults were chosen for streaming)",
    )
    parser.add_argument("--batch-size", type=int_at_least(1), default=512, help="(default: %(default)s)")
    parser.add_argument(
        "--batch-by",
        choices=BATCH_BY,
        default="count",
        help="streaming: count = batches of --batch-size; time = one batch per event time (at most "
        "--batch-size), so events that share a timestamp are scored before any is learned; the river peer "
        "follows the same rule",
    )
    parser.add_argument(
        "--publish-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="streaming: score each sample with the model as it was at the last multiple of SECONDS of event "
        "time, as `reloop serve` serves a snapshot published that often (the river peer too); 0 (default) "
        "scores with the live learner (progressive validation). Not for pseudo-time datasets",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate of the dense parameters while steps average 256 samples or more (default "
        "the backbone's: 1e-3, DCN 2e-3, DeepFM 4e-3 ...; the periodic protocol: --periodic-lr); smaller "
        "ones use --optimizer small_step_lr= (3e-4), small_step_embedding_lr= (Adagrad 0.1)",
    )
    parser.add_argument(
        "--optimizer",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="any other learner optimizer setting (engine/models/config.py OptimizerConfig), e.g. "
        "wide=off, embedding_optimizer=adam, embedding_lr=0.01, wide_prior_variance=0.5",
    )
    parser.add_argument(
        "--replay-size",
        type=int_at_least(0),
        default=0,
        help="streaming: replay buffer of the latest N samples (0 = off)",
    )
    parser.add_argument(
        "--replay-ratio", type=_non_negative, default=1.0, help="streaming: replayed samples per new one"
    )
    parser.add_argument(
        "--memory",
        action="append",
        type=memory_spec,
        default=[],
        metavar="KEY=VALUE,...",
        help="streaming: also score each batch with ReLoop2's error memory (predict with it, then write the "
        "batch's labels), one row per weight named STRATEGY+mem...; keys of MemorySpec "
        "(engine/memory/stream_eval.py), e.g. n_tables=16,n_bits=12,lams=0.1/0.3,key=snapshot; repeatable",
    )
    parser.add_argument(
        "--embedding-dim",
        type=int,
        default=10,
        help="embedding width of every backbone that has one (LR and FTRL keep their one-column table)",
    )
    parser.add_argument(
        "--hidden-units", default="64,64", help="MLP widths (the registry's BARS size is 400,400,400)"
    )
    parser.add_argument(
        "--buckets", type=int_at_least(2), default=10_000, help="hash buckets per field (row 0: missing)"
    )
    parser.add_argument(
        "--counters",
        default=AUTO,
        metavar="FIELD,...",
        help="click counters of these categorical fields as dense inputs (engine/features/counters.py): "
        "each value's smoothed click rate and how often it was shown, counted live, every label known once "
        "its event time has passed; A*B counts pairs (user_id*genres: a user's rate on each genre of the "
        "item); the river peer does not get them. Default auto: the dataset's user and item fields "
        "(movielens-100k: user_id,item_id,user_id*genres; frappe: user,item; impression-log: "
        "user_id,item_id; criteo and avazu: none); none: no counters",
    )
    parser.add_argument(
        "--counter-prior",
        type=float,
        default=5.0,
        metavar="M",
        help="the counters' prior strength: a value shown M times weighs as much as the overall click rate",
    )
    parser.add_argument(
        "--counter-windows",
        default=AUTO,
        metavar="SECONDS,...",
        help="with counters: also counts that forget, one pair per time constant (a count SECONDS old weighs "
        f"1/e); default auto: {', '.join(f'{w:g}' for w in COUNTER_WINDOWS_S)} s; none: lifetime counts only",
    )
    parser.add_argument(
        "--river",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the per-event river LogisticRegression peer baseline",
    )
    parser.add_argument("--river-lr", type=float, default=RIVER_LR, help="the river peer's SGD step")
    parser.add_argument(
        "--workers", type=int_at_least(1), default=1, help="processes (each uses one torch thread)"
    )
    parser.add_argument(
        "--out", type=folder_arg, required=True, help="folder for results.csv, report.md, PNGs"
    )
    parser.add_argument("--resume", action="store_true", help="skip runs already in OUT/results.csv")
    parser.add_argument(
        "--report-from",
        type=int,
        default=None,
        metavar="PERIOD",
        help="tables and verdicts use periods >= PERIOD (settings chosen on the earlier ones); "
        "the CSV and the plots keep every period. Periods count those with rows: a week without any "
        "makes no period, so with gaps period t is not the t-th calendar week (default 1; with "
        "--report-only, the report's own)",
    )
    parser.add_argument("--title", default="")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild report.md and PNGs from results.csv"
    )


def _optimizer_options(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """``--optimizer`` values typed for OptimizerConfig: true/false become booleans."""
    out = []
    for key, value in items:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        out.append((key, value))
    return out


def optimizer_items(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    """A run's optimizer settings: the learner's defaults, where ``--lr`` and ``--optimizer`` say
    otherwise."""
    items: dict[str, Any] = {} if args.lr is None else {"lr": args.lr}
    items.update(_optimizer_options(getattr(args, "optimizer", [])))
    return tuple(items.items())


def protocol_optimizer_items(args: argparse.Namespace, protocol: str) -> tuple[tuple[str, Any], ...]:
    """``optimizer_items`` for one protocol: the periodic protocol's dense rate is ``--periodic-lr`` unless
    a rate is given (its own choice on the selection periods: the learner's default rates per backbone
    were chosen for streaming, and cost periodic retraining 2.3-2.8e-3 AUC there, ablation.md)."""
    items = dict(optimizer_items(args))
    if protocol == "periodic" and "lr" not in items:
        items["lr"] = getattr(args, "periodic_lr", PERIODIC_LR)
    return tuple(items.items())


def _period(spec: str, min_size: int) -> Callable[[Any], tuple[int, ...]]:
    """``--period`` as a cut of event times into periods; a malformed one (``week:2``, ``chunks:0``) is
    refused here, before the data is read."""
    kind, sep, arg = spec.partition(":")
    count = int(arg) if arg.isascii() and arg.isdigit() else 0
    if kind == "week" and not sep:
        return lambda t: period_bounds_by_time(t, 7 * DAY_MS, min_size)
    if kind == "day" and not sep:
        return lambda t: period_bounds_by_time(t, DAY_MS, min_size)
    if kind == "hours" and count >= 1:
        return lambda t: period_bounds_by_time(t, count * 3_600_000, min_size)
    if kind == "chunks" and count >= 1:
        return lambda t: period_bounds_by_count(len(t), count)
    raise Refused(f"--period: expected week, day, hours:N or chunks:N with N >= 1, got {spec!r}")


def _publish_every_ms(args: argparse.Namespace) -> int:
    seconds = getattr(args, "publish_every", 0.0)
    if seconds < 0 or (seconds and round(seconds * 1000) < 1):
        raise Refused(f"--publish-every: expected 0 or at least 0.001 seconds, got {seconds:g}")
    if seconds and args.memory:
        raise Refused("--publish-every: --memory scores with the live learner; use one or the other")
    return round(seconds * 1000)


def _check_publishing(data: BacktestData, every_ms: int, report_from: int) -> None:
    """Rows of the reported periods that fall in the data's first publishing interval are scored by the
    untrained model (nothing was published before them). All of them: refused, the report would measure
    nothing; some: a warning with the count (an interval longer than the warm-up, or coarse timestamps:
    the Avazu sample has one timestamp for every row)."""
    if not every_ms:
        return
    import numpy as np

    reported = slice(data.bounds[report_from], data.bounds[-1])
    first = data.times_ms[0] // every_ms
    blind = int(np.count_nonzero(data.times_ms[reported] // every_ms == first))
    total = reported.stop - reported.start
    span_s = (data.times_ms[-1] - data.times_ms[0]) / 1000
    where = (
        f"--publish-every {every_ms / 1000:g}: {blind:,} of the {total:,} rows of the reported periods "
        f"fall in the data's first publishing interval (its times span {span_s:g} s)"
    )
    if blind == total:
        raise Refused(f"{where}: every score would come from the untrained model; publish more often")
    if blind:
        print(f"warning: {where} and are scored by the untrained model", file=sys.stderr)


def open_data(args: argparse.Namespace) -> tuple[Any, Any]:
    """The dataset's loader and feature spec, before a row is read: an unknown dataset, a loader option
    it does not take or a bad bucket count fails here (Refused)."""
    from reloop.connectors.files.datasets import UnknownOption, open_dataset
    from reloop.connectors.files.datasets.spec import feature_spec

    try:
        ds = open_dataset(args.dataset, args.data, **dict(args.dataset_option))
        return ds, feature_spec(ds.fields, buckets=args.buckets)
    except (UnknownOption, TypeError) as e:  # a keyword the loader does not take, or of the wrong type
        if not args.dataset_option:
            raise
        raise Refused(f"--dataset-option: {e}") from None
    except ValueError as e:  # DatasetError among them
        raise Refused(str(e)) from None


def load_data(args: argparse.Namespace) -> tuple[BacktestData, str]:
    import itertools

    from reloop.connectors.files.datasets import DatasetError, UnloggedPredictions, to_samples

    period = _period(args.period, args.min_period_size)
    ds, spec = open_data(args)
    rows = ds.rows() if args.max_rows <= 0 else itertools.islice(ds.rows(), args.max_rows)
    args.dataset_name = getattr(ds, "name", None) or args.dataset
    args.dataset_counters = tuple(ds.counters)
    unlogged = UnloggedPredictions()
    try:
        samples = list(to_samples(unlogged.counted(rows)))
    except DatasetError as e:  # a missing or malformed file
        raise Refused(str(e)) from None
    except (ValueError, TypeError) as e:  # bytes that are not UTF-8, a --dataset-option value it cannot use
        raise Refused(f"{args.data}: {e}") from None
    warning = unlogged.warning("backtest", "--y-last recomputed") if args.y_last == "logged" else None
    if warning is not None:
        print(warning, file=sys.stderr)

    def cut(times: Any) -> tuple[int, ...]:  # an int64 array of event times
        try:
            return period(times)
        except ValueError as e:  # periods the rows cannot fill (chunks:N beyond the rows)
            raise Refused(f"--period {args.period}: {e}") from None

    try:
        data = prepare(samples, spec, cut)
    except Refused:
        raise
    except ValueError as e:  # a value the feature spec cannot read
        raise Refused(f"{args.data}: {e}") from None
    if getattr(args, "label_noise", 0.0):
        try:
            data = with_label_noise(data, args.label_noise)
        except ValueError as e:
            raise Refused(f"--label-noise: {e}") from None
    return data, ds.time_kind


_DATA: BacktestData | None = None


def _init_worker(data: BacktestData) -> None:
    import torch

    global _DATA
    _DATA = data
    torch.set_num_threads(1)


def _work(run: RunSpec) -> list[dict[str, Any]]:
    assert _DATA is not None
    return run_one(_DATA, run)


def _check(args: argparse.Namespace) -> tuple[tuple[Strategy, ...], tuple[tuple[str, Any], ...], int]:
    """Every input that can be checked before the data is read (Refused): the strategies, the run's
    learner configs, the protocols, the period, the memory, the river peer. Returns the strategies, the
    model options and the publishing interval (ms)."""
    from reloop.engine.models.registry import UnknownBackbone, backbone_entry

    missing = [f"--{name}" for name in ("dataset", "data") if getattr(args, name, None) is None]
    if missing:  # (argparse's "required" would ask --report-only for them too)
        raise Refused(f"the following arguments are required: {', '.join(missing)} (not with --report-only)")
    for option in ("strategies", "alphas", "backbones", "protocols"):
        if not _csv_list(getattr(args, option)):  # a grid without a value made no run of its kind
            raise Refused(f"--{option}: expected comma-separated values, got {getattr(args, option)!r}")
    try:
        strategies = strategy_grid(_csv_list(args.strategies), [float(a) for a in _csv_list(args.alphas)])
    except ValueError as e:
        raise Refused(f"--strategies / --alphas: {e}") from None
    protocols = _csv_list(args.protocols)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise Refused(f"--protocols: expected some of {', '.join(PROTOCOLS)}, got {args.protocols!r}")
    _period(args.period, args.min_period_size)
    publish_every_ms = _publish_every_ms(args)
    if "streaming" not in protocols:  # they would steer nothing but the river peer, without a word
        streaming_only = {
            "--batch-by": args.batch_by != "count",
            "--publish-every": bool(publish_every_ms),
            "--replay-size": bool(args.replay_size),
            "--memory": bool(args.memory),
        }
        given = [name for name, on in streaming_only.items() if on]
        if given:
            raise Refused(
                f"{', '.join(given)}: streaming options; --protocols {args.protocols} runs no streaming"
            )
    if not args.river_lr > 0:
        raise Refused(f"--river-lr: expected a step > 0, got {args.river_lr:g}")
    try:  # bad counters or windows fail before the data is read
        asked = counted_fields(args, ["?"])  # ("?": whatever the dataset names, unknown yet)
        counted_windows(args, asked)
    except ValueError as e:
        raise Refused(str(e)) from None
    if asked and not args.counter_prior > 0:
        raise Refused(f"--counter-prior: expected a strength > 0, got {args.counter_prior:g}")
    try:
        hidden = tuple(int(x) for x in _csv_list(args.hidden_units))
    except ValueError:
        raise Refused(
            f"--hidden-units: expected comma-separated integers, got {args.hidden_units!r}"
        ) from None
    model_options = (("embedding_dim", args.embedding_dim), ("hidden_units", hidden))
    backbones = _csv_list(args.backbones)
    optimizers = [protocol_optimizer_items(args, p) for p in protocols]
    try:  # before the data is read and the first run: not after the runs before a bad one
        check_learner_options(backbones, model_options, strategies, optimizers)
    except UnknownBackbone as e:
        raise Refused(f"--backbones: {e}") from None
    except ValueError as e:
        raise Refused(f"--backbones / --strategies / --alphas / --optimizer / --embedding-dim: {e}") from None
    # The error memory is keyed by a hidden layer, which only the torch backbones have.
    no_hidden = [b for b in backbones if backbone_entry(b).kind != "torch"]
    if args.memory and "streaming" in protocols and no_hidden:
        raise Refused(f"--memory: backbone {no_hidden[0]!r} has no hidden layer to key an error memory by")
    # The peer writes its rows as backbone river_lr, as the learner would (the reports and
    # bench/learner_targets.py read river_lr rows as the peer's): one or the other.
    if args.river and RIVER in backbones:
        raise Refused(f"--backbones {RIVER}: the river peer writes its rows under that name; pass --no-river")
    return strategies, model_options, publish_every_ms


def _with_counters(args: argparse.Namespace, data: BacktestData) -> BacktestData:
    """``data`` with the inputs of the counters ``args`` asks for, resolved against the dataset's own
    (``args.dataset_counters``) and kept as ``args.counted`` for the report's settings line."""
    from reloop.engine.features.counters import CounterError

    fields = counted_fields(args, args.dataset_counters)
    try:
        windows = counted_windows(args, fields, args.dataset_name)
    except ValueError as e:
        raise Refused(str(e)) from None
    args.counted = (fields, windows)
    if not fields:
        return data
    try:
        return with_click_counters(data, fields, args.counter_prior, windows_s=windows)
    except CounterError as e:
        raise Refused(f"--counters / --counter-prior / --counter-windows: {e}") from None


def _check_resumable(path: Path, data: BacktestData, dataset: str) -> None:
    """``--resume`` skips the runs already in ``path``: only right when they were made from the same rows
    cut into the same periods (a resume with another --max-rows or --period mixed both in one report)."""
    problem = columns_problem(path)
    if problem is not None:
        raise Refused(f"--resume: {problem}; use another --out, or leave out --resume to start again")
    sizes = {t: int(data.bounds[t + 1] - data.bounds[t]) for t in range(data.n_periods)}
    for row in read_csv(path):
        if row.get("dataset", dataset) != dataset or sizes.get(row["period"]) != row["n"]:
            raise Refused(
                f"--resume: {path} holds results of other data or periods (dataset {row.get('dataset')!r}, "
                f"period {row['period']}: {row['n']} samples, now {sizes.get(row['period'])}); "
                "use another --out, or leave out --resume to start again"
            )


def _done_keys(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["protocol"], r["backbone"], r["strategy"], r["seed"]) for r in read_csv(path)}


def main(args: argparse.Namespace) -> int:
    from reloop.engine.models.registry import BackboneContractError

    try:
        return _main(args)
    except Refused as e:
        print(f"reloop backtest: {e}", file=sys.stderr)
        return 2
    except BackboneContractError as e:  # known once a learner is built on the data's spec: its first run
        print(f"reloop backtest: --backbones: {e}", file=sys.stderr)
        return 2


def check_extras() -> None:
    """Import what the command takes from the [replay] extra, before any work: tqdm (the progress bar)
    and matplotlib (the plots, drawn last; ``--report-only`` draws them too). A missing one raises
    ModuleNotFoundError, which ``reloop`` (engine/runtime/cli.py) answers with the extra to install and
    exit 2: matplotlib's came only after every run."""
    import matplotlib  # noqa: F401
    import tqdm  # noqa: F401


def _main(args: argparse.Namespace) -> int:
    check_extras()
    from tqdm import tqdm

    csv_path = args.out / "results.csv"
    if getattr(args, "report_from", None) is None:
        # A rebuilt report keeps the run's split (its header names the run's --report-from): with the
        # default instead, its tables counted the periods its settings were chosen on.
        args.report_from = _previous_report_from(args.out / "report.md") if args.report_only else 1
    if args.report_only:
        if not csv_path.exists():
            raise Refused(f"--report-only: no {csv_path} to rebuild the report from")
        rows = read_csv(csv_path)
        header = _previous_header(args.out / "report.md", rows)
        # The command above is the run's: its --report-from need not be the tables' now.
        header += f"\n{REBUILT} from results.csv by --report-only, the tables from period {args.report_from}"
        write_report(args, rows, header, math.nan)
        return 0
    strategies, model_options, publish_every_ms = _check(args)
    t0 = time.perf_counter()
    data, time_kind = load_data(args)
    if publish_every_ms and time_kind == "pseudo":
        raise Refused(f"--publish-every: {args.dataset_name} has no event time (pseudo-time periods)")
    report_from = getattr(args, "report_from", 1)
    if data.n_periods <= max(1, report_from):  # an empty report that exits 0 reads as a result
        raise Refused(
            f"nothing to report: the data makes {data.n_periods} period(s) (0..{data.n_periods - 1}; "
            f"period 0 is warm-up) and the tables start at period {report_from}; give more rows "
            "(--max-rows), shorter periods (--period) or an earlier --report-from"
            + _few_periods_hint(args, data, time_kind)
        )
    _check_publishing(data, publish_every_ms, max(1, report_from))
    data = _with_counters(args, data)
    ctr = f"ctr {data.judged_labels(slice(None)).mean():.3f}"
    if data.true_labels is not None:  # the flipped labels' rate is not the data's
        ctr += f" ({data.labels.mean():.3f} in the labels trained on, after --label-noise)"
    print(
        f"{args.dataset_name}: {len(data.labels)} samples, {data.n_periods} periods, "
        f"{ctr}, prepared in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if csv_path.exists() and not args.resume:  # (only now: a refused input keeps the results of before)
        csv_path.unlink()
    if cut_torn_run(csv_path):
        print(f"reloop backtest: {csv_path}: its last run was cut short; it runs again", file=sys.stderr)
    if csv_path.exists():
        _check_resumable(csv_path, data, args.dataset_name)
    problem = check_or_record(args.out, run_settings(args), resuming=csv_path.exists())
    if problem is not None:
        raise Refused(f"--resume: {problem}; use another --out, or leave out --resume to start again")
    base = RunSpec(
        protocol="",
        backbone="",
        strategy=strategies[0],
        seed=0,
        y_last=args.y_last,
        epochs=args.epochs,
        batch_size=args.batch_size,
        batch_by=args.batch_by,
        model_options=model_options,
        optimizer=optimizer_items(args),
        replay_size=args.replay_size,
        replay_ratio=args.replay_ratio,
        memory=tuple(args.memory),
        publish_every_ms=publish_every_ms,
    )
    done = _done_keys(csv_path)
    runs = [
        replace(
            base, protocol=p, backbone=b, strategy=s, seed=seed, optimizer=protocol_optimizer_items(args, p)
        )
        for p in _csv_list(args.protocols)
        for b in _csv_list(args.backbones)
        for seed in range(args.seeds)
        for s in strategies
        if (p, b, s.name, seed) not in done
    ]
    tag = {"dataset": args.dataset_name}
    # per event, or (batches by time) per event time as the deep learners
    by_time = args.batch_by == "time"
    river_batching = {
        "lr": args.river_lr,
        "batch_by": args.batch_by,
        "batch_size": args.batch_size if by_time else 1,
        "publish_every_ms": publish_every_ms,
    }
    if args.river and ("streaming", RIVER, "ce", 0) not in done:
        write_csv(({**r, **tag} for r in run_river_baseline(data, **river_batching)), csv_path, append=True)
    # Closed however the runs end: a refusal's line then starts a line of its own, after the bar's.
    with tqdm(total=len(runs), desc="backtest runs", unit="run") as bar:
        if args.workers <= 1:
            _init_worker(data)
            for run in runs:
                write_csv(({**r, **tag} for r in _work(run)), csv_path, append=True)
                bar.update()
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                args.workers, mp_context=ctx, initializer=_init_worker, initargs=(data,)
            ) as ex:
                futures = [ex.submit(_work, run) for run in runs]
                for fut in as_completed(futures):
                    write_csv(({**r, **tag} for r in fut.result()), csv_path, append=True)
                    bar.update()
    rows = read_csv(csv_path)
    write_report(args, rows, _run_header(args, data, time_kind), time.perf_counter() - t0)
    print(f"wrote {args.out / 'report.md'}", file=sys.stderr)
    return 0


def _shown_command(argv: list[str]) -> str:
    """The command for the report, with the dataset path as ``$DATA/...`` when it lies under a folder named
    ``data`` (where it sits on this machine is no business of the report's reader)."""
    out: list[str] = []
    for i, a in enumerate(argv):
        if a == "--report-only":
            continue
        parts = Path(a).parts
        if i > 0 and argv[i - 1] == "--data" and "data" in parts:
            rel = "/".join(parts[len(parts) - parts[::-1].index("data") :])
            out.append("$DATA/" + shlex.quote(rel))
        else:
            out.append(shlex.quote(a))
    return " ".join(out)


def _half(h: float) -> str:
    """A verdict line's half-width in 1e-3 units; n/a where it is undefined (one seed, one period)."""
    return "n/a" if math.isnan(h) else f"{h * 1e3:.2f}"


# Event times before this (1973-03-03 in ms) are more likely seconds read as milliseconds.
_SECONDS_AS_MS_BEFORE = 100_000_000_000


def _few_periods_hint(args: argparse.Namespace, data: BacktestData, time_kind: str) -> str:
    """Why the periods are few where the likely cause is not the rows' number: a calendar period over a
    dataset without event times (Frappe, Criteo: the default week made one period), or epoch seconds
    read as milliseconds (all within 1970's first weeks)."""
    calendar = not args.period.startswith("chunks:")
    if time_kind == "pseudo" and calendar:
        return (
            f". {args.dataset_name} has no event time (its rows are stamped in file order), so calendar "
            "periods make little sense: cut it into equal chunks with --period chunks:N (e.g. chunks:10)"
        )
    times = data.times_ms
    if (
        args.dataset == "impression-log"
        and calendar
        and len(times)
        and 0 < int(times.max()) < _SECONDS_AS_MS_BEFORE
    ):
        return (
            ". The event times all fall before 1973 read as milliseconds: if they are epoch seconds, say "
            "so (--dataset-option time_unit=s)"
        )
    return ""


def _run_header(args: argparse.Namespace, data: BacktestData, time_kind: str) -> str:
    """The report's lines on the run: its command, data and learner settings."""
    sizes = [data.bounds[i + 1] - data.bounds[i] for i in range(data.n_periods)]
    time_note = (
        "**Pseudo-time**: this dataset has no timestamps; periods are consecutive chunks of file order."
        if time_kind == "pseudo"
        else f"Periods: `{args.period}` of event time."
    )
    command = _shown_command(sys.argv[2:])
    data_note = " (`$DATA`: the folder that holds the datasets)" if "$DATA/" in command else ""
    noise = getattr(args, "label_noise", 0.0)
    noise_note = (
        f"\n- label noise: {noise:.0%} of the training labels flipped; every metric uses the true labels"
        if noise
        else ""
    )
    ctr = data.judged_labels(slice(None)).mean()  # the data's, not the flipped labels' (--label-noise)
    return f"""Command: `reloop backtest {command}`{data_note}

- samples: {len(data.labels)}, click rate {ctr:.3f}, periods: {data.n_periods} \
(sizes {min(sizes)}..{max(sizes)}); period 0 is warm-up (CE for all, not evaluated)
- {time_note}{noise_note}
- {learner_settings(args)}"""


# A report of every period on a dataset the learner's defaults were chosen on counts those periods as
# results: said, with the flag that reports only the held-out ones (docs/backtest/README.md).
_EVERY_PERIOD_NOTE = {
    "movielens-100k": " (every period: the learner's defaults were chosen on weeks 1-10 of MovieLens-100K; "
    "--report-from 11 reports only the weeks they never saw)",
    "frappe": " (every period: the learner's defaults were chosen on chunks 1-3 of Frappe in 10 chunks; "
    "--period chunks:10 --report-from 4 reports only the chunks they never saw)",
}


def _previous_report_from(report: Path) -> int:
    """The first period of the tables of ``report`` ("- tables: periods N and later"), else 1."""
    if report.exists():
        for line in report.read_text().splitlines():
            found = re.match(r"- tables: periods (\d+) and later", line)
            if found:
                return int(found.group(1))
    return 1


REBUILT = "- rebuilt"


def _previous_header(report: Path, rows: list[dict[str, Any]]) -> str:
    """For ``--report-only``: the run's lines of the report it replaces (the CSV holds no settings; the
    arguments of now need not be the run's), else a note that they are not known."""
    if report.exists():
        lines = report.read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith("Command:")), None)
        end = next((i for i, line in enumerate(lines) if line.startswith("- tables:")), None)
        if start is not None and end is not None and start < end:
            kept = [line for line in lines[start:end] if not line.startswith(REBUILT)]
            return "\n".join(kept).rstrip("\n")
    periods = sorted({r["period"] for r in rows})
    span = f"{periods[0]}..{periods[-1]}" if periods else "none"
    return (
        "Command: not known (report rebuilt by `--report-only` from results.csv, which holds no run "
        f"settings)\n\n- evaluated periods in results.csv: {span}"
    )


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]], header: str, seconds: float) -> None:
    """report.md and the plots; ``header``: the lines on the run (``_run_header``), ``seconds`` its wall
    time (NaN: rebuilt by ``--report-only``)."""
    from reloop.engine.replay.report import compare

    peer = _peer(args)
    pngs = plot(rows, args.out, peer=peer)
    report_from = getattr(args, "report_from", 1)
    rows = [r for r in rows if r["period"] >= report_from]
    verdicts = [c for c in compare([r for r in rows if r["backbone"] != peer])]
    summary = [
        f"- {c.protocol} · {c.backbone} · {c.strategy}: {c.metric} {c.verdict} "
        f"({c.diff_seeds[0] * 1e3:+.2f} ×1e-3, ± {_half(c.diff_seeds[1])} over seeds, "
        f"± {_half(c.diff_periods[1])} over periods)"
        for c in verdicts
        if c.strategy.startswith("reloop")
    ]
    datasets = sorted({r.get("dataset", "") for r in rows} - {""})
    title = args.title or getattr(args, "dataset_name", None) or ", ".join(datasets) or args.dataset or "?"
    dataset = args.dataset or (datasets[0] if len(datasets) == 1 else "")  # (--report-only: the CSV's)
    text = f"""# Backtest: {title}

{header}
- tables: periods {report_from} and later{
        " (the earlier ones were used to choose settings; the plots show every period)"
        if report_from > 1
        else _EVERY_PERIOD_NOTE.get(dataset, "")
    }
- wall time: {
        "(report rebuilt by --report-only from results.csv)"
        if math.isnan(seconds)
        else f"{seconds / 60:.1f} min"
    } \
on {_machine()}

Metrics are per period, averaged over periods and seeds; Δ = strategy − CE, paired by seed and period,
in units of 1e-3, with a 95% Student-t half-width over seeds (per-seed means over periods) and over periods
(per-period means over seeds). A verdict of "wins" (or "loses") needs both intervals on the better (or worse)
side of 0, else "ties"; with fewer than {MIN_SEEDS} seeds, or fewer than 2 periods, it is "n/a".

## ReLoop verdicts

{chr(10).join(summary) or "- (no ReLoop runs)"}

## Tables

{markdown_tables(rows, peer=peer)}
## Plots

{chr(10).join(f"![{p.stem}]({p.name})" for p in pngs)}

Raw numbers: [results.csv](results.csv).
"""
    (args.out / "report.md").write_text(text)


def _peer(args: argparse.Namespace) -> str | None:
    """The backbone name of the river peer's rows; None when a river_lr learner took the name (with
    --no-river: ``_check``)."""
    return None if RIVER in _csv_list(args.backbones) else RIVER


def learner_settings(args: argparse.Namespace) -> str:
    """The report's line of learner settings (every default of the learner spelled out)."""
    from reloop.engine.models.config import OptimizerConfig
    from reloop.engine.models.registry import backbone_entry

    protocols = _csv_list(args.protocols)
    main_protocol = "periodic" if protocols == ["periodic"] else "streaming"
    opt = OptimizerConfig(**dict(protocol_optimizer_items(args, main_protocol)))
    rates = _rates(opt, _csv_list(args.backbones))
    if main_protocol == "streaming" and "periodic" in protocols:
        periodic = OptimizerConfig(**dict(protocol_optimizer_items(args, "periodic")))
        if periodic != opt:
            rates += f" (periodic protocol: {_rates(periodic, _csv_list(args.backbones)).split(';')[0]})"
    wide = (
        f"per-event Bayesian wide part (prior variance {opt.wide_prior_variance:g}"
        f"{', moderated scores' if opt.wide_moderate else ''})"
        if opt.wide == "bayes"
        else "no wide part"
    )
    replay = (
        f"replay buffer {args.replay_size} samples, {args.replay_ratio:g} replayed per new one (streaming)"
        if getattr(args, "replay_size", 0)
        else "no replay"
    )
    others = [b for b in _csv_list(args.backbones) if backbone_entry(b).kind != "torch"]
    if others:  # FTRL and the river learners take none of the optimizer settings, the wide part included
        wide += f" (torch backbones; {', '.join(others)}: their own optimizer, no wide part)"
    batch = f"batch {args.batch_size}"
    if getattr(args, "batch_by", "") == "time":
        batch += ", one per event time (the river peer too)"
    publish = getattr(args, "publish_every", 0.0)
    if publish:  # (the default, the live learner, is not named: the reports of before say nothing of it)
        batch += (
            f"; scored by the snapshot of the last multiple of {publish:g} s of event time (streaming; the "
            "river peer too)"
        )
    river_lr = getattr(args, "river_lr", RIVER_LR)
    if river_lr != RIVER_LR:  # (the default is not named: the reports of before say nothing of it)
        batch += f"; the river peer's SGD step {river_lr:g}"
    return (
        f"y_last: `{args.y_last}`; epochs per period (periodic): {args.epochs}; {batch}; "
        f"{rates}; {wide}; {replay}; embedding dim {args.embedding_dim}; "
        f"MLP {args.hidden_units}; {args.buckets} hash buckets per field"
        + "".join(f"; error memory {m}" for m in getattr(args, "memory", []))
        + _counters_setting(args)
    )


def _counters_setting(args: argparse.Namespace) -> str:
    counted = getattr(args, "counted", None)
    if counted is None:  # a report rebuilt from its CSV, or settings never resolved against a dataset
        return ""
    fields, windows = counted
    if not fields:
        return "; no click counters"
    prior = f"prior strength {args.counter_prior:g}"
    if windows:
        prior += f", also forgetting in {', '.join(f'{w:g}' for w in windows)} s"
    return f"; click counters of {', '.join(fields)} ({prior}; not the river peer)"


def _rates(opt: Any, backbones: list[str]) -> str:
    """The learning rates of an ``OptimizerConfig``, as the report's settings line names them (the
    tables' rate per backbone where the backbones' defaults differ)."""
    from reloop.engine.models.registry import backbone_entry

    torch_backbones = [b for b in backbones if backbone_entry(b).kind == "torch"]

    def per_backbone(rate: Callable[[str | None], float]) -> str:
        rates = {b: rate(b) for b in torch_backbones}
        if len(set(rates.values())) > 1:
            return ", ".join(f"{b} {lr:g}" for b, lr in rates.items())
        return f"{rate(next(iter(torch_backbones), None)):g}"

    table_rates = per_backbone(opt.effective_embedding_lr)
    emb = (
        f"{'Adagrad' if opt.embedding_optimizer == 'adagrad' else 'SparseAdam'} lr "
        f"{table_rates} on the embedding tables"
        if opt.sparse_embeddings
        else "embedding tables in the dense Adam"
    )
    small = ""
    if opt.small_steps_below > 0:
        small_emb = (
            f", {opt.effective_small_step_embedding_lr:g} on the tables" if opt.sparse_embeddings else ""
        )
        small = (
            f" (steps averaging under {opt.small_steps_below} samples: "
            f"Adam lr {opt.small_step_lr:g}{small_emb})"
        )
    return f"Adam lr {per_backbone(opt.effective_lr)} (dense); {emb}{small}"


if __name__ == "__main__":
    from reloop.engine.runtime.cli import main as cli_main

    sys.exit(cli_main(["backtest", *sys.argv[1:]]))
