"""Figure 9: the two-stage data plane (join stage -> samples topic -> train stage) on the local broker.

Rows (named so they can be found by name):

* "train stage from the samples topic, <model>, batch <b>": ``TrainStage`` reading Arrow batches from a
  Kafka samples topic from offset 0 until ``target`` samples are trained (decode, dedup by seq,
  featurise the Arrow columns, predict-then-learn, the batched progressive metric, ledger off,
  snapshots off), against the same model trained by a bare torch loop on tensors built beforehand, in
  this process, alternating rounds (same torch threads: 1, as ``reloop run`` gives each stage); the
  same stage reading through confluent-kafka in the same rounds (", confluent-kafka" rows).
* "join stage per process, kafka-python": one ``JoinStage`` (one consumer-group member owning every
  task) from raw impressions/clicks topics to the samples topic; samples/s from the first poll to the
  last sample flushed. Baseline: the bare kafka-python consume of the same records (``KafkaSource``).
* "join stage per process, in-memory log": the same ``JoinStage`` over an in-process log holding the
  same records (``MemoryLog``; its partitions read in turns, as a fetch returns them): the stage's own
  work without a Kafka client, against the kafka-python join stage in the same rounds. No client can
  take the stage past this rate on the same machine.
* "whole loop, two processes": ``reloop run`` (join and train processes, one torch thread each) on raw
  topics of four times the other rows' events until the target samples are trained (from both stages
  started to the period snapshot at the target), against the bare loop with two threads; the same
  with ``kafka.client: confluent`` (both processes on librdkafka) in the same rounds.
* "..., while the join stage works": the same runs' train stage samples/s from its progress lines, from
  the first with samples trained to the last before the join stage had sent every sample: both stages
  at work, the start-up and the snapshot left out. A join stage that keeps up with its input needs less
  of the cores than this one catching up with a backlog: a bound from below. The train stage's rate
  once the join stage is done (a bound from above) is in the figure's notes.
* "whole loop, two processes, train at torch's default threads": the same with the train process at
  torch's default, one thread per core, sharing every core with the join process and the broker (what
  ``reloop run`` ran with ``train.threads`` unset before it left a core to the join process: on 2 cores
  it now runs the one-thread rows); with kafka-python and with confluent-kafka.
* "whole loop's ceiling": the bare loop with one thread (the train process's) against two threads, in
  the whole loop's rounds: a train process as fast as its model's bare loop, with the join process free,
  would reach this ratio and no more.

Learner in every row: the backbone with the optimizer the bare loop has (sparse embedding gradients
with SparseAdam, fused Adam for the rest, no wide part: ``OptimizerConfig.previous_defaults()``), so the
ratio measures the data plane, not a learner difference (figure 8 measures the learner defaults).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from reloop.bench.suite import Context, Figure, Row, alternate, alternate_many, median_ratio
from reloop.bench.suite_broker import local_broker
from reloop.bench.suite_e2e import BareLoop, click_labels, fill_topics, make_events
from reloop.connectors.memory.memory import MemoryGroupSource

COMMAND = "python -m reloop.bench --only stages"
KP = "kafka-python"
TITLE = "9. Data plane v2: join stage, samples topic, train stage"
REPO = Path(__file__).resolve().parents[1]


def _learner(backbone: str, spec: Any) -> Any:
    from reloop.engine.models.config import OptimizerConfig
    from reloop.engine.models.registry import build_learner

    return build_learner(backbone, spec, "reloop", 0.2, seed=0, optimizer=OptimizerConfig.previous_defaults())


def _bare(backbone: str, spec: Any, imps: list[Any], labels: np.ndarray, batch: int) -> BareLoop:
    """The bare loop over the engine's learner (model and optimizers), not the registry defaults."""
    bare = BareLoop(backbone, spec, imps, labels, batch)
    learner = _learner(backbone, spec)
    bare.model, bare.optimizers = learner.model, list(learner.optimizers.values())
    return bare


def bare_at(bare: BareLoop, threads: int) -> float:
    """``bare.run()`` with ``threads`` torch threads, and this process back at one thread after it."""
    import torch

    torch.set_num_threads(threads)
    try:
        return bare.run()
    finally:
        torch.set_num_threads(1)


