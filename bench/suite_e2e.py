"""Figure 1: end to end, Kafka -> decode -> join -> featurise -> train, against the bare PyTorch loop.

Engine: the single-process stream processor (``reloop.engine.runtime.pipeline.Pipeline``), which
``reloop replay`` runs over raw topics (``reloop run`` runs two stages instead: figure 9's whole loop): a
``KafkaSource`` on the local broker reading an impressions topic and a clicks topic from offset 0,
merge by timestamp, batch decode, the joiner (window 2 s of event time), ``StreamTrainer``
(predict-then-learn, ReLoop loss with the logged prediction as y_last) on a DCN or DeepFM learner.
Snapshots are off during the measurement (figure 5 measures them). Samples/s = samples trained /
wall time from opening the source to the last full batch trained.

Stream: Criteo-shaped impressions (13 integer + 26 hashed fields, ~1e6 embedding rows, Zipf ids), 1,000
per second of event time, 25% clicked 10-1,500 ms later; a sentinel a minute after the last click
closes every window.

Baseline: the same backbone (same registry config, same seed) trained by a bare torch loop on tensors
built beforehand from the same samples: forward, BCE-with-logits, backward, SparseAdam + fused Adam.
Engine and baseline alternate round by round in this process; ratio = median per-round ratio.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from reloop.bench.suite import Context, Figure, Row, alternate
from reloop.bench.suite_broker import local_broker
from reloop.bench.suite_profile import cprofile_top

COMMAND = "python -m reloop.bench --only e2e"
TITLE = "1. End to end: Kafka -> decode -> join -> featurise -> train"
WINDOW_MS = 2_000
STALL_S = 30.0


class SourceStalled(RuntimeError):
    """The Kafka source stopped delivering records although the topics hold more."""


# ------------------------------------------------------------------------------------------ data
def make_events(n: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(impressions, clicks) of a Criteo-shaped stream, one impression per ms starting an hour ago; the
    last impression is a sentinel a minute past the last click, which closes every window.

    Event times must be recent: the broker's time-based retention (7 days) deletes older records while
    the benchmark runs (the source then finds its topics empty), and it refuses records stamped more than
    an hour ahead."""
    from reloop.engine.events.schema import Click, Impression

    t0 = int(time.time() * 1000) - 3_600_000
    rng = np.random.default_rng(seed)
    ints = rng.integers(0, 2000, size=(n, 13))
    cats = (rng.zipf(1.2, size=(n, 26)) * 2654435761) % (1 << 32)
    clicked = rng.random(n) < 0.25
    delays = rng.integers(10, 1500, size=n)
    served = rng.uniform(0.05, 0.5, size=n)
    imps, clicks = [], []
    for i in range(n + 1):
        last = i == n
        row = i % n
        features: dict[str, Any] = {f"I{k + 1}": int(ints[row, k]) for k in range(13)}
        features.update({f"C{k + 1}": f"{int(cats[row, k]):08x}" for k in range(26)})
        t = t0 + (n + 60_000 if last else i)
        iid = uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | i).hex
        imps.append(
            Impression(
                impression_id=iid,
                request_id=f"r{i // 10}",
                user_id=f"u{i % 50_000}",
                item_id=f"i{int(cats[row, 0]) % 100_000}",
                features=features,
                event_time_ms=t,
                served_prediction=float(served[row]),
                model_version=1,
                arm="bench",
            )
        )
        if not last and clicked[i]:
            clicks.append(Click(impression_id=iid, event_time_ms=t + int(delays[i])))
    return imps, clicks


def click_labels(imps: list[Any], clicks: list[Any], n: int) -> np.ndarray:
    """1.0 for each of the first ``n`` impressions that has a click, else 0.0."""
    clicked = {c.impression_id for c in clicks}
    return np.array([1.0 if e.impression_id in clicked else 0.0 for e in imps[:n]])


def fill_topics(bootstrap: str, imps: list[Any], clicks: list[Any]) -> tuple[str, str]:
    from reloop.connectors.kafka.admin import create_topics
    from reloop.connectors.kafka.sink import KafkaSink
    from reloop.engine.events.codec import encode

    suffix = uuid.uuid4().hex[:8]
    imp_topic, clk_topic = f"bench.imp.{suffix}", f"bench.clk.{suffix}"
    create_topics(bootstrap, {imp_topic: 1, clk_topic: 1})
    for topic, events in ((imp_topic, imps), (clk_topic, clicks)):
        sink = KafkaSink(bootstrap=bootstrap, topic=topic)
        for e in events:
            # Broker timestamps = event times, so the merge orders the two topics like the events.
            sink.send(encode(e), key=e.impression_id.encode(), timestamp_ms=e.event_time_ms)
        sink.close()
    return imp_topic, clk_topic


# ------------------------------------------------------------------------------------------ engine
def make_learner(backbone: str, spec: Any) -> Any:
    from reloop.engine.models.registry import build_learner

    return build_learner(backbone, spec, "reloop", 0.2, seed=0)


