"""Backtests: training strategies x backbones x seeds over time periods, under two protocols.

* ``periodic`` (the paper's setting, periodic retraining): in period t each strategy starts from ITS OWN
  model of period t-1, is first evaluated on period t (before it has seen it), then trains on period t
  for ``epochs`` epochs. y_last is that same previous model's prediction on the sample ("recomputed"),
  or the prediction logged with the sample ("logged").
* ``streaming`` (live mode): one pass in time order; every mini-batch is predicted, then learned
  (progressive validation). At each period boundary a frozen snapshot is taken; y_last is the
  prediction of the snapshot that would have been serving ("recomputed"), or the logged one. A
  learner with ``learn_scored`` (torch learners) scores and learns in one call, as the stream trainer
  does: a per-event wide part scores each sample after learning the earlier ones of its batch (not with
  ``batch_by="time"``: a batch is then one event time, scored whole before it is learned). With
  ``replay_size > 0`` a replay buffer of the latest samples is replayed after each batch (as in
  engine/train/stream.py). With ``publish_every_ms > 0`` a sample is scored instead by the learner as it
  was at the last multiple of that interval of event time (``PublishedScorer``): what ``reloop serve``
  serves when a snapshot is published that often, rather than a learner that has learned every batch
  completed up to the sample. The learning is the same in both.

Period 0 is warm-up in both: no previous model exists, so every strategy trains with plain CE there,
and it is not evaluated. Metrics are per (protocol, backbone, strategy, seed, period).

Every strategy of a seed sees the same initial weights and the same shuffles (both drawn from the seed
alone), so differences against CE are paired.

A per-event river LogisticRegression (predict one, learn one, CE) on the same stream is a peer baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.featurizer import FeatureBatch, Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.metrics.offline import auc, logloss

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

YLastSource = Literal["recomputed", "logged"]
RIVER_LR = 0.05  # the river peer's SGD step unless told otherwise
# The periodic protocol's dense Adam rate unless told otherwise: chosen for it with its 3 epochs a period on
# the selection periods (docs/backtest/ablation.md); the learner's defaults are chosen for streaming.
PERIODIC_LR = 1e-3
PROTOCOLS: tuple[str, ...] = ("periodic", "streaming")


@dataclass(frozen=True, slots=True)
class Strategy:
    """A loss: ``ce`` (alpha ignored), ``kd`` or ``reloop`` mixed with CE by ``alpha``."""

    strategy: str
    alpha: float = 0.0

    @property
    def name(self) -> str:
        return "ce" if self.strategy == "ce" else f"{self.strategy}@{self.alpha:g}"


def strategy_grid(strategies: Iterable[str], alphas: Iterable[float]) -> tuple[Strategy, ...]:
    """The runs' strategies. A bare name runs at each of ``alphas`` (``ce`` once, it has no alpha); a
    name with ``@alpha`` runs at that alpha only, so each strategy can have its own grid:
    ``strategy_grid(["ce", "kd@0.5", "reloop"], [0.2, 0.5])`` is ce, kd@0.5, reloop@0.2, reloop@0.5."""
    from reloop.engine.loss.losses import STRATEGIES, VARIANTS

    out: list[Strategy] = []
    alphas = list(alphas)
    for item in strategies:
        name, at, alpha = item.partition("@")
        if name not in (*STRATEGIES, *VARIANTS):
            raise ValueError(f"unknown strategy {name!r} in {item!r}: use one of {(*STRATEGIES, *VARIANTS)}")
        if name == "ce":
            if at:
                raise ValueError(f"{item!r}: ce has no alpha")
            grid = [Strategy("ce", 0.0)]
        elif at:
            try:
                grid = [Strategy(name, float(alpha))]
            except ValueError:
                raise ValueError(f"{item!r}: expected STRATEGY@ALPHA, e.g. kd@0.5") from None
        else:
            grid = [Strategy(name, a) for a in alphas]
        out.extend(s for s in grid if s not in out)  # asked twice: run once
    if not any(s.strategy == "ce" for s in out):
        raise ValueError("the strategies must include ce: every comparison is paired against it")
    return tuple(out)


@dataclass(frozen=True)
class BacktestData:
    """A featurised, time-ordered stream cut into periods ``[bounds[t], bounds[t+1])``."""

    spec: FeatureSpec
    batch: FeatureBatch
    labels: np.ndarray
    logged: np.ndarray
    times_ms: np.ndarray
    bounds: tuple[int, ...]
    raw_features: Sequence[dict[str, Any]] = field(repr=False, default=())
    # The labels every score is judged against when ``labels`` (what the learners train on) were
    # corrupted on purpose (``with_label_noise``); None = ``labels``.
    true_labels: np.ndarray | None = field(repr=False, default=None)

    @property
    def n_periods(self) -> int:
        return len(self.bounds) - 1

    def judged_labels(self, sl: slice) -> np.ndarray:
        """The labels of ``sl`` that scores are evaluated against."""
        return (self.labels if self.true_labels is None else self.true_labels)[sl]

    def period(self, t: int) -> slice:
        return slice(self.bounds[t], self.bounds[t + 1])


def with_label_noise(data: BacktestData, rate: float, seed: int = 0) -> BacktestData:
    """``data`` whose training labels have a ``rate`` fraction flipped (drawn once from ``seed``, so every
    run sees the same flips), evaluated against the true labels: how each strategy degrades under label
    noise (docs/method.md, the paper's open question)."""
    if not 0.0 <= rate < 0.5:
        raise ValueError(f"label noise must be in [0, 0.5), got {rate}")
    flip = np.random.default_rng([seed, 11]).random(len(data.labels)) < rate
    noisy = np.where(flip, 1.0 - data.labels, data.labels).astype(data.labels.dtype)
    true = data.labels if data.true_labels is None else data.true_labels
    return replace(data, labels=noisy, true_labels=true)


def with_click_counters(
    data: BacktestData,
    fields: Sequence[str],
    prior_strength: float,
    label_times_ms: np.ndarray | None = None,
    windows_s: Sequence[float] = (),
) -> BacktestData:
    """``data`` with click-counter features of ``fields`` (engine/features/counters.py) appended to its
    spec and dense inputs, each row's as a live counter would have served it: with the labels that had
    arrived by its event time (``label_times_ms``; None: each known once its event time has passed, as
    this module's protocols assume). The river peer reads ``raw_features`` and does not get them."""
    from reloop.engine.features.counters import ClickCounters
    from reloop.engine.features.streamed_counters import streamed_counter_values

    counters = ClickCounters(data.spec, fields, prior_strength, windows_s)
    values = streamed_counter_values(counters, data.batch, data.labels, data.times_ms, label_times_ms)
    spec = FeatureSpec(fields=(*data.spec.fields, *counters.spec_fields()))
    b = data.batch
    batch = FeatureBatch(
        cat=b.cat, num=np.concatenate([b.num, values], axis=1), multi=b.multi, multi_mask=b.multi_mask
    )
    return replace(data, spec=spec, batch=batch)


def period_bounds_by_time(times_ms: np.ndarray, period_ms: int, min_size: int = 1) -> tuple[int, ...]:
    """Cut points of fixed event-time periods starting at the first event; a period smaller than
    ``min_size`` is merged into the one before it (the last partial week, say), the first one into the
    one after it (a stray early row would be the whole warm-up)."""
    if period_ms <= 0:
        raise ValueError(f"period_ms must be > 0, got {period_ms}")
    if len(times_ms) == 0:
        return (0,)
    if np.any(np.diff(times_ms) < 0):
        raise ValueError("times must be sorted")
    idx = (times_ms - times_ms[0]) // period_ms
    cuts = [0, *(np.flatnonzero(np.diff(idx)) + 1).tolist(), len(times_ms)]
    merged = [cuts[0]]
    for c in cuts[1:]:
        if c - merged[-1] < min_size and len(merged) > 1:
            merged[-1] = c
        else:
            merged.append(c)
    if len(merged) > 2 and merged[1] - merged[0] < min_size:
        del merged[1]
    return tuple(merged)


def period_bounds_by_count(n: int, chunks: int) -> tuple[int, ...]:
    """``chunks`` nearly equal consecutive chunks (for pseudo-time streams)."""
    if chunks < 1 or chunks > max(n, 1):
        raise ValueError(f"chunks must be in [1, {n}], got {chunks}")
    return tuple(int(round(i * n / chunks)) for i in range(chunks + 1))


def prepare(
    samples: Iterable[LabeledSample],
    spec: FeatureSpec,
    period: Callable[[np.ndarray], tuple[int, ...]],
    keep_raw: bool = True,
) -> BacktestData:
    """Featurise the whole stream once (columnar), then cut it into periods with ``period(times)``."""
    items = list(samples)
    times = np.array([s.event_time_ms for s in items], dtype=np.int64)
    raw = [s.features for s in items]
    return BacktestData(
        spec=spec,
        batch=Featurizer(spec).transform(raw),
        labels=np.array([s.label for s in items], dtype=np.float32),
        logged=np.array([s.served_prediction for s in items], dtype=np.float64),
        times_ms=times,
        bounds=period(times),
        raw_features=raw if keep_raw else (),
    )


@dataclass(frozen=True)
class RunSpec:
    """One training run: a backbone, a strategy, a seed, a protocol and the knobs they share."""

    protocol: str
    backbone: str
    strategy: Strategy
    seed: int
    y_last: YLastSource = "recomputed"
    epochs: int = 1
    batch_size: int = 256
    # streaming: "count" = consecutive batches of batch_size; "time" = a batch never holds two event
    # times, so events that share a timestamp are all scored before any of them is learned (at most
    # batch_size each; see ``stream_batches``)
    batch_by: str = "count"
    model_options: tuple[tuple[str, Any], ...] = ()
    optimizer: tuple[tuple[str, Any], ...] = ()
    replay_size: int = 0  # streaming: replay buffer capacity (0 = off)
    replay_ratio: float = 1.0  # streaming: replayed samples per new one
    # streaming: ReLoop2 error memories scored on the same stream (engine/memory/stream_eval.MemorySpec);
    # each adds rows named "<strategy>+<memory>@<lam>" beside the base model's
    memory: tuple[Any, ...] = ()
    # streaming: score with the snapshot of the last multiple of this much event time (0: the live learner)
    publish_every_ms: int = 0


LearnerFactory = Callable[[RunSpec, FeatureSpec], Any]


def learner_options(backbone: str, model_options: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """The run's model options that ``backbone`` takes. They size every backbone of a run alike, so a
    backbone without that knob (an FM has no MLP to size) or whose config pins it to one value (LR's and
    FTRL's one-column table: ``embedding_dim`` is 1 whatever the run's) leaves it out."""
    from reloop.engine.models.registry import backbone_entry

    fields = backbone_entry(backbone).config_cls.model_fields
    return {k: v for k, v in model_options if k in fields and not _pinned(fields[k])}


def _pinned(info: FieldInfo) -> bool:
    bounds = {type(m).__name__: m for m in info.metadata}
    ge, le = bounds.get("Ge"), bounds.get("Le")
    return ge is not None and le is not None and ge.ge == le.le


def check_learner_options(
    backbones: Iterable[str],
    model_options: Iterable[tuple[str, Any]],
    strategies: Iterable[Strategy] = (),
    optimizers: Iterable[tuple[tuple[str, Any], ...]] = (),
) -> None:
    """Validate each backbone's model config before any run: a bad option fails in a second, naming the
    backbone and the key, not after the runs before it (ValueError). With ``strategies`` the whole learner
    config of each is checked too, with each of ``optimizers`` (a protocol's optimizer settings): an alpha
    outside [0, 1], an unknown optimizer key or a bad value fails as well."""
    from reloop.engine.features.spec import CategoricalField, FeatureSpec
    from reloop.engine.models.registry import make_config, model_config_of

    options = tuple(model_options)
    # a stand-in: the learner config holds the spec without checking it against the model
    spec = FeatureSpec(fields=(CategoricalField(name="x", buckets=2),))
    strategies, optimizers = tuple(strategies), tuple(optimizers) or ((),)
    for backbone in backbones:
        own = learner_options(backbone, options)
        model_config_of(backbone, **own)
        for strategy in strategies:
            for optimizer in optimizers:
                try:
                    make_config(
                        backbone, spec, strategy.strategy, strategy.alpha, optimizer=dict(optimizer), **own
                    )
                except ValueError as e:
                    raise ValueError(f"{strategy.name} on {backbone!r}: {e}") from None


def default_learner_factory(run: RunSpec, spec: FeatureSpec) -> Any:
    """``build_learner`` with the model options this backbone takes (``learner_options``)."""
    from reloop.engine.models.registry import build_learner

    options = learner_options(run.backbone, run.model_options)
    return build_learner(
        run.backbone,
        spec,
        run.strategy.strategy,
        run.strategy.alpha,
        seed=run.seed,
        optimizer=dict(run.optimizer),
        **options,
    )


def _row(run: RunSpec, t: int, labels: np.ndarray, probs: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "protocol": run.protocol,
        "backbone": run.backbone,
        "strategy": run.strategy.name,
        "loss": run.strategy.strategy,
        "alpha": run.strategy.alpha,
        "seed": run.seed,
        "period": t,
        "n": int(len(labels)),
        "ctr": float(np.mean(labels)) if len(labels) else math.nan,
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        **extra,
    }


def _batches(n: int, size: int) -> Iterator[slice]:
    if size < 1:  # range() would yield no batch: nothing learned, nothing scored
        raise ValueError(f"batch size must be >= 1, got {size}")
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


BATCH_BY = ("count", "time")


def stream_batches(times_ms: np.ndarray, size: int, by: str = "count") -> Iterator[slice]:
    """The predict-then-learn batches of a time-ordered stream. ``count``: every ``size`` events.
    ``time``: one batch per distinct event time (split every ``size`` events if larger), so no event is
    scored after the label of one that happened at the same moment was learned: a server scores what it
    serves together before any of its feedback exists. (On MovieLens-100K half the ratings share their
    second with the previous one, nearly always the same user's.) Pseudo-time streams (Criteo, Frappe:
    file order) have no such moments; ``time`` there only shrinks the batches."""
    if by == "count":
        yield from _batches(len(times_ms), size)
        return
    if by != "time":
        raise ValueError(f"unknown batching {by!r}: use one of {BATCH_BY}")
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    starts = np.flatnonzero(np.r_[True, np.diff(times_ms) != 0]).tolist()
    for a, e in zip(starts, [*starts[1:], len(times_ms)], strict=True):
        for s in range(a, e, size):
            yield slice(s, min(s + size, e))


class PublishedScorer:
    """What a server holding the snapshot published at the last multiple of ``every_ms`` of event time
    scores. A step on a batch counts from its last sample's time: a snapshot at boundary B holds every batch
    whose last sample came before B. Times must not decrease. For each batch, before it is learned:

    * its samples whose boundary is the current snapshot's are scored by that snapshot;
    * the others (a later boundary B) by a snapshot of the learner as it is now. That is the learner at B:
      the previous batch ended before B (had it ended at or after B, its own samples would have crossed B
      and taken the snapshot at B already, before it was learned).

    So at most one snapshot per batch, and only on batches that cross a boundary."""

    def __init__(self, every_ms: int, snapshot: Callable[[], Any]) -> None:
        if every_ms <= 0:
            raise ValueError(f"publish_every_ms must be > 0, got {every_ms}")
        self.every_ms = every_ms
        self._snapshot = snapshot
        self._served: Any = None
        self._boundary: int | None = None
        self.snapshots = 0

    def models(self, times_ms: np.ndarray) -> list[tuple[slice, Any]]:
        """``(rows, model)`` pairs covering a batch with these (non-decreasing) event times, in order."""
        boundaries = times_ms // self.every_ms
        if len(boundaries) == 0:
            return []
        if self._boundary is not None and boundaries[-1] <= self._boundary:  # (<: out-of-order times)
            return [(slice(0, len(boundaries)), self._served)]
        old = self._served
        cut = 0 if self._boundary is None else int(np.searchsorted(boundaries, self._boundary, side="right"))
        self._served, self._boundary = self._snapshot(), int(boundaries[-1])
        self.snapshots += 1
        pairs = [(slice(0, cut), old)] if cut else []
        return [*pairs, (slice(cut, len(boundaries)), self._served)]


def run_periodic(
    data: BacktestData, run: RunSpec, factory: LearnerFactory = default_learner_factory
) -> list[dict[str, Any]]:
    learner = factory(run, data.spec)
    rows: list[dict[str, Any]] = []
    for t in range(data.n_periods):
        sl = data.period(t)
        batch, labels = data.batch.take(sl), data.labels[sl]
        if len(labels) == 0:
            continue
        y_last: np.ndarray | None = None
        if t > 0:
            # The model of period t-1 scores period t before learning it: this is both the
            # evaluation and (recomputed mode) the y_last of that strategy's own last model.
            probs = learner.predict_proba(batch)
            y_last = probs if run.y_last == "recomputed" else data.logged[sl]
            rows.append(_row(run, t, data.judged_labels(sl), probs))
        active: list[float] = []
        for epoch in range(run.epochs):
            # The shuffle depends on (seed, period, epoch) only, so every strategy sees the same order.
            order = np.random.default_rng([run.seed, t, epoch]).permutation(len(labels))
            for b in _batches(len(order), run.batch_size):
                idx = order[b]
                stats = learner.learn(batch.take(idx), labels[idx], None if y_last is None else y_last[idx])
                active.append(stats.sc_active_fraction)
        if rows and rows[-1]["period"] == t:
            rows[-1]["sc_active"] = float(np.mean(active)) if active else 0.0
    return rows


def run_streaming(
    data: BacktestData, run: RunSpec, factory: LearnerFactory = default_learner_factory
) -> list[dict[str, Any]]:
    from reloop.engine.train.replay_buffer import ReplayBuffer

    learner = factory(run, data.spec)
    learn_scored = getattr(learner, "learn_scored", None)
    if run.batch_by == "time" and getattr(learner, "wide", None) is not None:
        # learn_scored's per-event wide part scores a row after learning the batch's earlier rows; by
        # time those share its event time, all of whose rows are scored before any is learned.
        learn_scored = None
    replay = (
        ReplayBuffer(run.replay_size, run.replay_ratio, run.batch_size, run.seed) if run.replay_size else None
    )
    learn_replay = getattr(learner, "learn_replay", learner.learn)
    snapshot = None
    memory = None
    if run.memory:
        from reloop.engine.memory.stream_eval import StreamMemory

        if not hasattr(learner, "hidden"):  # the memory's key: fail before the first batch, not within it
            raise ValueError(f"an error memory needs a backbone with a hidden layer, not {run.backbone!r}")
        memory = StreamMemory(tuple(run.memory))
    published = None
    if run.publish_every_ms:
        if memory is not None:
            raise ValueError("an error memory is scored with the live learner: not with publish_every_ms")
        published = PublishedScorer(run.publish_every_ms, learner.clone_frozen)
    rows: list[dict[str, Any]] = []
    for t in range(data.n_periods):
        sl = data.period(t)
        batch, labels, logged = data.batch.take(sl), data.labels[sl], data.logged[sl]
        times = data.times_ms[sl]
        probs = np.empty(len(labels), dtype=np.float64)
        active: list[float] = []
        if memory is not None:
            memory.start_period(len(labels))
        for b in stream_batches(times, run.batch_size, run.batch_by):
            mb = batch.take(b)
            if memory is not None:
                memory.before(mb, learner, snapshot)  # keys of the states that score this batch
            if published is not None:
                served = probs[b]  # a view: written through
                for part, model in published.models(times[b]):
                    served[part] = model.predict_proba(mb.take(part))
            elif learn_scored is None:
                probs[b] = learner.predict_proba(mb)
            if snapshot is None:
                y_last = None
            elif run.y_last == "recomputed":
                y_last = snapshot.predict_proba(mb)
            else:
                y_last = logged[b]
            if learn_scored is None:
                stats = learner.learn(mb, labels[b], y_last)
            elif published is None:
                probs[b], stats = learn_scored(mb, labels[b], y_last)
            else:
                _, stats = learn_scored(mb, labels[b], y_last)  # the same learning; served scores above
            active.append(stats.sc_active_fraction)
            if memory is not None:
                memory.after(b, labels[b], probs[b])
            if replay is not None:
                replay.add(mb, labels[b], y_last)
                for draw in replay.take():
                    learn_replay(draw.batch, draw.labels, draw.y_last, draw.weights)
        if t > 0 and len(labels):
            judged = data.judged_labels(sl)
            rows.append(_row(run, t, judged, probs, sc_active=float(np.mean(active))))
            for name, corrected in memory.variants() if memory is not None else ():
                rows.append(_row(run, t, judged, corrected, strategy=f"{run.strategy.name}+{name}"))
        snapshot = learner.clone_frozen()
        if memory is not None:
            memory.on_snapshot()
    return rows


def run_one(
    data: BacktestData, run: RunSpec, factory: LearnerFactory = default_learner_factory
) -> list[dict[str, Any]]:
    if run.protocol == "periodic":
        return run_periodic(data, run, factory)
    if run.protocol == "streaming":
        return run_streaming(data, run, factory)
    raise ValueError(f"unknown protocol {run.protocol!r}: use one of {PROTOCOLS}")


class RiverInputs:
    """The river peer's inputs, read in stream order: a categorical value one-hot, a multi-valued field's
    values at 1/len each, a dense value as ``log1p(max(v, 0))`` standardised by that feature's running
    mean and deviation over the rows read so far, this one included (label-free, and no row sees a later
    one; 0 until a feature has varied). Unscaled, Criteo's counts (log1p up to ~11, 13 of them a row)
    made each SGD step overshoot: the peer's LogLoss on the Criteo sample was 0.91. MovieLens and
    Frappe have no dense values, so their peer is unchanged."""

    def __init__(self) -> None:
        self._moments: dict[str, list[float]] = {}  # per dense feature: count, mean, sum of squares

    def __call__(self, features: dict[str, Any]) -> dict[str, float]:
        x: dict[str, float] = {}
        for k, v in features.items():
            if isinstance(v, list):
                for item in v:
                    x[f"{k}={item}"] = 1.0 / len(v)
            elif isinstance(v, float):
                x[k] = self._standardised(k, math.log1p(max(v, 0.0)))
            else:
                x[f"{k}={v}"] = 1.0
        return x

    def _standardised(self, key: str, z: float) -> float:
        m = self._moments.setdefault(key, [0.0, 0.0, 0.0])
        m[0] += 1.0
        delta = z - m[1]
        m[1] += delta / m[0]
        m[2] += delta * (z - m[1])  # Welford
        sd = math.sqrt(m[2] / (m[0] - 1.0)) if m[0] > 1.0 else 0.0
        return (z - m[1]) / sd if sd > 0.0 else 0.0


def run_river_baseline(
    data: BacktestData,
    lr: float = RIVER_LR,
    batch_by: str = "count",
    batch_size: int = 1,
    publish_every_ms: int = 0,
    inputs: Callable[[], RiverInputs] = RiverInputs,
) -> list[dict[str, Any]]:
    """Per-event predict-then-learn river LogisticRegression (SGD, CE) on one-hot raw features (read by
    ``inputs()``: ``RiverInputs`` or a subclass); with
    ``batch_by="time"`` the events of one event time are all scored before any of them is learned (the
    rule the deep learners follow then, ``stream_batches``), each still learned one at a time. With
    ``publish_every_ms`` each event is scored by a copy of the model as it was at the last multiple of
    that interval of event time (``PublishedScorer``), as the deep learners are then."""
    import copy

    from river import linear_model, optim

    if not data.raw_features:
        raise ValueError("the river baseline needs the raw features (prepare(..., keep_raw=True))")
    model = linear_model.LogisticRegression(optimizer=optim.SGD(lr))
    read = inputs()
    published = PublishedScorer(publish_every_ms, lambda: copy.deepcopy(model)) if publish_every_ms else None
    rows = []
    run = RunSpec("streaming", "river_lr", Strategy("ce"), 0)
    for t in range(data.n_periods):
        sl = data.period(t)
        labels = data.labels[sl]
        times = data.times_ms[sl]
        probs = np.empty(len(labels))
        raw = data.raw_features[sl]
        for b in stream_batches(times, batch_size, batch_by):
            xs = [read(f) for f in raw[b]]
            parts = [(slice(0, len(xs)), model)] if published is None else published.models(times[b])
            for part, scorer in parts:
                for i, x in enumerate(xs[part], b.start + part.start):
                    probs[i] = scorer.predict_proba_one(x).get(True, 0.0)
            for i, x in enumerate(xs, b.start):
                model.learn_one(x, bool(labels[i]))
        if t > 0 and len(labels):
            rows.append(_row(run, t, data.judged_labels(sl), probs, sc_active=0.0))
    return rows
