"""The processor's configuration: one YAML (or TOML) file plus environment overrides, validated once.

Environment overrides (pydantic-settings, engine/config_common.py) use ``RELOOP__SECTION__KEY=value``
(double underscores separate levels, names are case-insensitive), e.g. ``RELOOP__TRAIN__BATCH_SIZE=512``
or ``RELOOP__KAFKA__SASL_PASSWORD=...``; they win over the file. A typed key's value is converted by
pydantic (``512`` an int, ``true`` a bool), a list or dict is JSON (``[1, 2]``), ``null`` is None. A bad
key or value fails at load time with an error that names it (``train.batch_size: Input should be greater
than 0``); a key that moved (``source.bootstrap``) fails naming its new place (``kafka.bootstrap``).

Kafka: ``kafka`` is the connection of every consumer and producer (client, bootstrap, security, settings
common to all), ``consumer`` and ``producer`` the settings of one kind only; ``source`` names the topics
read, ``sink`` the topics written.

>>> cfg = load_config_dict({"model": {"backbone": "dcn", "spec": {"fields": [
...     {"kind": "categorical", "name": "user", "buckets": 100}]}}}, env={"RELOOP__TRAIN__BATCH_SIZE": "512"})
>>> cfg.train.batch_size, cfg.join.window_ms
(512, 900000)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python
from reloop.engine.config_common import (
    ENV_PREFIX,
    REDACTED,
    SERVE_ONLY_SECTIONS,
    ConfigError,
    ConsumerSection,
    KafkaSection,
    ProducerSection,
    TopicName,
    UniqueKeyLoader,
    UserPath,
    _Section,
    check_moved,
    deep_merge,
    describe_errors,
    env_origin,
    env_values,
    path_problem,
    read_document,
    redact,
    yaml_error_text,
)
from reloop.engine.features.counters import CounterSettings
from reloop.engine.join.joiner import JoinerConfig
from reloop.engine.runtime.config_pipe import config_base_dir

__all__ = ["ENV_PREFIX", "REDACTED", "ConfigError", "RunConfig", "load_config", "load_config_dict", "redact"]


class SourceSection(_Section):
    """The topics the processor reads (their client settings: kafka, consumer)."""

    kind: Literal["kafka"] = Field(default="kafka", description="where the events come from")
    impressions_topic: TopicName = Field(
        default="impressions",
        description="the impressions (docs/event-contract.md): what was served, with its prediction",
    )
    clicks_topic: TopicName = Field(default="clicks", description="the clicks, keyed by their impression id")


class SinkSection(_Section):
    """The topics the processor writes (their client settings: kafka, producer)."""

    samples_topic: str | None = Field(
        default=None, description="refused: the samples topic is stages.samples_topic (this key moved there)"
    )
    dead_letter_topic: TopicName | None = Field(
        default="reloop.deadletter",
        description="refused records, with the reason (reloop deadletters reads them back); null: counted "
        "and logged once per reason, not kept",
    )

    @field_validator("samples_topic")
    @classmethod
    def _samples_go_to_stages(cls, value: str | None) -> str | None:
        # Read by nothing since the two stages: a topic named here was silently not the one written
        # (the example config named "samples"; the join stage wrote stages.samples_topic).
        if value is not None:
            raise ValueError(
                "is not used: the join stage writes its samples to stages.samples_topic "
                "(default reloop.samples); set the topic there and remove this key"
            )
        return value


# Keys that moved, refused with their new place (docs/operations.md "Config keys that moved").
MOVED = {
    ("source", "client"): "kafka.client",
    ("source", "bootstrap"): "kafka.bootstrap",
    ("source", "client_config"): "kafka.client_config (every client; security settings as "
    "kafka.security_protocol, kafka.sasl_*, kafka.ssl_*) or consumer.client_config (consumer-only settings)",
    ("source", "group_id"): "consumer.group_id",
    ("source", "poll_max_records"): "consumer.poll_max_records",
    ("source", "poll_timeout_s"): "consumer.poll_timeout_s",
    ("source", "merge_idle_ms"): "consumer.merge_idle_ms",
    ("sink", "client_config"): "producer.client_config",
}


class JoinSection(_Section):
    window_ms: int = Field(
        default=15 * 60_000,
        gt=0,
        description="attribution window: an impression with a click within this is a positive, a negative "
        "once it closes",
    )
    allowed_lateness_ms: int = Field(
        default=5_000,
        ge=0,
        description="the watermark trails the newest event time by this: events this much out of order "
        "still join",
    )
    idle_timeout_ms: int = Field(
        default=10_000,
        ge=0,
        description="with no input for this long the watermark goes on with the wall clock, so windows "
        "still close on a quiet stream (the join stage looks at its join checkpoints: up to one checkpoint "
        "interval later, docs/data-plane.md)",
    )
    click_grace_ms: int = Field(
        default=60_000,
        ge=0,
        description="a click may wait this long (event time) for its impression; one stamped more than this"
        " before its impression is dropped as too late",
    )
    retention_ms: int = Field(
        default=60 * 60_000,
        ge=0,
        description="closed windows are remembered this long (event time): duplicates are dropped, late "
        "clicks follow late_click_policy",
    )
    late_click_policy: Literal["drop", "correct"] = Field(
        default="correct",
        description="a click after its impression's window closed: correct (a positive that corrects the "
        "negative) or drop (counted)",
    )
    emit_policy: Literal["window", "fnw"] = Field(
        default="window",
        description="window: negatives when the window closes | fnw: every impression at once as a negative, "
        "each click as one more positive (train with train.delayed_feedback: fnw; engine/join/joiner.py)",
    )
    max_pending: int = Field(
        default=2_000_000,
        gt=0,
        description="impressions waiting for their window, per join task; past it the oldest is dropped "
        "(counted, alerted)",
    )
    max_closed: int = Field(
        default=2_000_000,
        gt=0,
        description="closed windows remembered, per join task; past it the oldest is forgotten (counted)",
    )
    max_early_clicks: int = Field(
        default=200_000,
        gt=0,
        description="clicks waiting for their impression, per join task; past it the oldest is dropped "
        "(counted, alerted)",
    )
    ttl_ms: int = Field(
        default=6 * 60 * 60_000,
        gt=0,
        description="a pending impression that arrived this long ago (wall clock) is dropped (counted, "
        "alerted)",
    )
    bucket_ms: int = Field(
        default=1_000,
        gt=0,
        description="the time index's step: windows close and retention ends a bucket at a time",
    )

    def joiner_config(self) -> JoinerConfig:
        return JoinerConfig(**self.model_dump())


class ModelSection(_Section):
    backbone: str = Field(
        description="lr, ftrl, fm, nfm, pnn, dcn, wide_deep, deepfm, xdeepfm, fmfm, afn, the river learners"
        " or a plugin's (reloop models)"
    )
    strategy: Literal["ce", "kd", "reloop"] = Field(
        default="reloop",
        description="the loss: ce (cross-entropy), kd (distillation from y_last) or reloop (self-correction"
        " against y_last)",
    )
    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="weight of the kd or self-correction term: alpha * L_sc + (1 - alpha) * L_ce",
    )
    # torch's range: a seed past it failed as "backbone cannot be built: Overflow when unpacking long long"
    seed: int = Field(
        default=0,
        ge=-(2**63),
        le=2**64 - 1,
        description="the model's initial weights (and the order of a deterministic run)",
    )
    spec: dict[str, Any] | None = Field(default=None, description="FeatureSpec as data")
    spec_file: UserPath | None = Field(default=None, description="or a JSON/YAML file holding it")
    optimizer: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict, description="backbone settings (hidden_units ...)")
    counters: CounterSettings | None = Field(
        default=None,
        description="click counters as inputs: their dense fields are appended to the spec, and the values "
        "come with each impression as its arm served them (serve's arms[].counters, same settings)",
    )

    @model_validator(mode="after")
    def _one_spec(self) -> ModelSection:
        if (self.spec is None) == (self.spec_file is None):
            raise ValueError("give exactly one of spec and spec_file")
        return self


class TrainSection(_Section):
    batch_size: int = Field(
        default=512,
        gt=0,
        description="samples per predict-then-learn step; 512 served better than 1024 on both backtests' "
        "selection periods (docs/operations.md), at 0.78-0.90x the samples/s of 1024",
    )
    y_last: Literal["logged", "snapshot"] = Field(
        default="logged",
        description="the previous model's prediction: logged (served with the impression) or snapshot "
        "(recomputed with the previous version)",
    )
    version_mismatch: Literal["use_logged", "recompute", "skip_sc"] = Field(
        default="use_logged",
        description="y_last logged by a version other than the previous one: use_logged, recompute, or "
        "skip_sc (plain CE for that sample)",
    )
    deterministic: bool = Field(
        default=False,
        description="batches and periods a function of the input alone (one thread): a resumed run trains "
        "bit for bit as one that never stopped",
    )
    threads: int | None = Field(
        default=None,
        gt=0,
        description="torch's threads; unset: torch's default (one per core) capped by the cgroup's CPU "
        "quota, less one in reloop run's train process, whose join process needs a core (docs/data-plane.md)",
    )
    progressive_window: int = Field(
        default=100_000,
        gt=0,
        description="samples in the trainer's own rolling metrics (each scored before it is learnt)",
    )
    delayed_feedback: Literal["none", "fnw"] = Field(
        default="none", description="fnw: fake-negative importance weights (engine/loss/delayed.py)"
    )
    replay_size: int = Field(default=0, ge=0, description="replay buffer of the latest samples (0: off)")
    replay_ratio: float = Field(default=1.0, ge=0, description="replayed samples per new sample")
    replay_batch_size: int | None = Field(default=None, gt=0, description="default: train.batch_size")
    max_wait_ms: int | None = Field(
        default=None,
        ge=0,
        description="the train stage steps on a partial batch once its oldest sample waited this long (wall "
        "clock), so each version learns what arrived up to about this delay before it (liveness: on a slow "
        "stream such steps served worse from 1-minute to 1-hour periods, docs/operations.md); not with "
        "deterministic: true, whose batches are a function of the topic; null (the default): full batches",
    )
    max_consecutive_skipped: int = Field(
        default=100,
        ge=0,
        description="training steps in a row that learnt nothing (a gradient not finite, every row left "
        "out) before the stage stops with TrainingDiverged (exit 2) instead of dead-lettering the stream; "
        "0: never",
    )


class PeriodSection(_Section):
    """Exactly one trigger: every N trained samples, every N ms of event time, or every N wall seconds."""

    every_samples: int | None = Field(
        default=None, gt=0, description="a new model version every this many trained samples"
    )
    every_event_ms: int | None = Field(
        default=None, gt=0, description="a new model version every this much event time"
    )
    every_wall_s: float | None = Field(
        default=None, gt=0, description="a new model version every this many seconds of wall clock"
    )

    @model_validator(mode="after")
    def _one_trigger(self) -> PeriodSection:
        names = ("every_samples", "every_event_ms", "every_wall_s")
        given = [n for n in names if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of every_samples, every_event_ms, every_wall_s (got {given})")
        return self


class CheckpointSection(_Section):
    dir: UserPath = Field(
        default="runs/snapshots",
        description="the snapshot registry (model versions, the serving bundles reloop serve reads) and the"
        " stages' checkpoints",
    )
    keep: int = Field(default=5, ge=1, description="model versions kept; older ones are removed")
    ledger: UserPath | None = Field(
        default=None, description="append-only list of trained sample ids (tests)"
    )
    background_writes: bool = Field(
        default=True,
        description="the train stage writes period snapshots on a writer thread while it trains on "
        "(serialised first; offsets committed once durable); false: training waits for each write",
    )
    allow_fingerprint_change: bool = Field(
        default=False,
        description="resume from snapshots made under other model/train/join settings (a warning is "
        "logged) instead of refusing to start; for a deliberate change, such as pinning a learning rate",
    )

    @field_validator("dir")
    @classmethod
    def _dir_is_a_folder(cls, value: str) -> str:
        problem = path_problem(value, folder=True)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("ledger")
    @classmethod
    def _ledger_is_a_file(cls, value: str | None) -> str | None:
        problem = None if value is None else path_problem(value, folder=False)
        if problem is not None:
            raise ValueError(problem)
        return value


class MetricsSection(_Section):
    window_size: int = Field(
        default=100_000,
        gt=0,
        description="labelled samples in each rolling window (AUC, LogLoss, calibration) per arm and version",
    )
    max_arms: int = Field(
        default=64, gt=0, description="arms with rolling metrics (the first seen); the rest are counted only"
    )
    prometheus_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="/metrics of the train process (null: none; 0: a free port, which the log line "
        '"metrics" names in its url, as for every port derived from it)',
    )
    prometheus_host: str = Field(
        default="127.0.0.1", description="the address /metrics binds (loopback by default)"
    )
    join_prometheus_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="/metrics of the join process (reloop join; in reloop run, null: prometheus_port + 1, "
        "a free port when that is 0, none when it is null)",
    )

    @model_validator(mode="after")
    def _join_port_fits(self) -> MetricsSection:
        if self.join_prometheus_port is None and self.prometheus_port == 65535:
            raise ValueError(
                "prometheus_port 65535 leaves no port for the join process (it takes prometheus_port + 1): "
                "set join_prometheus_port"
            )
        return self


class ValidationSection(_Section):
    """Record-level bounds. A record beyond them goes to the dead-letter topic with its reason (the run
    goes on); they also bound the work one record can cause (hashing is per character)."""

    max_event_bytes: int = Field(
        default=512 * 1024,
        gt=0,
        le=900 * 1024,
        description="largest impression/click record; under Kafka's 1 MiB so its sample can be forwarded",
    )
    max_feature_chars: int = Field(default=4096, gt=0, description="longest string feature value")
    max_feature_list: int = Field(default=1024, gt=0, description="most items in a multi-valued feature")
    max_future_ms: int | None = Field(
        default=300_000,
        ge=0,
        description="event times further ahead of the clock or of the record's own timestamp are refused "
        "(null: no bound; a join task's clock: docs/operations.md, 'Which clock'); one event from the far "
        "future would otherwise move the watermark and drop everything after it",
    )
    max_past_ms: int | None = Field(
        default=None, ge=0, description="event times further behind the clock are refused (null: no bound)"
    )


class RecoverySection(_Section):
    """What happens on a failure that is not about one record (broker or sink down, a bug)."""

    backoff_initial_s: float = Field(
        default=1.0,
        gt=0,
        description="wait before rebuilding a failed stage; doubles at each failure in a row",
    )
    backoff_max_s: float = Field(default=30.0, gt=0, description="the longest wait between rebuilds")
    give_up_after_s: float = Field(
        default=900.0,
        gt=0,
        description="exit non-zero when failures went on this long without a snapshot being written",
    )
    flush_timeout_s: float = Field(default=10.0, gt=0, description="longest wait for the sinks at a snapshot")
    stop_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="after SIGTERM/SIGINT, exit at the latest this much later (without the final "
        "checkpoint if it could not be written by then; the last snapshot stays the restart point)",
    )

    @model_validator(mode="after")
    def _stop_after_flush(self) -> RecoverySection:
        if self.stop_timeout_s <= self.flush_timeout_s:
            raise ValueError("stop_timeout_s must exceed flush_timeout_s (the final checkpoint flushes)")
        if self.backoff_initial_s > self.backoff_max_s:  # the first wait would be over the longest
            raise ValueError("backoff_initial_s must not exceed backoff_max_s")
        return self


class StagesSection(_Section):
    """The two-stage data plane (engine/runtime/join_stage.py, train_stage.py) over the samples topic."""

    samples_topic: TopicName = Field(
        default="reloop.samples",
        description="the joined samples, from the join stage to the train stage: one per pipeline",
    )
    join_group_id: str = Field(default="reloop-join", description="the consumer group of the join processes")
    batch_samples: int = Field(default=1024, gt=0, description="samples per message on the samples topic")
    max_delay_ms: int = Field(default=200, ge=0, description="a partial message waits at most this long")
    join_checkpoint_every_s: float = Field(default=5.0, gt=0, description="join task checkpoints, idle work")
    join_checkpoint_max_share: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="the most of a join process's time its checkpoints may take: the interval grows past "
        "join_checkpoint_every_s to the last checkpoint's duration / this share when the join state is large",
    )
    train_poll_messages: int = Field(default=64, gt=0, description="samples messages per train-stage poll")
    stall_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="a join consumer that fetches nothing this long after its tasks were assigned, with "
        "records waiting, is rebuilt (from the task checkpoints); one out of its group this long, and at "
        "least its session timeout plus heartbeat interval (a healthy join's longest wait), too",
    )
    processes: int = Field(  # not Literal[1, 2]: pydantic refuses "1" from RELOOP__STAGES__PROCESSES there
        default=2,
        ge=1,
        le=2,
        description="reloop run: 2 = join and train in their own processes, 1 = both in one",
    )
    join_client_config: dict[str, Any] = Field(
        default_factory=dict, description="consumer settings for the join group (session_timeout_ms ...)"
    )
    gc_young_threshold: int | None = Field(
        default=10_000,
        gt=0,
        description="every stage process (join, train, run, replay): allocations between young garbage "
        "collections (Python's default 700 cost the join stage a third of its time); null: Python's",
    )


class DistributedSection(_Section):
    """Data-parallel train ranks: ``reloop train --world-size M`` (or torchrun in a cluster). Not part of
    the fingerprint: a snapshot resumes under another number of ranks (a rescale)."""

    timeout_s: float = Field(default=60.0, gt=0, description="a collective waits this long for a peer")
    embedding_sync: Literal["sparse", "dense"] = Field(
        default="sparse", description="sparse: all-gather the touched rows; dense: all-reduce whole tables"
    )
    batch_per_rank: int | None = Field(
        default=None, gt=0, description="samples per rank per step (default: train.batch_size // ranks)"
    )
    max_wait_ms: int = Field(
        default=200, ge=0, description="a step with partial batches once samples waited this long"
    )
    max_restarts: int = Field(default=3, ge=0, description="torchrun restarts of the whole group")


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LOG_LEVELS = get_args(LogLevel)  # also the choices of the commands' --log-level


class LogSection(_Section):
    level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR (any case)")
    stats_every_s: float = Field(default=10.0, gt=0, description="a progress line every this many seconds")

    @field_validator("level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        # As the variable names are (and logging's own names): RELOOP__LOG__LEVEL=debug was refused.
        return value.upper() if isinstance(value, str) else value


def _reserved(client: str) -> tuple[dict[str, str], dict[str, str]]:
    """(consumer, producer) settings the connectors set themselves and refuse in a client_config, each with
    what to give instead: refused at load, where a connector refusing them was retried as a failure for
    recovery.give_up_after_s. The lists are the connectors' own (connectors/*/settings.py)."""
    if client == "confluent":
        from reloop.connectors.confluent.settings import CONSUMER_RESERVED, PRODUCER_RESERVED
    else:
        from reloop.connectors.kafka.settings import CONSUMER_RESERVED, PRODUCER_RESERVED
    # The connectors' reasons speak of their constructors' arguments; these two come from config keys.
    instead = {
        "bootstrap": "give it as kafka.bootstrap",
        "group": "give it as consumer.group_id (stages.join_group_id for the join group)",
    }

    def hinted(reserved: dict[str, str]) -> dict[str, str]:
        return {k: instead.get(re.split(r"[._]", k)[0], why) for k, why in reserved.items()}

    return hinted(CONSUMER_RESERVED), hinted(PRODUCER_RESERVED)