def engine_pass(
    bootstrap: str, topics: tuple[str, str], backbone: str, spec: Any, batch: int, target: int, work: Path
) -> float:
    from reloop.connectors.kafka.source import KafkaSource
    from reloop.engine.checkpoint.registry import SnapshotRegistry
    from reloop.engine.features.featurizer import Featurizer
    from reloop.engine.join.joiner import JoinerConfig
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.clock import system_clock
    from reloop.engine.runtime.pipeline import Pipeline, PipelineSettings
    from reloop.engine.train.period import PeriodTrigger
    from reloop.engine.train.stream import StreamTrainer, StreamTrainerConfig

    trainer = StreamTrainer(
        learner=make_learner(backbone, spec),
        featurizer=Featurizer(spec),
        config=StreamTrainerConfig(batch_size=batch),
    )
    pipeline = Pipeline(
        source=KafkaSource(bootstrap=bootstrap, topics=list(topics)),
        joiner_config=JoinerConfig(window_ms=WINDOW_MS, allowed_lateness_ms=0),
        trainer=trainer,
        registry=SnapshotRegistry(work / uuid.uuid4().hex, keep=1),
        period=PeriodTrigger(every_samples=10**12),
        settings=PipelineSettings(impressions_topic=topics[0], clicks_topic=topics[1], merge_idle_ms=200),
        clock=system_clock,
        stats=EngineStats(),
    )
    began = time.monotonic()
    deadline = began + 900

    progress = [0, began]
    # Instrumentation for the stall report: what the source handed out, and any step that failed
    # (Pipeline.run logs and retries those, and the records a failed step took are gone).
    delivered = [0]
    failures: list[str] = []
    source_poll, pipeline_step = pipeline.source.poll, pipeline.step

    def poll(max_records: int, timeout_s: float) -> list:
        out = source_poll(max_records, timeout_s)
        delivered[0] += len(out)
        return out

    def step() -> int:
        try:
            return pipeline_step()
        except Exception as exc:
            failures.append(repr(exc))
            raise

    # Open at explicit offset 0: in the suite's child a fresh KafkaSource opened "at the beginning"
    # (beginning_offsets) was seen positioned at the log end, handing out nothing (reported in the notes).
    source_open = pipeline.source.open

    def open_at_zero(positions: Any = None) -> None:
        source_open(positions or dict.fromkeys(pipeline.source.partitions(), 0))

    pipeline.source.open = open_at_zero  # type: ignore[method-assign]
    pipeline.source.poll = poll  # type: ignore[method-assign]
    pipeline.step = step  # type: ignore[method-assign]

    def until(p: Pipeline) -> bool:
        now = time.monotonic()
        if p.records_processed != progress[0]:
            progress[0], progress[1] = p.records_processed, now
        elif now - progress[1] > STALL_S:
            where = {f"{tp.topic}:{tp.partition}": off for tp, off in p.source.position().items()}
            raise SourceStalled(
                f"the Kafka source delivered nothing for {STALL_S:.0f} s after {p.records_processed} "
                f"records (source positions {where}, {delivered[0]} records handed out by poll, "
                f"{len(failures)} failed steps {failures[:2]}, {p._merger.buffered() if p._merger else 0} "
                f"held in the merge; the topics hold {target} + sentinel impressions and their clicks)"
            )
        return p.trainer.counters.samples >= target or now > deadline

    t0 = time.perf_counter()
    try:
        pipeline.run(until=until)
    finally:
        pipeline.close(final=None)
    elapsed = time.perf_counter() - t0
    done = trainer.counters.samples
    if done < target:
        raise RuntimeError(f"the pipeline trained {done} of {target} samples within 900 s")
    return done / elapsed


STALLS: list[str] = []
WARNINGS: list[str] = []


class _Warnings(logging.Handler):
    """Keeps the pipeline's warnings ("step failed, retrying" and the like) for the report: a step that
    fails loses the records it had taken from the merge, which shows up here as a stall."""

    def emit(self, record: logging.LogRecord) -> None:
        WARNINGS.append(f"{record.getMessage()} {getattr(record, 'fields', '')}".strip())


logging.getLogger("reloop.pipeline").addHandler(_Warnings(level=logging.WARNING))