def fill_samples_topic(bootstrap: str, imps: list[Any], labels: np.ndarray, per_message: int = 1024) -> str:
    """The samples topic as the join stage writes it (one Arrow batch per message), from the events."""
    from reloop.connectors.kafka.admin import create_topics
    from reloop.connectors.kafka.sink import KafkaSink
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
    from reloop.engine.events.schema import LabeledSample

    topic = f"bench.samples.{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {topic: 1})
    sink = KafkaSink(bootstrap=bootstrap, topic=topic, client_config={"max_request_size": 8 << 20})
    samples = [
        LabeledSample(
            e.impression_id, e.features, int(y), e.served_prediction, e.model_version, e.event_time_ms
        )
        for e, y in zip(imps, labels, strict=True)
    ]
    for i in range(0, len(samples), per_message):
        chunk = samples[i : i + per_message]
        sink.send(encode_batch(batch_from_samples(chunk, task=0, first_seq=i)), partition=0,
                  timestamp_ms=chunk[-1].event_time_ms)  # fmt: skip
    sink.close()
    return topic


def train_stage_rate(
    bootstrap: str, topic: str, backbone: str, spec: Any, batch: int, target: int, client: str = KP
) -> float:
    from reloop.engine.checkpoint.registry import SnapshotRegistry
    from reloop.engine.features.featurizer import Featurizer
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.clock import system_clock
    from reloop.engine.runtime.train_stage import TrainStage, TrainStageSettings
    from reloop.engine.train.period import PeriodTrigger
    from reloop.engine.train.stream import StreamTrainer, StreamTrainerConfig

    with tempfile.TemporaryDirectory(prefix="reloop-bench-train-") as tmp:
        if client == "confluent":
            from reloop.connectors.confluent.source import ConfluentSource

            source: Any = ConfluentSource(
                bootstrap=bootstrap, topics=[topic], client_config={"max.partition.fetch.bytes": 16 << 20}
            )
        else:
            from reloop.connectors.kafka.source import KafkaSource

            source = KafkaSource(
                bootstrap=bootstrap, topics=[topic], client_config={"max_partition_fetch_bytes": 16 << 20}
            )
        stage = TrainStage(
            source=source,
            trainer=StreamTrainer(
                learner=_learner(backbone, spec),
                featurizer=Featurizer(spec),
                config=StreamTrainerConfig(batch_size=batch),
            ),
            registry=SnapshotRegistry(Path(tmp), keep=1),
            period=PeriodTrigger(every_samples=10**12),
            settings=TrainStageSettings(samples_topic=topic),
            clock=system_clock,
            stats=EngineStats(),
        )
        stage.open()
        t0 = time.perf_counter()
        first: tuple[float, int] | None = None  # (time, samples) after the first step that trained
        deadline = time.monotonic() + 600
        while stage.trainer.counters.samples < target and time.monotonic() < deadline:
            stage.step()
            if first is None and stage.trainer.counters.samples:
                first = (time.perf_counter(), stage.trainer.counters.samples)
        end = time.perf_counter()
        done = stage.trainer.counters.samples
        stage.close(final=None)
    if done < target:
        raise RuntimeError(f"the train stage trained {done} of {target} samples in 600 s")
    if first is not None and done > first[1]:
        AFTER_FIRST.setdefault((backbone, batch, client), []).append(
            ((done - first[1]) / (end - first[0]), first[0] - t0)
        )
    return done / (end - t0)


# Per (backbone, batch, client), per round: (samples/s after the first trained step, seconds to that step).
AFTER_FIRST: dict[tuple[str, int, str], list[tuple[float, float]]] = {}


STALLS: dict[str, int] = {}


def join_stage_rate(
    bootstrap: str, topics: tuple[str, str], spec: Any, expected: int, client: str = "kafka-python"
) -> float:
    """One timed join pass; a pass whose consumer stalls (``ConsumerStalled``) is counted in ``STALLS``
    and run again (what the supervisor does in ``reloop join``)."""
    from reloop.engine.runtime.join_stage import ConsumerStalled

    for _ in range(3):
        try:
            return _join_pass(bootstrap, topics, spec, expected, client)
        except ConsumerStalled:
            STALLS[client] = STALLS.get(client, 0) + 1
    raise RuntimeError(f"the {client} join stage stalled 3 times in a row")


