"""Configuration of the scoring service: frozen pydantic models, loaded in one place.

One YAML file may hold several sections (the demo's does); the service reads ``serve``, ``arms`` and
``kafka`` (the same Kafka connection model as ``reloop run``'s: engine/config_common.py; ``kafka.client``
is the client of the impression log and the memory feed, confluent unless the file says otherwise).

Environment overrides: the processor's scheme (pydantic-settings), ``RELOOP__<SECTION>__<KEY>`` over the
file, e.g. ``RELOOP__KAFKA__BOOTSTRAP=kafka:9092``, ``RELOOP__SERVE__PORT=8080``,
``RELOOP__SERVE__AUTH_TOKEN=...`` (a secret, never printed). The former names ``RELOOP_KAFKA_BOOTSTRAP``
and ``RELOOP_SERVE_TOKEN`` are refused at load with the new one's name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from reloop.engine.config_common import (
    MASKED,
    SECRET_MASK,
    ConfigError,
    KafkaSection,
    TopicName,
    UserFilePath,
    UserPath,
    check_moved,
    deep_merge,
    env_origin,
    env_values,
    error_text,
    read_document,
    reportable_errors,
)
from reloop.engine.events.schema import MAX_ARM_CHARS
from reloop.engine.features.counters import CounterSettings
from reloop.engine.serve.arms import ArmRouter


class _Frozen(BaseModel):
    # str_min_length: an empty value (RELOOP__SERVE__HOST= from an unset variable) is refused, not taken
    # (an empty serve.host bound every interface).
    model_config = ConfigDict(frozen=True, extra="forbid", str_min_length=1)


class ColdStart(_Frozen):
    """An untrained model served as version 0 while the arm's registry is still empty. Without it the
    loop could never start: no snapshot without samples, no samples without served impressions.
    Built with the same seed as the trainer's initial model, so both agree on what v0 predicted."""

    backbone: str = Field(description="the trainer's model.backbone")
    spec: dict[str, Any] | None = Field(default=None, description="FeatureSpec as data")
    spec_file: UserPath | None = Field(
        default=None,
        description="or a JSON/YAML file holding it, relative to the config file's folder: the trainer's "
        "model.spec_file, so the two cannot drift apart",
    )
    seed: int = Field(default=0, description="the trainer's model.seed: both build the same initial model")
    params: dict[str, Any] = Field(default_factory=dict, description="backbone settings")

    @model_validator(mode="after")
    def _one_spec(self) -> ColdStart:
        if (self.spec is None) == (self.spec_file is None):
            raise ValueError("give exactly one of spec and spec_file")
        return self


class ArmMemoryConfig(_Frozen):
    """ReLoop2's error memory for one arm (engine/memory/): the live model's scores are corrected by the
    errors it made on similar samples whose labels came back, read from the arm's samples topic."""

    samples_topic: TopicName = Field(
        description="the topic the arm's join stage writes (stages.samples_topic)"
    )
    n_tables: int = Field(default=16, ge=1, le=64, description="hash tables of the memory")
    n_bits: int = Field(default=12, ge=1, le=20, description="2**n_bits buckets per table")
    # Defaults: chosen on MovieLens-100K's selection weeks for DCN (docs/backtest/reloop2/report.md).
    lam: float = Field(default=0.3, ge=0.0, le=1.0, description="weight of the neighbours' error")
    prior_count: float = Field(default=200.0, ge=0.0, description="pseudo-samples shrinking towards the base")
    form: Literal["residual", "label"] = Field(
        default="label",
        description="label: correct towards the neighbours' labels; residual: add their mean error",
    )
    seed: int = Field(default=0, description="the hash functions' seed")
    buffer: int = Field(default=20_000, ge=0, description="samples kept to re-key the memory on a reload")
    state_file: UserFilePath | None = Field(
        default=None, description=".npz saved every save_every_s and on stop"
    )
    save_every_s: float = Field(default=30.0, gt=0, description="the state is saved this often (and at stop)")