def _client_settings_problems(cfg: RunConfig) -> list[tuple[tuple[str, ...], str]]:
    """(key, what is wrong) for what no consumer or producer of the run would take: the settings reloop
    sets itself and, with kafka-python, names its consumers or producers do not know (a client refused
    them only after the others had connected, naming no config key)."""
    client = cfg.kafka.client
    consumer_side = {
        ("kafka", "client_config"): cfg.kafka.client_config,
        ("consumer", "client_config"): cfg.consumer.client_config,
        ("stages", "join_client_config"): cfg.stages.join_client_config,
    }
    producer_side = {
        ("kafka", "client_config"): cfg.kafka.client_config,
        ("producer", "client_config"): cfg.producer.client_config,
    }
    consumer_own, producer_own = _reserved(client)
    own = {**consumer_own, **producer_own}
    problems = []
    for sides, ours in ((consumer_side, consumer_own), (producer_side, producer_own)):
        for where, settings in sides.items():
            problems += [((*where, key), ours[key]) for key in settings if key in ours]
    if client == "kafka-python":
        from reloop.connectors.kafka.settings import consumer_settings, producer_settings

        consumer, producer = consumer_settings(), producer_settings()
        for where, settings in consumer_side.items():
            unknown = sorted(k for k in settings if k not in consumer and k not in own)
            if unknown and where == ("kafka", "client_config"):  # the section refused consumer-only ones
                why = "every consumer and producer gets them: put them in producer.client_config"
                problems.append((where, f"{unknown} are not consumer settings ({why})"))
            elif unknown:
                problems.append((where, f"{unknown} are not kafka-python consumer settings"))
        where = ("producer", "client_config")
        unknown = sorted(k for k in cfg.producer.client_config if k not in producer and k not in own)
        if unknown:
            problems.append((where, f"{unknown} are not kafka-python producer settings"))
    return list(dict.fromkeys(problems))