def join_stage_parts(
    bootstrap: str,
    topics: tuple[str, str],
    group_id: str,
    samples_topic: str,
    checkpoint_root: str,
    spec: Any = None,
    client: str = "kafka-python",
    memory: Any = None,
) -> Any:
    """A ``JoinStage`` as the benchmarks run it: a member of ``group_id`` over the raw topics, writing
    to ``samples_topic`` (which must exist), no checkpoints while timed, stalls detected after 30 s.
    ``client="memory"``: the same stage over ``memory`` (a ``MemoryLog``) instead of a broker."""
    from reloop.engine.deadletter import DeadLetterSink
    from reloop.engine.features.check import SpecChecker
    from reloop.engine.features.spec import criteo_spec
    from reloop.engine.join.joiner import JoinerConfig
    from reloop.engine.metrics.stats import EngineStats
    from reloop.engine.runtime.clock import system_clock
    from reloop.engine.runtime.intake import IntakeLimits
    from reloop.engine.runtime.join_stage import JoinStage, JoinStageSettings

    if client == "memory":
        from reloop.connectors.memory.memory import MemorySink

        source: Any = _InterleavedMemorySource(memory, list(topics))
        sink: Any = MemorySink(memory, samples_topic)
    elif client == "confluent":
        from reloop.connectors.confluent.group_source import ConfluentGroupSource
        from reloop.connectors.confluent.sink import ConfluentSink

        source = ConfluentGroupSource(bootstrap=bootstrap, topics=list(topics), group_id=group_id)
        sink = ConfluentSink(
            bootstrap=bootstrap, topic=samples_topic, client_config={"message.max.bytes": 8 << 20}
        )
    else:
        from reloop.connectors.kafka.group_source import KafkaGroupSource
        from reloop.connectors.kafka.sink import KafkaSink

        source = KafkaGroupSource(bootstrap=bootstrap, topics=list(topics), group_id=group_id)
        sink = KafkaSink(
            bootstrap=bootstrap, topic=samples_topic, client_config={"max_request_size": 8 << 20}
        )
    return JoinStage(
        source=source,
        samples=sink,
        dead_letters=DeadLetterSink(),
        checkpoint_root=checkpoint_root,
        joiner_config=JoinerConfig(window_ms=2_000, allowed_lateness_ms=0),
        limits=IntakeLimits(max_future_ms=None),
        settings=JoinStageSettings(
            impressions_topic=topics[0], clicks_topic=topics[1], samples_topic=samples_topic,
            checkpoint_every_s=3600, max_delay_ms=20, poll_timeout_s=0.01, stall_timeout_s=30,
        ),
        clock=system_clock,
        checker=SpecChecker(spec or criteo_spec()),
        stats=EngineStats(),
    )  # fmt: skip


def fill_partitioned_topics(
    bootstrap: str, imps: list[Any], clicks: list[Any], partitions: int
) -> tuple[str, str]:
    """Raw topics of ``partitions`` partitions keyed by impression id (co-partitioned), with the
    closing sentinel (the last impression) copied into every partition."""
    from dataclasses import replace

    from kafka.partitioner.default import murmur2
    from reloop.connectors.kafka.admin import create_topics
    from reloop.connectors.kafka.sink import KafkaSink
    from reloop.engine.events.codec import encode

    suffix = uuid.uuid4().hex[:8]
    imp_topic, clk_topic = f"bench.pimp.{suffix}", f"bench.pclk.{suffix}"
    create_topics(bootstrap, {imp_topic: partitions, clk_topic: partitions})
    sentinel = imps[-1]
    extra = []
    for p in range(partitions):
        key = next(
            f"sentinel-{p}-{i}" for i in range(10_000)
            if (murmur2(f"sentinel-{p}-{i}".encode()) & 0x7FFFFFFF) % partitions == p
        )  # fmt: skip
        extra.append(replace(sentinel, impression_id=key))
    for topic, events in ((imp_topic, [*imps, *extra]), (clk_topic, clicks)):
        sink = KafkaSink(bootstrap=bootstrap, topic=topic)
        for e in events:
            sink.send(encode(e), key=e.impression_id.encode(), timestamp_ms=e.event_time_ms)
        sink.close()
    return imp_topic, clk_topic