class ArmCountersConfig(CounterSettings):
    """Click counters for one arm (engine/memory/served_counters.py): each scored candidate gets its
    counter inputs, logged with its impression; clicks are read from the arm's samples topic. The arm's
    model must be trained with the same ``model.counters`` (fields, prior strength, windows)."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_min_length=1)

    samples_topic: TopicName = Field(
        description="the topic the arm's join stage writes (stages.samples_topic)"
    )
    # "impressions" (the default): every process counts what the arm's impression log says was shown,
    # read back from Kafka as the clicks are, so all workers and replicas of the arm (which no config
    # can see: pods) count the same impressions. "requests": the process counts what it shows as it
    # answers, at once, without Kafka; it must then be the arm's only server.
    shown_from: Literal["requests", "impressions"] = Field(
        default="impressions",
        description="where shown items are counted: this process's requests, or the arm's impression log "
        "(shared by every worker and replica)",
    )
    state_file: UserFilePath | None = Field(
        default=None, description=".npz saved every save_every_s and on stop"
    )
    save_every_s: float = Field(
        default=30.0, gt=0, description="the counts are saved this often (and at stop)"
    )


class ArmConfig(_Frozen):
    name: str = Field(
        min_length=1,
        max_length=MAX_ARM_CHARS,  # the impressions' arm field: longer ones are dead-lettered at the join
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="the arm's name (labels, /stats, the impressions' arm field)",
    )
    # Relative traffic share; bounded so the weights' sum stays finite (inf took the arm's traffic away).
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1e12,
        allow_inf_nan=False,
        description="relative share of the users routed to this arm",
    )
    registry: UserFilePath = Field(description="snapshot registry root this arm's trainer writes")
    impressions_topic: TopicName = Field(
        default="impressions", description="where this arm's impressions are logged (one topic per arm)"
    )
    clicks_topic: TopicName = Field(
        default="clicks", description="this arm's clicks (read for the click counters and the error memory)"
    )
    cold_start: ColdStart | None = None
    memory: ArmMemoryConfig | None = None
    counters: ArmCountersConfig | None = None
    # Settings for this arm's trainer (the demo passes them to `reloop run`); the service ignores them.
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="reloop demo only: this arm's overrides of the demo's run config; the service ignores "
        "them",
    )

    @model_validator(mode="after")
    def _counted_fields_in_cold_start(self) -> ArmConfig:
        # The cold-start model gets the counter inputs appended to its spec, as the trainer's gets them
        # (a spec_file is read, and checked so, once the document is loaded: _read_cold_start_spec).
        if self.counters is not None and self.cold_start is not None and self.cold_start.spec is not None:
            problem = _counters_problem(self.cold_start.spec, self.counters)
            if problem:
                raise ValueError(problem)
        return self


def _counters_problem(spec: dict[str, Any], counters: CounterSettings) -> str | None:
    from reloop.engine.features.counters import CounterError, with_counter_fields
    from reloop.engine.features.spec import FeatureSpec

    try:
        with_counter_fields(FeatureSpec.from_dict(spec), counters)
    except (CounterError, ValueError) as exc:
        return f"counters do not fit cold_start.spec: {exc}"
    return None


def _read_cold_start_spec(index: int, arm: ArmConfig, spec_dir: Path | None) -> ArmConfig:
    """The arm with its ``cold_start.spec_file`` read into ``cold_start.spec`` (relative: to
    ``spec_dir``, the config file's folder, as ``reloop run`` takes ``model.spec_file``)."""
    from reloop.engine.runtime.config import read_spec_file

    cold = arm.cold_start
    if cold is None or cold.spec_file is None:
        return arm
    path = Path(cold.spec_file)
    if spec_dir is not None and not path.is_absolute():
        path = spec_dir / path
    key = f"arms.{index}.cold_start.spec_file"
    spec = read_spec_file(path, f"bad serve config: {key}")
    problem = None if arm.counters is None else _counters_problem(spec, arm.counters)
    if problem:
        raise ConfigError(f"bad serve config: arms.{index}: {problem}")
    return arm.model_copy(update={"cold_start": cold.model_copy(update={"spec": spec})})


class LogConfig(_Frozen):
    """The impression log. Its client is ``kafka.client``: confluent (the service's default) puts events
    straight into librdkafka's queue (C threads do the rest); kafka-python has a Python drain thread and
    kafka-python's sender (they compete with scoring for the GIL; docs/bench-serve.md)."""

    enabled: bool = Field(
        default=True, description="log every served impression to the arm's impressions_topic"
    )
    max_buffer: int = Field(
        default=100_000,
        ge=1,
        description="impressions held while the broker is slow or down; more are dropped (counted)",
    )
    batch_size: int = Field(default=500, ge=1, description="impressions per produce call")
    linger_s: float = Field(default=0.02, ge=0, description="how long a partial batch waits for more")
    max_record_bytes: int = Field(
        default=512 * 1024,
        gt=0,
        le=900 * 1024,
        description="an impression event larger than this is dropped and counted (oversized): keep it at "
        "or below the trainer's validation.max_event_bytes (512 KiB by default), which dead-letters larger "
        "ones; at most 900 KiB (under Kafka's default max.request.size)",
    )


class RequestLimits(_Frozen):
    """Bounds on one scoring request; beyond them it is refused (413 for the body, 422 otherwise) before
    any scoring work, so one request can never stall the service."""

    max_body_bytes: int = Field(default=1 << 20, gt=0, description="413 above this")
    max_feature_chars: int = Field(default=4096, gt=0, description="longest string feature value")
    max_feature_list: int = Field(default=1024, gt=0, description="most items in a multi-valued feature")
    max_features: int = Field(
        default=1024,
        gt=0,
        description="most feature keys in the context or in one candidate: every logged impression carries "
        "the context, so a context of many keys the model does not read multiplied the request into the log "
        "(69,000 keys: 1 MB in, 90 MB to Kafka, 1.1 s of the event loop)",
    )
    max_logged_bytes: int = Field(
        default=16 << 20,
        gt=0,
        description="most bytes of context one request may write to the impression log: its context's size "
        "(keys and values) times the impressions it logs (top_k); a 590 KB context with top_k 2000 wrote "
        "~1 GB to Kafka and held the event loop 2.3 s",
    )
    max_queue_ms: float | None = Field(
        default=None,
        gt=0,
        description="shed load: a scoring request that waited longer than this from its last byte to its "
        "turn (requests queue while the service scores others) is answered 503 at once, unscored, with "
        "Retry-After; null: every request is scored however late (set it near your clients' timeout)",
    )
    max_future_ms: int | None = Field(
        default=300_000, ge=0, description="event_time_ms further ahead of the service clock is refused"
    )
    max_past_ms: int | None = Field(
        default=86_400_000, ge=0, description="event_time_ms further behind the service clock is refused"
    )


# The service's Kafka section is the processor's (one model); kept under its former name for imports.
KafkaConfig = KafkaSection
SERVE_KAFKA_CLIENT = "confluent"  # the service's client when kafka.client is not given


class ServeConfig(_Frozen):
    host: str = Field(
        default="127.0.0.1",
        description="the address the service binds (loopback by default; another without a token is warned "
        "about)",
    )
    auth_token_file: UserFilePath | None = Field(
        default=None,
        description="require 'Authorization: Bearer <token>' (file content) on everything but the probes",
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description="the token itself, e.g. from RELOOP__SERVE__AUTH_TOKEN (a Kubernetes Secret); a secret, "
        "never printed; auth_token_file wins when both are given",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="the scoring port (0: a free one, printed)")
    top_k: int = Field(default=10, ge=1, description="items in the ranking when a request names no top_k")
    reload_interval_s: float = Field(
        default=0.2, gt=0, description="registry poll period: a poll is two directory listings"
    )
    torch_threads: int = Field(default=1, ge=1, description="torch's threads per serving process")
    gil_switch_interval_ms: float | None = Field(
        default=0.5,
        gt=0,
        description="how long another thread (the reload watcher, the impression log's poll) may hold "
        "the GIL while a request waits for it; null keeps Python's 5 ms (docs/bench-serve.md)",
    )
    keep_alive_s: int = Field(default=5, ge=1, description="idle keep-alive connections are closed after")
    read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request must arrive whole (headers and body) within this of its connection's "
        "start or of the answer before it, or the connection is closed: slow or silent clients cannot "
        "hold connections (and file descriptors) for ever",
    )
    max_connections: int | None = Field(
        default=4096,
        ge=1,
        description="open connections one serving process keeps; one beyond is answered 503 with "
        "Retry-After and closed at once (counted as a failed request, status 503), so a flood of "
        "connections cannot use up the process's file descriptors (its registry watcher, its Kafka "
        "client); null: no cap. Keep it under the process's open-file limit (ulimit -n)",
    )
    shutdown_timeout_s: float = Field(
        default=20.0,
        gt=0,
        le=3600,
        description="after SIGTERM the service stops within this + 3 s, whatever Kafka does: requests in "
        "flight get up to 5 s of it, the impression loggers the rest; what they have not delivered then "
        'is counted (reloop_impressions_dropped_total{reason="shutdown"})',
    )
    workers: int = Field(default=1, ge=1, description="serving processes sharing the port (SO_REUSEPORT)")
    worker_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="with workers > 1, worker i also serves /metrics on this port + i, for Prometheus to "
        "scrape each (the shared port answers for whichever worker a connection lands on); default: "
        "serve.port + 1",
    )
    salt: str = Field(
        default="reloop", description="hashed with user_id to pick the arm: another salt reshuffles the users"
    )
    arms: tuple[ArmConfig, ...] = Field(min_length=1)
    log: LogConfig = LogConfig()
    kafka: KafkaSection = KafkaSection(client=SERVE_KAFKA_CLIENT)
    limits: RequestLimits = RequestLimits()

    @field_validator("auth_token", mode="before")
    @classmethod
    def _token_not_empty(cls, token: Any) -> Any:
        # An empty token (a Secret whose key is missing) turned authentication off without a word.
        text = token.get_secret_value() if isinstance(token, SecretStr) else token
        if isinstance(text, str) and not text.strip():
            raise ValueError("is empty; unset it (or give null) to serve without a token")
        if text == SECRET_MASK:
            raise ValueError(MASKED)
        return token

    @model_validator(mode="before")
    @classmethod
    def _serve_kafka_client(cls, data: Any) -> Any:
        # The same kafka section as reloop run's, with the service's own default client.
        if isinstance(data, dict) and isinstance(data.get("kafka"), dict) and "client" not in data["kafka"]:
            data = {**data, "kafka": {**data["kafka"], "client": SERVE_KAFKA_CLIENT}}
        return data

    @model_validator(mode="after")
    def _unique_arms(self) -> ServeConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: duplicate names {names}")
        topics = [a.impressions_topic for a in self.arms]
        if len(self.arms) > 1 and len(set(topics)) != len(topics):
            raise ValueError(
                "arms: each arm needs its own impressions_topic (each arm trains on its own feedback)"
            )
        registries = [str(Path(a.registry).resolve()) for a in self.arms]
        shared = sorted({r for r in registries if registries.count(r) > 1})
        if shared:
            # Both would serve one trainer's model while the other arm's trainer (its own registry is
            # this one: a registry has one writer) cannot run: one arm's feedback trains another model.
            raise ValueError(
                "arms: each arm needs its own registry (each arm serves the model its own trainer writes "
                f"from that arm's feedback); shared: {shared}"
            )
        ArmRouter([(a.name, a.weight) for a in self.arms], salt="")  # the shares: at load, not at start
        problem = counters_conflict(self, self.workers)
        if problem:
            raise ValueError(problem)
        return self

    def redacted_dump(self) -> dict[str, Any]:
        """The config as JSON data with the token and every secret-looking client setting hidden."""
        from reloop.engine.config_common import redact

        data = self.model_dump(mode="json")  # SecretStr fields: "**********"
        data["kafka"]["client_config"] = redact(data["kafka"]["client_config"])
        return data