class RunConfig(_Section):
    kafka: KafkaSection = KafkaSection()
    consumer: ConsumerSection = ConsumerSection()
    producer: ProducerSection = ProducerSection()
    source: SourceSection = SourceSection()
    sink: SinkSection = SinkSection()
    join: JoinSection = JoinSection()
    model: ModelSection
    train: TrainSection = TrainSection()
    period: PeriodSection = PeriodSection(every_samples=100_000)
    checkpoint: CheckpointSection = CheckpointSection()
    metrics: MetricsSection = MetricsSection()
    validation: ValidationSection = ValidationSection()
    recovery: RecoverySection = RecoverySection()
    stages: StagesSection = StagesSection()
    distributed: DistributedSection = DistributedSection()
    log: LogSection = LogSection()

    @model_validator(mode="after")
    def _one_role_per_topic(self) -> RunConfig:
        # The join stage told the kinds apart by topic (the same topic for both made every click a dead
        # letter) and read what it wrote where its output was one of its inputs.
        roles = {
            "source.impressions_topic": self.source.impressions_topic,
            "source.clicks_topic": self.source.clicks_topic,
            "stages.samples_topic": self.stages.samples_topic,
            "sink.dead_letter_topic": self.sink.dead_letter_topic,
        }
        seen: dict[str, str] = {}
        for key, topic in roles.items():
            if topic is not None and topic in seen:
                raise ValueError(f"{key} is {seen[topic]} too ({topic!r}): each of these needs its own topic")
            if topic is not None:
                seen[topic] = key
        return self

    @model_validator(mode="after")
    def _delayed_feedback_pairs(self) -> RunConfig:
        # FNW's weights are right only for FNW's stream, and that stream is wrong without them.
        if (self.train.delayed_feedback == "fnw") != (self.join.emit_policy == "fnw"):
            raise ValueError("join.emit_policy fnw needs train.delayed_feedback fnw, and the reverse")
        return self

    def consumer_client_config(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What every consumer gets: the connection (secrets included), consumer.client_config, ``extra``."""
        return {**self.kafka.connection(), **self.consumer.client_config, **(extra or {})}

    def producer_client_config(self) -> dict[str, Any]:
        """What every producer gets: the connection (secrets included), producer.client_config."""
        return {**self.kafka.connection(), **self.producer.client_config}

    def fingerprint(self) -> str:
        """sha256 of what decides the training result (model, train, join); stored in every snapshot."""
        data = _without_new_defaults({k: self.model_dump(mode="json")[k] for k in ("model", "train", "join")})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def join_fingerprint(self) -> str:
        """sha256 of what decides the join's output (join settings and record limits): in join checkpoints."""
        data = _without_new_defaults(self.join_fingerprinted())
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def join_fingerprinted(self) -> dict[str, Any]:
        """The sections ``join_fingerprint`` covers, as JSON data: join checkpoints record them, so that a
        refused change can be named (``restore.config_changes``)."""
        return {k: self.model_dump(mode="json")[k] for k in ("join", "validation")}

    def redacted_dump(self) -> dict[str, Any]:
        """The config as JSON data with every secret-looking client setting replaced: what may be
        written to files (snapshot manifests are read by serving and by people)."""
        data = self.model_dump(mode="json")  # SecretStr fields: "**********"
        for section in ("kafka", "consumer", "producer"):
            data[section]["client_config"] = redact(data[section]["client_config"])
        data["stages"]["join_client_config"] = redact(data["stages"]["join_client_config"])
        return data


def default_of(section: type[_Section], key: str) -> Any:
    """The default of ``section.key``: what the engine's settings dataclasses take as theirs, so a default
    is written once (here, in the section models)."""
    return section.model_fields[key].get_default(call_default_factory=True)


# Keys added after snapshots were written, at their defaults: left out of the fingerprints, so a config
# that does not use them keeps the fingerprint its existing checkpoints carry.
_NEW_DEFAULTS = {
    ("join", "emit_policy"): "window",
    ("train", "delayed_feedback"): "none",
    ("train", "replay_size"): 0,
    ("train", "replay_ratio"): 1.0,
    ("train", "replay_batch_size"): None,
    ("model", "counters"): None,
}


# Keys that change when a step happens, not what a step does: never in the fingerprints.
_RUNTIME_ONLY = (("train", "max_wait_ms"), ("train", "max_consecutive_skipped"))
RUNTIME_ONLY_KEYS = tuple(".".join(key) for key in _RUNTIME_ONLY)


def fingerprinted_defaults(backbone: str | None = None, *, learner: bool = True) -> dict[str, Any]:
    """The defaults of the fingerprinted sections' settings, nested, as JSON data: a setting this run
    has and a restore point's recorded config lacks (added to reloop since) at its default does what
    the point's run did (``restore.config_changes``). Required settings have none. ``model.optimizer``
    and ``model.params`` (``backbone``'s) are mappings in the config: their defaults are the learner's
    (imported here, when a train stage restores: the config module stays free of torch; ``learner``
    False leaves them out, for the join stage, which imports no torch)."""
    sections = (("model", ModelSection), ("train", TrainSection), ("join", JoinSection))
    out = {name: _defaults(cls) for name, cls in (*sections, ("validation", ValidationSection))}
    if not learner:
        return out
    from reloop.engine.models.config import OptimizerConfig
    from reloop.engine.models.registry import backbone_entry

    out["model"]["optimizer"] = OptimizerConfig().model_dump(mode="json")
    if backbone is not None:
        with contextlib.suppress(ValueError, TypeError):  # unknown, or a config with required settings
            out["model"]["params"] = backbone_entry(backbone).config_cls().model_dump(mode="json")
    return out


def _defaults(cls: type[_Section]) -> dict[str, Any]:
    return {
        name: to_jsonable_python(field.get_default(call_default_factory=True))
        for name, field in cls.model_fields.items()
        if not field.is_required()
    }


def _without_new_defaults(data: dict[str, Any]) -> dict[str, Any]:
    for (section, key), default in _NEW_DEFAULTS.items():
        if section in data and data[section].get(key) == default:
            del data[section][key]
    for section, key in _RUNTIME_ONLY:
        data.get(section, {}).pop(key, None)
    return data


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> RunConfig:
    """Read ``path`` (.yaml/.yml/.toml), apply ``RELOOP__`` overrides from ``env`` (default os.environ)."""
    p = Path(path)
    data = read_document(p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p}: the top level must be a mapping")
    return load_config_dict(data, env=env, base_dir=config_base_dir(p))


def load_config_dict(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> RunConfig:
    """``data`` with the ``RELOOP__`` variables of ``env`` (default os.environ) over it, validated."""
    env = os.environ if env is None else env
    overrides = env_values(RunConfig, env, others=SERVE_ONLY_SECTIONS)
    merged = deep_merge(data, overrides)
    check_moved(merged, MOVED)
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, overrides, env)) from None
    problems = _client_settings_problems(cfg)
    if problems:
        lines = [f"{'.'.join(loc)}: {msg}{env_origin(loc, overrides, env)}" for loc, msg in problems]
        raise ConfigError("invalid config: " + "; ".join(lines))
    if cfg.model.spec_file and base_dir is not None and not Path(cfg.model.spec_file).is_absolute():
        model = cfg.model.model_copy(update={"spec_file": str(base_dir / cfg.model.spec_file)})
        cfg = cfg.model_copy(update={"model": model})
    return cfg