def _join_pass(bootstrap: str, topics: tuple[str, str], spec: Any, expected: int, client: str) -> float:
    from reloop.connectors.kafka.admin import create_topics

    samples_topic = f"bench.joined.{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {samples_topic: 1})
    with tempfile.TemporaryDirectory(prefix="reloop-bench-join-") as tmp:
        stage = join_stage_parts(
            bootstrap, topics, f"bench-{uuid.uuid4().hex[:8]}", samples_topic, tmp, spec, client
        )
        return _timed_pass(stage, expected, "the join stage")


def _timed_pass(stage: Any, expected: int, what: str) -> float:
    """Step ``stage`` until it has sent ``expected`` samples (at most 600 s) and close it; samples/s from
    the step that took its tasks to the last sample flushed."""
    t0 = None
    deadline = time.monotonic() + 600
    try:
        while stage.samples_sent < expected and time.monotonic() < deadline:
            stage.step()
            if t0 is None and stage.tasks:
                t0 = time.perf_counter()
    except BaseException:
        stage.abort()
        raise
    stage.samples.flush(30)
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    sent = stage.samples_sent
    stage.close(checkpoint=False)
    if sent < expected:
        raise RuntimeError(f"{what} emitted {sent} of {expected} samples in 600 s")
    return sent / elapsed


class _InterleavedMemorySource(MemoryGroupSource):
    """``MemoryGroupSource`` reading its partitions in turns (a share of each poll each), as a Kafka fetch
    returns both topics' partitions, instead of one partition to its end first."""

    def poll(self, max_records: int, timeout_s: float) -> list[Any]:
        if not self._assigned:
            return super().poll(0, 0)  # the assignment
        share = max(1, max_records // len(self._assigned))
        out: list[Any] = []
        for tp in self._assigned:
            records = self.log.read(tp, self._next[tp], share)
            if records:
                out.extend(records)
                self._next[tp] = records[-1].offset + 1
        return out


def memory_join_rate(imps: list[Any], clicks: list[Any], spec: Any, expected: int) -> float:
    """The join stage's own work, no Kafka client: the same ``JoinStage`` over an in-process log holding
    the same records (decode, limits, spec checks, merge, join, Arrow batches, sends), samples/s as in
    ``_join_pass``. Its rate bounds what any client can give the stage on this machine."""
    from reloop.connectors.memory.memory import MemoryLog
    from reloop.engine.events.codec import encode

    log = MemoryLog()
    topics = ("bench.mimp", "bench.mclk")
    for topic, events in zip(topics, (imps, clicks), strict=True):
        log.create(topic, 1)
        for e in events:
            log.append(topic, encode(e), e.impression_id.encode(), e.event_time_ms)
    log.create("bench.mjoined", 1)
    with tempfile.TemporaryDirectory(prefix="reloop-bench-join-") as tmp:
        stage = join_stage_parts("", topics, "bench", "bench.mjoined", tmp, spec, "memory", memory=log)
        return _timed_pass(stage, expected, "the in-memory join stage")


def consume_rate(bootstrap: str, topics: tuple[str, str], records: int) -> float:
    from reloop.connectors.kafka.source import KafkaSource

    src = KafkaSource(bootstrap=bootstrap, topics=list(topics))
    src.open()
    got = 0
    t0 = time.perf_counter()
    while got < records:
        got += len(src.poll(4096, 0.1))
    elapsed = time.perf_counter() - t0
    src.close()
    return records / elapsed


def whole_loop_rate(
    bootstrap: str,
    topics: tuple[str, str],
    spec: Any,
    target: int,
    batch: int,
    client: str = KP,
    threads: int = 1,
    label: str = "",
) -> float:
    """``reloop run`` with two processes (both on the Kafka ``client``, ``threads`` torch threads in the
    train process) until
    ``target`` samples are trained: samples / (time of the snapshot at target - time both stages had
    started). The train stage's rates while the join stage worked and after (``train_rates``) go to
    ``BUSY[label]``."""
    from reloop.engine.checkpoint.registry import SnapshotRegistry

    with tempfile.TemporaryDirectory(prefix="reloop-bench-run-") as tmp:
        work = Path(tmp)
        tag = uuid.uuid4().hex[:8]
        cfg = {
            "kafka": {"bootstrap": bootstrap, "client": client},
            "source": {"impressions_topic": topics[0], "clicks_topic": topics[1]},
            "consumer": {"group_id": f"bench-train-{tag}"},
            "sink": {"dead_letter_topic": None},
            "stages": {"samples_topic": f"bench.run.{tag}", "join_group_id": f"bench-join-{tag}",
                       "join_checkpoint_every_s": 3600, "processes": 2},
            "join": {"window_ms": 2_000, "allowed_lateness_ms": 0},
            "validation": {"max_future_ms": None},
            "model": {"backbone": "dcn", "strategy": "reloop", "alpha": 0.2, "spec": spec.to_dict(),
                      "optimizer": {"embedding_optimizer": "adam", "wide": "off"}},
            "train": {"batch_size": batch, "threads": threads},
            "period": {"every_samples": target},
            "checkpoint": {"dir": str(work / "snaps"), "keep": 2},
            "log": {"stats_every_s": PROGRESS_EVERY_S},
        }  # fmt: skip
        path = work / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        log = open(work / "run.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "reloop.engine.runtime.cli", "run", "--config", str(path)],
            cwd=REPO, stdout=log, stderr=log, env=env,
        )  # fmt: skip
        reg = SnapshotRegistry(work / "snaps")
        started = None
        deadline = time.monotonic() + 900
        try:
            while time.monotonic() < deadline:
                text = (work / "run.log").read_text(errors="replace")
                if started is None and text.count('"msg":"started","stage"') >= 2:
                    started = time.time()
                if reg.latest_version() is not None:
                    created = reg.manifest(reg.latest_version())["created_unix"]
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"reloop run exited {proc.returncode}: {text[-2000:]}")
                time.sleep(0.05)
            else:
                raise RuntimeError("reloop run did not train the target in 900 s")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            log.close()
        BUSY.setdefault(label, []).append(train_rates((work / "run.log").read_text(errors="replace")))
    return target / (created - (started or created))