def counters_conflict(config: ServeConfig, workers: int) -> str | None:
    """Why ``config``'s counters cannot be served by ``workers`` processes with its impression log as it
    is (``--workers`` and ``--no-log`` change both after the file was validated); None when they can."""
    counted = [a for a in config.arms if a.counters is not None]
    local = [a.name for a in counted if a.counters.shown_from == "requests"]  # type: ignore[union-attr]
    if local and workers > 1:
        # Each worker would count only what it shows, and every click: rates above the truth.
        return (
            f"serve.workers: arms {local} count the items they show as they answer, so one process must "
            "see every impression the arm shows: serve them with workers: 1, or count from the impression "
            "log (arms[].counters.shown_from: impressions)"
        )
    logged = [a.name for a in counted if a.counters.shown_from == "impressions"]  # type: ignore[union-attr]
    if logged and not config.log.enabled:
        return (
            f"serve.log.enabled: arms {logged} count the items they show from their impression log "
            "(arms[].counters.shown_from: impressions), which is off (serve.log.enabled: false, or "
            "--no-log)"
        )
    return None


# Keys and environment variables that moved, refused with their new place.
MOVED = {
    ("kafka", "settings"): "kafka.client_config (in kafka.client's names; security settings as "
    "kafka.security_protocol, kafka.sasl_*, kafka.ssl_*)",
    ("kafka", "confluent_settings"): "kafka.client_config (with kafka.client: confluent)",
    ("serve", "log", "client"): "kafka.client",
}
MOVED_ENV = {
    "RELOOP_KAFKA_BOOTSTRAP": "RELOOP__KAFKA__BOOTSTRAP",
    "RELOOP_SERVE_TOKEN": "RELOOP__SERVE__AUTH_TOKEN",
}