def engine_rate(*args: Any) -> float:
    """``engine_pass``, retried (at most 3 times) when the source stops delivering records; the stalls
    are counted in STALLS and reported: they are a finding about the source, not noise to hide."""
    for attempt in range(4):
        try:
            return engine_pass(*args)
        except SourceStalled as exc:
            STALLS.append(str(exc))
            if attempt == 3:
                seen = "; ".join(sorted(set(WARNINGS))[:3]) or "none"
                raise SourceStalled(f"{exc} (4 attempts; pipeline warnings: {seen})") from exc
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------ baseline
class BareLoop:
    """The same backbone as the engine's learner, trained by a bare torch loop on pre-built tensors."""

    def __init__(self, backbone: str, spec: Any, imps: list[Any], labels: np.ndarray, batch: int) -> None:
        import torch
        from reloop.engine.features.featurizer import Featurizer, TorchFeatureBatch

        learner = make_learner(backbone, spec)
        self.model = learner.model
        self.optimizers = list(learner.optimizers.values())
        fb = Featurizer(spec).transform([e.features for e in imps])
        tb = fb.to_torch()
        y = torch.from_numpy(labels.astype(np.float32))
        n = (len(fb) // batch) * batch
        self.batches = [
            (
                TorchFeatureBatch(
                    tb.cat[i : i + batch],
                    tb.num[i : i + batch],
                    tb.multi[i : i + batch],
                    tb.multi_mask[i : i + batch],
                ),
                y[i : i + batch],
            )
            for i in range(0, n, batch)
        ]
        self.samples = n

    def run(self) -> float:
        import torch.nn.functional as F

        self.model.train()
        t0 = time.perf_counter()
        for x, y in self.batches:
            logit = self.model(x)["logit"]
            loss = F.binary_cross_entropy_with_logits(logit, y)
            for o in self.optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in self.optimizers:
                o.step()
        return self.samples / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ figure
def run(ctx: Context) -> Figure:
    import torch
    from reloop.engine.features.spec import criteo_spec

    n = ctx.pick(20_480, 4_096)
    rounds = min(ctx.rounds, 3)  # each engine pass re-reads Kafka and rebuilds the learner
    configs = ctx.pick([("dcn", 1024), ("dcn", 4096), ("deepfm", 1024), ("deepfm", 4096)], [("dcn", 1024)])
    spec = criteo_spec()
    imps, clicks = make_events(n)
    labels = click_labels(imps, clicks, n)
    rows: list[Row] = []
    lines = [
        "| backbone | batch | engine samples/s per round | bare loop samples/s per round | ratio |",
        "|---|---:|---|---|---:|",
    ]
    profile = ""
    with tempfile.TemporaryDirectory(prefix="reloop-bench-e2e-") as tmp, local_broker() as bootstrap:
        work = Path(tmp)
        topics = fill_topics(bootstrap, imps, clicks)
        for backbone, batch in configs:
            target = (n // batch) * batch
            bare = BareLoop(backbone, spec, imps[:n], labels, batch)
            eng, base, ratio = alternate(
                lambda b=backbone, bs=batch, t=target: engine_rate(bootstrap, topics, b, spec, bs, t, work),
                bare.run,
                rounds,
            )
            e_med, b_med = float(np.median(eng)), float(np.median(base))
            rows.append(
                Row(
                    figure=f"end to end {backbone.upper() if backbone == 'dcn' else 'DeepFM'}, batch {batch}",
                    value=e_med,
                    unit="samples/s",
                    baseline_name="bare torch loop, same model, pre-built tensors",
                    baseline_value=b_med,
                    ratio=ratio,
                    target=">= 0.9 x bare loop",
                    met=ratio >= 0.9,
                    command=COMMAND,
                )
            )
            lines.append(
                f"| {backbone} | {batch} | {', '.join(f'{x:,.0f}' for x in eng)} | "
                f"{', '.join(f'{x:,.0f}' for x in base)} | {ratio:.3f} |"
            )
            if ratio < 0.9 and not profile:
                _, profile = cprofile_top(
                    lambda b=backbone, bs=batch, t=target: engine_rate(
                        bootstrap, topics, b, spec, bs, t, work
                    ),
                    top=25,
                )
                profile = f"Profile of one engine pass ({backbone}, batch {batch}): " + profile
            del bare
    notes = "\n".join(
        [
            f"{n:,} impressions ({len(clicks):,} clicks) on the local broker, read from offset 0 by a fresh "
            f"pipeline each round; {rounds} rounds per configuration alternating with the bare loop; "
            f"torch's default {torch.get_num_threads()} threads in both. The engine is the single-process "
            f"pipeline, which `reloop replay` runs over raw topics; `reloop run` runs two stages (figure 9). "
            f"Criteo layout, ~1e6 embedding rows, registry defaults (embedding "
            f"dim 10, MLP 400-400-400), SparseAdam for the table and fused Adam for the rest in both.",
            "",
            *lines,
            *(
                [
                    "",
                    f"**Source stalls**: {len(STALLS)} engine pass(es) stopped receiving records from a "
                    f"fresh `KafkaSource` (assign + seek to the beginning of topics holding data) before "
                    f"the end of the topics and were re-run with a new source; first: {STALLS[0]}. "
                    f"This is a bug to chase in the Kafka source (kafka-python), not a cost of the engine.",
                ]
                if STALLS
                else []
            ),
            *(
                [
                    "",
                    f"**Pipeline warnings** during the figure ({len(WARNINGS)}): "
                    + "; ".join(sorted(set(WARNINGS))[:5]),
                ]
                if WARNINGS
                else []
            ),
            *(["", profile] if profile else []),
        ]
    )
    return Figure(key="e2e", title=TITLE, rows=rows, notes=notes)