# The whole-loop rows' short names (their ``BUSY`` keys and the per-round table's labels).
LOOPS = (
    "whole loop, two processes",
    "whole loop, two processes, confluent-kafka",
    "whole loop, two processes, torch's default threads",
    "whole loop, two processes, confluent-kafka, torch's default threads",
)

# The whole loop's stages log their progress this often (``log.stats_every_s``): ``train_rates`` reads it.
PROGRESS_EVERY_S = 0.5

# Per whole-loop row, per round: ``train_rates`` of its run.
BUSY: dict[str, list[tuple[float | None, float | None]]] = {}


def train_rates(log_text: str) -> tuple[float | None, float | None]:
    """The train stage's samples/s from the two stages' progress lines: (while the join stage works, from
    the train stage's first line with samples trained to its last before the join stage had sent every
    sample; after it, from that line to the last before the period snapshot). Start-up and the snapshot
    are outside both windows. None for a window of fewer than two lines.

    >>> line = '{{"ts":{},"msg":"progress","stage":"{}","{}":{}}}'.format
    >>> train_rates("\\n".join([line(1.0, "join", "samples_sent", 10),
    ...     line(1.5, "train", "samples_trained", 0), line(2.0, "train", "samples_trained", 100),
    ...     line(2.5, "join", "samples_sent", 20),
    ...     line(3.0, "train", "samples_trained", 300), line(3.5, "join", "samples_sent", 30),
    ...     line(4.0, "join", "samples_sent", 30), line(4.5, "train", "samples_trained", 900)]))
    (200.0, 400.0)
    """
    import orjson

    join: list[tuple[float, int]] = []
    train: list[tuple[float, int]] = []
    for text in log_text.splitlines():
        if '"msg":"progress"' not in text:
            continue
        entry = orjson.loads(text)
        if entry.get("stage") == "join":
            join.append((entry["ts"], entry["samples_sent"]))
        elif entry.get("stage") == "train" and entry["samples_trained"] > 0 and entry.get("version") is None:
            train.append((entry["ts"], entry["samples_trained"]))
    if not join or not train:
        return None, None
    total = max(sent for _, sent in join)
    done = min(ts for ts, sent in join if sent == total)
    busy = [(ts, n) for ts, n in train if ts <= done]
    after = busy[-1:] + [(ts, n) for ts, n in train if ts > done]
    return _rate(busy), _rate(after)