def _describe(
    exc: ValidationError, overrides: Mapping[str, Any] | None = None, names: Iterable[str] = ()
) -> str:
    return "invalid config: " + describe_errors(exc, overrides, names, RunConfig)


def read_spec_file(path: str | Path, what: str) -> dict[str, Any]:
    """A FeatureSpec's data from a JSON or YAML file; a ConfigError starting with ``what`` (the key that
    named the file) when it cannot be read or is not a mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: cannot read {path} ({exc})") from None
    try:  # the run config's own YAML loader: a key given twice in one mapping is refused
        json_file = str(path).endswith(".json")
        data = json.loads(text) if json_file else yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except (ValueError, yaml.YAMLError, RecursionError) as exc:
        why = yaml_error_text(exc) if isinstance(exc, yaml.YAMLError) else " ".join(str(exc).split())
        raise ConfigError(f"{what}: {path} does not parse ({why:.300})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} holds {type(data).__name__}, not a mapping with a fields list")
    return data


def load_feature_spec(section: ModelSection) -> Any:
    """The FeatureSpec of the model section (inline or from ``spec_file``)."""
    from reloop.engine.features.spec import FeatureSpec

    data = section.spec
    if data is None:
        assert section.spec_file is not None
        data = read_spec_file(section.spec_file, "invalid config: model.spec_file")
    try:
        spec = FeatureSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            "invalid config: " + describe_errors(exc, model=FeatureSpec, prefix="model.spec.")
        ) from None
    if section.counters is None:
        return spec
    from reloop.engine.features.counters import CounterError, with_counter_fields

    try:
        return with_counter_fields(spec, section.counters)
    except CounterError as exc:
        raise ConfigError(f"invalid config: model.counters: {exc}") from None