class _ServeDocument(BaseModel):
    """The sections of a config document the service reads: what RELOOP__<SECTION>__* can name."""

    serve: ServeConfig
    arms: tuple[ArmConfig, ...]
    kafka: KafkaSection
    salt: str


def read_yaml(path: str | Path) -> dict[str, Any]:
    data = read_document(path)
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def service_env_overrides(env: Mapping[str, str], *, others: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The ``RELOOP__`` variables of ``env`` the service reads (``serve``, ``arms``, ``kafka``, ``salt``) as
    nested config data. A shared environment may hold the processor's sections (RELOOP__TRAIN__...) and
    those named in ``others``: left alone. A section no program has (RELOOP__SERV__PORT) is refused, as
    `reloop run` refuses it."""
    from reloop.engine.runtime.config import RunConfig

    return env_values(_ServeDocument, env, others=frozenset(RunConfig.model_fields) | others)


# The top-level sections of the service's config file: `reloop simulate`, which drives the service, reads
# the same file (and its simulate section).
SERVICE_FILE_SECTIONS = ("serve", "arms", "kafka", "salt", "simulate")


def check_service_sections(doc: Mapping[str, Any]) -> None:
    """ConfigError for a top-level key the service's file has no use for: a misspelt ``serv:`` was
    ignored (the service listened on the default port), and a run config given to ``reloop simulate``
    sent its clicks to a default topic."""
    import difflib

    from reloop.engine.runtime.config import RunConfig

    unknown = [str(k) for k in doc if k not in SERVICE_FILE_SECTIONS]
    if not unknown:
        return
    for whose, sections in (
        ("a run config's (reloop run, join, train)", RunConfig.model_fields),
        ("the demo's (reloop demo)", ("run", "demo")),
    ):
        theirs = [k for k in unknown if k in sections]
        if theirs:
            raise ConfigError(
                f"{'sections' if len(theirs) > 1 else 'section'} {', '.join(theirs)} "
                f"{'are' if len(theirs) > 1 else 'is'} {whose}: the service's file has "
                f"{', '.join(SERVICE_FILE_SECTIONS)}"
            )
    name = unknown[0]
    near = difflib.get_close_matches(name, SERVICE_FILE_SECTIONS, n=1, cutoff=0.6)
    hint = (
        f" (did you mean {near[0]}?)"
        if near
        else f" (the service's file has {', '.join(SERVICE_FILE_SECTIONS)})"
    )
    raise ConfigError(f"{name}: unknown section{hint}")


def serve_config_from_dict(
    data: dict[str, Any],
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    spec_dir: Path | None = None,
) -> ServeConfig:
    """Build a ServeConfig from a whole config document (sections ``serve``, ``arms``, ``kafka``) with the
    ``RELOOP__`` variables of ``env`` (default os.environ) over it. ``base_dir``: where relative registries
    are; ``spec_dir``: where relative ``cold_start.spec_file`` are (the config file's folder)."""
    env = os.environ if env is None else env
    for old, new in MOVED_ENV.items():
        if old in env:
            raise ConfigError(f"environment variable {old} was renamed {new}")
    overrides = service_env_overrides(env)
    doc = deep_merge(data, overrides)
    check_moved(doc, MOVED, where=" (serve)")
    check_service_sections(doc)
    serve = doc.get("serve") or {}
    if not isinstance(serve, Mapping):  # (dict() of it raised a TypeError, a traceback at the CLI)
        raise ConfigError(f"bad serve config: serve: a mapping of settings expected, got {serve!r:.80}")
    merged: dict[str, Any] = dict(serve)
    if "arms" in doc:
        merged["arms"] = doc["arms"]
    if "kafka" in doc:
        merged["kafka"] = doc["kafka"]
    if "salt" in doc and "salt" not in merged:
        merged["salt"] = doc["salt"]
    try:
        config = ServeConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, overrides, env)) from exc
    arms = tuple(_read_cold_start_spec(i, a, spec_dir) for i, a in enumerate(config.arms))
    if base_dir is not None:
        arms = tuple(
            a if a.registry.is_absolute() else a.model_copy(update={"registry": base_dir / a.registry})
            for a in arms
        )
    return config.model_copy(update={"arms": arms})


def load_serve_config(path: str | Path) -> ServeConfig:
    from reloop.engine.runtime.config_pipe import config_base_dir

    data = read_yaml(path)
    return serve_config_from_dict(data, spec_dir=config_base_dir(Path(path)))


def _explain(
    exc: ValidationError, overrides: Mapping[str, Any] | None = None, names: Iterable[str] = ()
) -> str:
    lines = []
    for err in reportable_errors(exc):
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] not in ("arms", "kafka", "salt"):
            loc.insert(0, "serve")  # the key as the document names it
        key = ".".join(loc)
        where = f"{key}: " if key else ""  # a check of the whole document names its keys itself
        lines.append(f"{where}{error_text(err, ServeConfig)}{env_origin(loc, overrides or {}, names)}")
    return "bad serve config: " + "; ".join(lines)