def _rate(window: list[tuple[float, int]]) -> float | None:
    if len(window) < 2:
        return None
    (t0, n0), (t1, n1) = window[0], window[-1]
    return (n1 - n0) / (t1 - t0)


@contextlib.contextmanager
def stage_gc() -> Iterator[None]:
    """The garbage collector as every stage process runs it (engine/runtime/gc_tuning.py): the young
    threshold of ``stages.gc_young_threshold`` and what is alive now frozen; Python's again afterwards."""
    from reloop.engine.runtime.config import StagesSection, default_of
    from reloop.engine.runtime.gc_tuning import freeze_live_objects, set_young_threshold

    before = gc.get_threshold()
    set_young_threshold(default_of(StagesSection, "gc_young_threshold"))
    freeze_live_objects()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def _record(
    rows: list[Row],
    lines: list[str],
    figure: str,
    label: str,
    engine: list[float],
    base: list[float],
    ratio: float,
    baseline_name: str,
    target: str = "",
    met: bool | None = None,
    base_note: str = "",
) -> None:
    """One measured row (samples/s, medians of the rounds): into the summary (``rows``) and, per round,
    into the figure's table (``lines``, under ``label``)."""

    def rates(values: list[float]) -> str:
        return ", ".join(f"{x:,.0f}" for x in values)

    rows.append(
        Row(figure=figure, value=float(np.median(engine)), unit="samples/s", baseline_name=baseline_name,
            baseline_value=float(np.median(base)), ratio=ratio, target=target, met=met, command=COMMAND)
    )  # fmt: skip
    lines.append(f"| {label} | {rates(engine)} | {rates(base)}{base_note} | {ratio:.3f} |")


def run(ctx: Context) -> Figure:
    import torch
    from reloop.engine.features.spec import criteo_spec
    from reloop.engine.runtime.config import StagesSection, default_of

    every_core = torch.get_num_threads()  # torch's default: one thread per core
    torch.set_num_threads(1)
    n = ctx.pick(40_960, 8_192)
    rounds = min(ctx.rounds, 3)
    configs = ctx.pick([("dcn", 1024), ("dcn", 4096), ("deepfm", 1024), ("deepfm", 4096)], [("dcn", 1024)])
    spec = criteo_spec()
    imps, clicks = make_events(n)
    labels = click_labels(imps, clicks, n)
    rows: list[Row] = []
    lines = ["| row | engine per round | baseline per round | ratio |", "|---|---|---|---:|"]
    after_first: list[str] = []
    after_join: list[str] = []
    with local_broker() as bootstrap, stage_gc():  # the engine and the baselines alike
        samples_topic = fill_samples_topic(bootstrap, imps[:n], labels)
        for backbone, batch in configs:
            target = (n // batch) * batch
            bare = _bare(backbone, spec, imps[:n], labels, batch)
            eng, ceng, base = alternate_many(
                [
                    lambda b=backbone, bs=batch, t=target: train_stage_rate(
                        bootstrap, samples_topic, b, spec, bs, t
                    ),
                    lambda b=backbone, bs=batch, t=target: train_stage_rate(
                        bootstrap, samples_topic, b, spec, bs, t, client="confluent"
                    ),
                    bare.run,
                ],
                rounds,
            )
            model = "DCN" if backbone == "dcn" else "DeepFM"
            for client, rates, suffix in ((KP, eng, ""), ("confluent", ceng, ", confluent-kafka")):
                name = f"train stage from the samples topic{suffix}, {model}, batch {batch}"
                ratio = median_ratio(rates, base)
                _record(rows, lines, name, name, rates, base, ratio,
                        "bare torch loop, same model, pre-built tensors, 1 thread",
                        ">= 0.9 x bare loop", ratio >= 0.9)  # fmt: skip
                timed = AFTER_FIRST.get((backbone, batch, client), [])[-len(rates) :]
                if len(timed) == len(rates):
                    steady = [rate / b for (rate, _), b in zip(timed, base, strict=True)]
                    after_first.append(
                        f"{name}: {', '.join(f'{rate:,.0f}' for rate, _ in timed)} samples/s after the first "
                        f"trained step (ratio {float(np.median(steady)):.3f}); the first step came "
                        f"{', '.join(f'{t * 1000:.0f}' for _, t in timed)} ms after open"
                    )
        raw = fill_topics(bootstrap, imps, clicks)
        expected = n  # every impression but the sentinel becomes one sample
        records = len(imps) + len(clicks)
        join, consume, memory = alternate_many(
            [
                lambda: join_stage_rate(bootstrap, raw, spec, expected),
                lambda: consume_rate(bootstrap, raw, records),
                lambda: memory_join_rate(imps, clicks, spec, expected),
            ],
            rounds,
        )
        jratio = float(np.median([j / c for j, c in zip(join, consume, strict=True)]))
        mratio = float(np.median([m / j for m, j in zip(memory, join, strict=True)]))
        name = "join stage per process, kafka-python"
        _record(rows, lines, name, name, join, consume, jratio,
                "kafka-python consume of the same records (records/s)",
                ">= 30,000 samples/s", float(np.median(join)) >= 30_000)  # fmt: skip
        _record(rows, lines, "join stage per process, in-memory log (the stage's own work, no Kafka client)",
                "join stage, in-memory log", memory, join, mratio,
                "join stage per process, kafka-python (same rounds)", base_note=", kafka-python")  # fmt: skip
        cjoin, consume2, cratio = alternate(
            lambda: join_stage_rate(bootstrap, raw, spec, expected, client="confluent"),
            lambda: consume_rate(bootstrap, raw, records),
            rounds,
        )
        name = "join stage per process, confluent-kafka"
        _record(rows, lines, name, name, cjoin, consume2, cratio,
                "kafka-python consume of the same records (records/s)",
                ">= 100,000 samples/s", float(np.median(cjoin)) >= 100_000)  # fmt: skip
        batch = 1024
        bare2 = _bare("dcn", spec, imps[:n], labels, batch)
        # The whole loop on four times the events: a run of n would last two seconds, a quarter of them
        # start-up and the period snapshot at its end.
        loop_n = ctx.pick(4 * n, n)
        loop_raw = fill_topics(bootstrap, *make_events(loop_n, seed=1))
        target = (loop_n // batch) * batch

        # The bare loop with one thread too, in the same rounds: the train process has one torch thread,
        # so one thread's bare loop over two threads' bounds what the whole loop can reach on this machine.
        whole, cwhole, dwhole, dcwhole, base2, base1 = alternate_many(
            [
                lambda: whole_loop_rate(bootstrap, loop_raw, spec, target, batch, label=LOOPS[0]),
                lambda: whole_loop_rate(
                    bootstrap, loop_raw, spec, target, batch, client="confluent", label=LOOPS[1]
                ),
                lambda: whole_loop_rate(
                    bootstrap, loop_raw, spec, target, batch, threads=every_core, label=LOOPS[2]
                ),
                lambda: whole_loop_rate(
                    bootstrap,
                    loop_raw,
                    spec,
                    target,
                    batch,
                    client="confluent",
                    threads=every_core,
                    label=LOOPS[3],
                ),
                lambda: bare_at(bare2, 2),
                lambda: bare_at(bare2, 1),
            ],
            rounds,
        )
        wratio = median_ratio(whole, base2)
        cwratio = median_ratio(cwhole, base2)
        ceiling = median_ratio(base1, base2)
        _record(rows, lines, "whole loop, two processes (join + train, 1 torch thread each), DCN, batch 1024",
                "whole loop, two processes", whole, base2, wratio,
                "bare torch loop, same model, pre-built tensors, 2 threads",
                ">= 0.6 x bare loop (2 threads)", wratio >= 0.6)  # fmt: skip
        # The same with both processes on librdkafka: how much of the gap is kafka-python's consume.
        _record(rows, lines,
                "whole loop, two processes, confluent-kafka (join + train, 1 torch thread each), DCN 1024",
                "whole loop, two processes, confluent-kafka", cwhole, base2, cwratio,
                "bare torch loop, same model, pre-built tensors, 2 threads (same rounds)",
                ">= 0.6 x bare loop (2 threads)", cwratio >= 0.6)  # fmt: skip
        # The train process at torch's default threads (one per core), sharing every core with the join
        # process: what ``reloop run`` did before it left a core to the join process.
        for client_rates, label in ((dwhole, LOOPS[2]), (dcwhole, LOOPS[3])):
            ratio = median_ratio(client_rates, base2)
            _record(rows, lines,
                    f"{label} ({every_core} here: one per core), DCN 1024",
                    label, client_rates, base2, ratio,
                    "bare torch loop, same model, pre-built tensors, 2 threads (same rounds)",
                    ">= 0.6 x bare loop (2 threads)", ratio >= 0.6)  # fmt: skip
        _record(rows, lines,
                "whole loop's ceiling: bare torch loop, 1 thread (the train process's), DCN 1024",
                "whole loop's ceiling: bare, 1 thread", base1, base2, ceiling,
                "bare torch loop, same model, pre-built tensors, 2 threads (same rounds)",
                base_note=" (2)")  # fmt: skip
        # The same runs while both stages worked (start-up and the snapshot at the end left out).
        for label in LOOPS:
            runs = BUSY.get(label, [])[-rounds:]
            busy = [b for b, _ in runs if b is not None]
            if len(runs) == rounds and len(busy) == rounds:
                _record(rows, lines, f"{label}, while the join stage works (start-up and snapshot left out)",
                        f"{label}, while the join stage works", busy, base2, median_ratio(busy, base2),
                        "bare torch loop, same model, pre-built tensors, 2 threads "
                        "(same rounds)")  # fmt: skip
            after = [a for _, a in runs if a is not None]
            if len(runs) == rounds and len(after) == rounds:
                after_join.append(
                    f"{label}: {', '.join(f'{rate:,.0f}' for rate in after)} samples/s once the join stage "
                    f"had sent every sample (ratio {median_ratio(after, base2):.3f})"
                )
    load = os.getloadavg()
    notes = "\n".join(
        [
            f"{n:,} Criteo-shaped impressions ({len(clicks):,} clicks) on the local broker ({loop_n:,} for "
            f"the whole-loop rows); {rounds} rounds "
            f"alternating engine and baseline; load average at the end {load[0]:.1f} / {load[1]:.1f} "
            f"(1/5 min) "
            f"on {os.cpu_count()} cores, shared with the broker (and with other work on this machine: "
            f"compare the ratios, not the absolute rates). Learner: SparseAdam + fused Adam, no wide part, "
            f"in the engine and the bare loop alike. Garbage collector in this process (engine and "
            f"baselines) as in every stage process (engine/runtime/gc_tuning.py): young-generation "
            f"threshold {default_of(StagesSection, 'gc_young_threshold'):,}, start-up objects frozen. "
            f"Join passes whose consumer stalled (nothing fetched "
            f"for 30 s with records waiting; rebuilt and the pass run again): {STALLS or 'none'}.",
            "",
            *lines,
            "",
            "The train-stage rows time a run from `open()` to the last sample: the consumer's first fetch "
            f"and the first message's decoding count against a run of {n:,} samples, a second or two. The "
            "same runs timed from the end of their first trained step (start-up excluded, as the "
            "baseline's data preparation is):",
            "",
            *[f"- {line}" for line in after_first],
            "",
            "The whole-loop rows time a run from both stages started to the period snapshot at the "
            f"target. Their join stage sends the {loop_n:,} samples faster than the train stage trains "
            'them, and works through its backlog on the cores the train stage needs: the rows "while the '
            "join stage works\" are the train stage's rate then, from the stages' progress lines (every "
            f"{PROGRESS_EVERY_S} s), a bound from below for a join stage that only keeps up with its input. "
            "The same runs' train stage after the join stage had sent every sample (the broker still "
            "serving it; a bound from above):",
            "",
            *[f"- {line}" for line in after_join],
        ]
    )
    return Figure(key="stages", title=TITLE, rows=rows, notes=notes)
