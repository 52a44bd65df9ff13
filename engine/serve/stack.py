"""Assemble the scoring service from its config: per arm a registry watcher, a model holder and an
impression logger; the router; the FastAPI app; and (optionally) an in-thread uvicorn server.

The Kafka sink is created lazily by the logger thread, so the service starts, scores and stays ready
while the broker is unreachable (the events wait in the bounded buffer, then are dropped and counted).
One wait at start: an arm whose counters count its impression log (``shown_from: impressions``) must
not serve counts that lack what the log held when its feed opened (resuming from saved positions: what
came after the last save; a fresh feed starts at its own creation), so ``start`` waits for such feeds to
catch up (up to ``FEED_OPEN_WAIT_S``, then serves anyway, with a warning).

``ServingStack.close`` is bounded by ``serve.shutdown_timeout_s`` (+ ``CLOSE_SLACK_S``), whatever Kafka
does: the HTTP server gets up to 5 s to finish its requests, the reload watcher 2 s, and the impression
loggers (all arms at once) and error-memory feeds the rest, then each logger counts what it could not
deliver (``reloop_impressions_dropped_total{reason="shutdown"}``) and gives its producer up; a close
still running after that is left behind with an error log.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from reloop.engine.events.codec import encode
from reloop.engine.netaddr import http_url
from reloop.engine.runtime.gc_tuning import freeze_live_objects
from reloop.engine.serve.app import RECEIVED_KEY, ScoreRoute, count_failed, create_app
from reloop.engine.serve.arms import ArmRouter
from reloop.engine.serve.bundle import ModelBundle, ModelHolder
from reloop.engine.serve.config import ArmConfig, ServeConfig
from reloop.engine.serve.impression_log import ImpressionLogger, close_sink
from reloop.engine.serve.producer_log import ProducerLogger
from reloop.engine.serve.reload import ArmSource, ReloadWatcher
from reloop.engine.serve.service import ArmRuntime, ScoringService
from reloop.engine.streams import Sink, Source
from starlette.responses import PlainTextResponse
from starlette.routing import Route

log = logging.getLogger(__name__)

# What ServingStack.close may take beyond serve.shutdown_timeout_s: the loggers' release of their
# producers (impression_log.RELEASE_S, and about 1 s for a Kafka producer's sender thread to stop).
CLOSE_SLACK_S = 3.0
# How long start() waits for counters feeds to catch up on the impression log before serving (module doc).
FEED_OPEN_WAIT_S = 5.0
_SERVER_STOP_S = 5.0  # in-flight requests finish within this (part of the shutdown timeout)
_WATCHER_STOP_S = 2.0
# At a stop, how soon a connection whose request was still unread is looked at again (it is read meanwhile).
_UNREAD_RECHECK_S = 0.01

SinkFactory = Callable[[ArmConfig], Sink]
# An arm's samples topic (arms[].memory's, arms[].counters'), with its impression log where the counters
# count it, as one Source: (arm, topics) -> Source.
SamplesSourceFactory = Callable[[ArmConfig, list[str]], Source]
# (latest version, load a version, every version available) of one arm's registry.
LoaderFactory = Callable[
    [ArmConfig],
    tuple[Callable[[], int | None], Callable[[int], ModelBundle], Callable[[], list[int]]],
]


def _http_impl(
    read_timeout_s: float,
    on_timeout: Callable[[], None],
    max_connections: int | None,
    on_refused: Callable[[], None],
) -> type[asyncio.Protocol]:
    """httptools (C HTTP/1.1 parser) when installed: ~4x less parser CPU per request than h11; with a
    read deadline (``with_read_deadline``) and a cap on open connections (``with_connection_cap``)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return with_connection_cap(
        with_read_deadline(base, read_timeout_s, on_timeout), max_connections, on_refused
    )


_TOO_MANY = b"too many connections (serve.max_connections); try again\n"
_TOO_MANY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_TOO_MANY), _TOO_MANY)
)


# How long a connection refused by the cap is read (and what arrives dropped) before it is closed.
_REFUSED_LINGER_S = 1.0


def with_connection_cap(
    base: type[Any], most: int | None, on_refused: Callable[[], None]
) -> type[asyncio.Protocol]:
    """``base`` answering a connection beyond ``most`` open ones 503 (Retry-After: 1) and closing it
    at once. uvicorn's ``limit_concurrency`` answers 503 too, but only once a request arrives, and keeps
    the connection: a flood of them still used up the file descriptors. ``on_refused`` counts each."""
    if most is None:
        return base

    class ConnectionCap(base):  # type: ignore[misc, valid-type]
        _refused = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)  # (uvicorn adds it to the server's open connections)
            if len(self.server_state.connections) <= most:
                return
            self._refused = True
            on_refused()
            disarm = getattr(self, "_disarm_read_deadline", None)
            if disarm is not None:  # not a slow client: answered already
                disarm()
            transport.write(_TOO_MANY_RESPONSE)
            # A close with the client's request unread sends a reset, on which a client's stack may
            # drop the 503 it has not read yet (a web server's "lingering close"): half-close, read
            # and drop what comes for a moment, then close.
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(_REFUSED_LINGER_S, transport.close)

        def data_received(self, data: bytes) -> None:
            if not self._refused:  # a refused connection's request is dropped unread
                super().data_received(data)

    ConnectionCap.__name__ = ConnectionCap.__qualname__ = f"ConnectionCap{base.__name__}"
    return ConnectionCap


def with_read_deadline(
    base: type[Any], timeout_s: float, on_timeout: Callable[[], None]
) -> type[asyncio.Protocol]:
    """``base`` (one of uvicorn's HTTP protocols) closing a connection whose request has not arrived
    whole ``timeout_s`` after the connection was made or the answer before it was sent. uvicorn has no
    such timeout (its keep-alive timer runs only between a whole answer and the next byte): a client
    that sent nothing, part of its headers or part of a body held the connection for ever, and 20,000
    of them used up the process's file descriptors (the reload watcher could not list the registry, new
    clients were reset). A request read whole is not timed: its answer is the service's to give.
    ``on_timeout`` counts each connection closed so (on the event loop's thread)."""

    parses_messages = hasattr(base, "on_message_begin")  # httptools; h11 has no such callback

    class ReadDeadline(base):  # type: ignore[misc, valid-type]
        _read_deadline: asyncio.TimerHandle | None = None
        # Requests begun (their first bytes parsed) and answered on this connection: equal and not 0 at
        # the deadline, it is a keep-alive connection idle between requests, closed but not counted.
        _begun = 0
        _answered = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_read_deadline()

        def on_message_begin(self) -> None:  # httptools' parser callback
            self._begun += 1
            super().on_message_begin()

        def on_message_complete(self) -> None:  # httptools': the request arrived whole
            self.scope[RECEIVED_KEY] = time.monotonic()  # its wait for its turn (serve.limits.max_queue_ms)
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            if not parses_messages and self._begun == self._answered:
                self._begun += 1  # h11: any bytes after an answer begin the next request
            super().data_received(data)

        def on_response_complete(self) -> None:
            self._answered += 1
            super().on_response_complete()
            self._arm_read_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_read_deadline()
            super().connection_lost(exc)

        def _arm_read_deadline(self) -> None:
            self._disarm_read_deadline()
            if not self.transport.is_closing():
                self._read_deadline = self.loop.call_later(timeout_s, self._read_deadline_passed)

        def _disarm_read_deadline(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def shutdown(self) -> None:
            """uvicorn's graceful stop closes at once a connection with no request in progress: one
            whose request sat in the socket unread (a busy event loop) was reset, and its client could
            not tell whether it was scored (35 of 60 requests sent 150 ms before a SIGTERM). Such a
            connection is closed only once what arrived is read: its request is then answered, and the
            connection closed."""
            if (self.cycle is None or self.cycle.response_complete) and _has_unread_bytes(self.transport):
                self.loop.call_later(_UNREAD_RECHECK_S, self.shutdown)
                return
            super().shutdown()

        def _read_deadline_passed(self) -> None:
            self._read_deadline = None
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                return  # read whole, being answered
            if not (self._answered and self._begun == self._answered):
                on_timeout()  # not a keep-alive connection idle between requests (closed, not counted)
            if not self.transport.is_closing():
                self.transport.close()

    ReadDeadline.__name__ = ReadDeadline.__qualname__ = f"ReadDeadline{base.__name__}"
    return ReadDeadline


def _has_unread_bytes(transport: Any) -> bool:
    """Whether the connection's socket holds bytes the event loop has not read yet (a peek on a
    duplicate of its descriptor: uvloop's transports hand out no socket that can receive)."""
    if transport.is_closing():
        return False
    sock = transport.get_extra_info("socket")
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as peer:
            return bool(peer.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (OSError, AttributeError, ValueError):  # nothing to read (EAGAIN), or no such socket
        return False


def _loop_impl() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class LazySink:
    """Builds the real sink on first use and again after a failure, so 'broker down' is one more
    retryable send error rather than a crash at startup, and a producer left in an error state by a
    refused batch (Kafka's idempotent producer can be) is never reused. After ``close`` it builds
    nothing more: a sink the logger thread was still building then (a broker that does not answer holds
    that for ~35 s) is released as soon as it is built."""

    def __init__(self, make: Callable[[], Sink]) -> None:
        self._make = make
        self._sink: Sink | None = None
        self._closed = False
        self._lock = threading.Lock()

    def _get(self) -> Sink:
        sink = self._sink
        if sink is not None:
            return sink
        if self._closed:
            raise RuntimeError("send on a closed sink")
        sink = self._make()
        with self._lock:
            if not self._closed:
                self._sink = sink
                return sink
        _release(sink)  # closed while it was being built
        raise RuntimeError("the sink was closed while it was being built")

    def send(self, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None) -> None:
        self._get().send(value, key=key, timestamp_ms=timestamp_ms)

    def flush(self, timeout_s: float | None = None) -> None:
        if self._sink is not None:
            try:
                self._sink.flush(timeout_s)
            except Exception:
                self._discard()
                raise

    def _discard(self) -> None:
        with self._lock:
            sink, self._sink = self._sink, None
        if sink is not None:
            _release(sink)

    def close(self, timeout_s: float | None = None) -> None:
        with self._lock:
            self._closed = True
            sink, self._sink = self._sink, None
        if sink is not None:
            close_sink(sink, timeout_s)


def _release(sink: Sink) -> None:
    release = getattr(sink, "abort", None) or sink.close
    try:
        release()
    except Exception:  # noqa: BLE001 - a failed sink is being thrown away
        log.debug("releasing a failed sink failed", exc_info=True)


def kafka_sink_factory(config: ServeConfig) -> SinkFactory:
    bootstrap = config.kafka.bootstrap
    # A broker that is down must cost the logger thread seconds, not the producer's default minute.
    settings = {"max_block_ms": 5000, "request_timeout_ms": 5000, **config.kafka.connection("kafka-python")}

    def make(arm: ArmConfig) -> Sink:
        from reloop.connectors.kafka.sink import KafkaSink

        return LazySink(
            lambda: KafkaSink(bootstrap=bootstrap, topic=arm.impressions_topic, client_config=settings)
        )

    return make


def registry_loader_factory(arm: ArmConfig):
    """``latest``/``load``/``versions`` over the arm's registry: a version's serving bundle when the
    trainer wrote one (reloop.engine.serve.bundle_format: weights only, visible before the training snapshot
    is), else the training snapshot's learner part; with ``cold_start``, version 0 is an untrained
    model (the newest version of an empty registry, and the last fallback) until a trained version
    loaded, never after."""
    from reloop.engine.checkpoint.registry import SnapshotRegistry
    from reloop.engine.serve.bundle_format import bundle_versions, serving_dir
    from reloop.engine.serve.loader import bundle_or_snapshot_loader, cold_start_bundle

    # Not created here: serving mounts the snapshots read-only, and a fresh volume has no folder yet
    # until the processor's first publish (creating it failed with EROFS: the service crash-looped).
    registry = SnapshotRegistry(arm.registry, create=False)
    bundles = serving_dir(arm.registry)
    load_version = filling_counter_inputs(arm, bundle_or_snapshot_loader(registry))

    def available() -> list[int]:
        return sorted({*registry.versions(), *bundle_versions(bundles)})

    def newest() -> int | None:
        found = available()
        return found[-1] if found else None

    if arm.cold_start is None:
        return newest, load_version, available
    cold = arm.cold_start
    # Once a trained version loaded, the untrained v0 is never the fallback again: a registry that lists
    # nothing for a moment (an NFS hiccup, a remount: is_dir() says False) swapped v0 in as "the
    # registry's newest", and the arm served an untrained model until the next poll. The live version is
    # kept instead (a registry really started again is followed down once its new v1 is there).
    state = {"trained": False, "warned": False}

    def latest() -> int | None:
        v = newest()
        if v is not None:
            state["warned"] = False
            return v
        if not state["trained"]:
            return 0
        if not state["warned"]:
            state["warned"] = True
            log.warning(
                "arm %s: its registry %s lists no snapshot (unreachable, or emptied): keeping the live "
                "model, not the untrained cold-start v0",
                arm.name,
                arm.registry,
            )
        return None

    def load(version: int) -> ModelBundle:
        if version != 0:
            bundle = load_version(version)
            state["trained"] = True
            return bundle
        log.warning(
            "arm %s: serving the untrained cold-start model v0 (arms[].cold_start) until a snapshot loads "
            "from %s",
            arm.name,
            arm.registry,
        )
        return cold_start_bundle(cold, arm.counters)

    def versions() -> list[int]:
        return available() if state["trained"] else [*available(), 0]

    return latest, load, versions


def filling_counter_inputs(
    arm: ArmConfig, load: Callable[[int], ModelBundle]
) -> Callable[[int], ModelBundle]:
    """``load``, refusing a version whose model reads click-counter inputs the arm does not fill (an arm
    without ``counters``, or counting other fields or windows than the trainer's ``model.counters``):
    served, it would score zeros in their place. Also one trained with counters of another prior strength
    (recorded with the model since 2026-12-06; the inputs' names do not carry it), whose rates would
    differ from those it learnt. An arm may count more than the model reads (add a field to the arm
    first, then to the trainer). The reload watcher counts the refusal and serves the next older
    version."""
    from reloop.engine.checkpoint.registry import SnapshotError
    from reloop.engine.features.counters import counter_field_names, counter_inputs
    from reloop.engine.memory.served_counters import describe_inputs

    c = arm.counters
    filled = set() if c is None else set(counter_field_names(c.fields, c.windows_s))

    def load_checked(version: int) -> ModelBundle:
        bundle = load(version)
        unfilled = [n for n in counter_inputs(bundle.featurizer.spec) if n not in filled]
        if unfilled:
            raise SnapshotError(
                f"arm {arm.name}: version {version}'s model reads the click-counter inputs "
                f"{describe_inputs(unfilled)}, which this arm does not fill: give it arms[].counters as "
                "the trainer's model.counters"
            )
        trained = getattr(getattr(bundle.learner, "config", None), "counters", None)
        if trained is not None and c is not None and trained.prior_strength != c.prior_strength:
            raise SnapshotError(
                f"arm {arm.name}: version {version}'s model learnt click-counter inputs of prior strength "
                f"{trained.prior_strength:g}, this arm serves them with {c.prior_strength:g}: give "
                "arms[].counters.prior_strength the trainer's model.counters.prior_strength"
            )
        return bundle

    return load_checked


def confluent_logger(config: ServeConfig, arm: ArmConfig) -> ProducerLogger:
    """The impression logger of one arm on confluent-kafka (reloop.engine.serve.producer_log)."""
    bootstrap = config.kafka.bootstrap
    # The connection in librdkafka's names (kafka.client_config as is, or translated from kafka-python's
    # when kafka.client says kafka-python: a setting without an equivalent is refused, never dropped).
    client_settings = config.kafka.connection("confluent")
    log_cfg = config.log
    settings = {
        # librdkafka's queue is the buffer: max_buffer events, retried without a time limit while
        # Kafka is down; beyond it offer() says no and the event is dropped and counted.
        "queue.buffering.max.messages": log_cfg.max_buffer,
        "batch.num.messages": min(log_cfg.batch_size, log_cfg.max_buffer),
        "linger.ms": log_cfg.linger_s * 1000.0,
        "message.timeout.ms": 0,
        **client_settings,
    }

    def make_sink(failure):
        from reloop.connectors.confluent.sink import ConfluentSink, failure_reason

        return ConfluentSink(
            bootstrap=bootstrap,
            topic=arm.impressions_topic,
            client_config=settings,
            on_error=lambda err, msg, ts: failure(
                failure_reason(err), str(err), (msg.value(), msg.key(), ts)
            ),
        )

    return ProducerLogger(
        make_sink=make_sink, encode=encode, arm=arm.name, max_record_bytes=log_cfg.max_record_bytes
    )


def kafka_samples_source_factory(config: ServeConfig) -> SamplesSourceFactory:
    def make(arm: ArmConfig, topics: list[str]) -> Source:
        settings = config.kafka.connection()
        if config.kafka.client == "confluent":
            from reloop.connectors.confluent.source import ConfluentSource as Kind
        else:
            from reloop.connectors.kafka.settings import consumer_part
            from reloop.connectors.kafka.source import KafkaSource as Kind  # type: ignore[assignment]

            # kafka.client_config is the impression log producer's too: a producer-only setting made
            # every start of the feed's consumer fail, retried for as long as the service ran.
            settings = consumer_part(settings)
        return Kind(bootstrap=config.kafka.bootstrap, topics=list(topics), client_config=settings)

    return make


def memory_feed(arm: ArmConfig, holder: ModelHolder, source: Source) -> Any:
    """The error memory of an arm and the feed thread that writes joined samples into it."""
    from reloop.engine.memory.feed import SamplesFeed
    from reloop.engine.memory.served import ServedMemory
    from reloop.engine.memory.sketch import SketchConfig

    m = arm.memory
    assert m is not None
    sketch = SketchConfig(
        n_tables=m.n_tables, n_bits=m.n_bits, lam=m.lam, prior_count=m.prior_count, form=m.form, seed=m.seed
    )
    memory = ServedMemory(sketch, buffer=m.buffer)
    return SamplesFeed(
        name=arm.name, source=source, target=memory, holder=holder, state_path=m.state_file,
        save_every_s=m.save_every_s,
    )  # fmt: skip


def counters_topics(arm: ArmConfig) -> list[str]:
    """What an arm's counters feed reads: its samples topic, and its impression log where shown items
    are counted from it (``shown_from: impressions``)."""
    c = arm.counters
    assert c is not None
    return [c.samples_topic, *([arm.impressions_topic] if c.shown_from == "impressions" else [])]


def counters_feed(arm: ArmConfig, holder: ModelHolder, source: Source) -> Any:
    """The click counters of an arm and the feed thread that counts the clicks of its samples topic (and
    the impressions of its impression log, with ``shown_from: impressions``), reading ``source``."""
    from reloop.engine.memory.feed import SamplesFeed
    from reloop.engine.memory.served_counters import ServedCounters

    c = arm.counters
    assert c is not None
    shown_topic = arm.impressions_topic if c.shown_from == "impressions" else None
    return SamplesFeed(
        name=arm.name, source=source, target=ServedCounters(c), holder=holder, state_path=c.state_file,
        save_every_s=c.save_every_s, shown_topic=shown_topic,
    )  # fmt: skip


class ServingStack:
    def __init__(
        self,
        config: ServeConfig,
        *,
        sink_factory: SinkFactory | None = None,
        loader_factory: LoaderFactory = registry_loader_factory,
        samples_source_factory: SamplesSourceFactory | None = None,
        metrics_elsewhere: str | None = None,
    ) -> None:
        """``metrics_elsewhere``: this port's /metrics answers 404 with this text (one worker of several,
        each serving its own /metrics on another port)."""
        self.config = config
        self._switch_interval_before: float | None = None
        self.arms: dict[str, ArmRuntime] = {}
        self.feeds: dict[str, Any] = {}
        sources: list[ArmSource] = []
        for arm in config.arms:
            if not arm.registry.is_dir():  # a mistyped path: /readyz 503 for ever, and nothing said why
                # With cold_start it serves v0 meanwhile (it said "not ready", then was ready at once).
                until = (
                    "it serves its cold start (v0) until a snapshot is published there"
                    if arm.cold_start is not None
                    else "not ready until a snapshot is published there"
                )
                log.warning(
                    "arm %s: its registry %s does not exist (yet): %s (arms[].registry)",
                    arm.name,
                    arm.registry,
                    until,
                )
            holder = ModelHolder()
            logger: ImpressionLogger | ProducerLogger | None = None
            if config.log.enabled and config.kafka.client == "confluent" and sink_factory is None:
                logger = confluent_logger(config, arm)
            elif config.log.enabled:
                if sink_factory is None:
                    sink_factory = kafka_sink_factory(config)
                logger = ImpressionLogger(
                    sink=sink_factory(arm),
                    encode=encode,
                    max_buffer=config.log.max_buffer,
                    batch_size=config.log.batch_size,
                    linger_s=config.log.linger_s,
                    max_record_bytes=config.log.max_record_bytes,
                    arm=arm.name,
                )
            self.arms[arm.name] = ArmRuntime(name=arm.name, holder=holder, logger=logger)
            if (arm.memory or arm.counters) is not None and samples_source_factory is None:
                samples_source_factory = kafka_samples_source_factory(config)
            if arm.memory is not None:
                assert samples_source_factory is not None
                source = samples_source_factory(arm, [arm.memory.samples_topic])
                feed = self.feeds[arm.name] = memory_feed(arm, holder, source)
                self.arms[arm.name].memory = feed.target
            if arm.counters is not None:
                assert samples_source_factory is not None
                source = samples_source_factory(arm, counters_topics(arm))
                feed = self.feeds[f"{arm.name} counters"] = counters_feed(arm, holder, source)
                self.arms[arm.name].counters = feed.target
            latest, load, versions = loader_factory(arm)
            counts = self.arms[arm.name].counters
            unusable = (
                None
                if counts is None
                else (lambda bundle, counts=counts: counts.refusal(bundle.featurizer.spec))
            )
            sources.append(ArmSource(arm.name, holder, latest, load, versions, unusable=unusable))
        self.router = ArmRouter([(a.name, a.weight) for a in config.arms], salt=config.salt)
        self.service = ScoringService(
            router=self.router, arms=self.arms, top_k=config.top_k, limits=config.limits
        )
        self.watcher = ReloadWatcher(sources=sources, interval_s=config.reload_interval_s)
        self.app = create_app(self.service)
        self.front = ScoreRoute(self.app, self.service)
        # The one metrics adapter serves the canonical registry (serve latency, reloads, impressions).
        from reloop.connectors.metrics.prometheus import metrics_asgi_app

        metrics = (
            metrics_asgi_app()
            if metrics_elsewhere is None
            else PlainTextResponse(metrics_elsewhere, status_code=404)  # an ASGI app, sent as it is
        )
        # A Route for the path itself: the mount alone answers /metrics with a redirect to /metrics/,
        # which Prometheus follows but a plain curl or a probe without redirects does not.
        self.app.router.routes.append(Route("/metrics", endpoint=_AsgiEndpoint(metrics)))
        self.app.mount("/metrics", metrics)
        from reloop.engine.serve.auth import BearerAuth, load_token

        self.token = load_token(config.auth_token_file, config.auth_token)  # a worker's own /metrics too
        self.asgi: Any = BearerAuth(self.front, self.token) if self.token else self.front
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> ServingStack:
        """Start the watcher and the loggers (not the HTTP server)."""
        import torch

        torch.set_num_threads(self.config.torch_threads)
        with contextlib.suppress(RuntimeError):  # settable once per process, before any parallel work
            torch.set_num_interop_threads(1)
        if self.config.gil_switch_interval_ms is not None:
            # A request that arrives while the reload watcher builds a new version waits for the GIL
            # up to the switch interval: Python's 5 ms cost the reload windows ~1 ms of p99.
            self._switch_interval_before = sys.getswitchinterval()
            sys.setswitchinterval(self.config.gil_switch_interval_ms / 1000)
        self.watcher.poll_once()
        self.watcher.start()
        for arm in self.arms.values():
            if arm.logger is not None:
                arm.logger.start()
        for feed in self.feeds.values():
            feed.start()
        self._wait_for_impression_logs()
        # After the model and the libraries are loaded: a full collection during serving then scans only
        # what serving allocated since, not the ~10^5 objects of torch, FastAPI and the model (tens of ms).
        freeze_live_objects()
        return self

    def _wait_for_impression_logs(self) -> None:
        """Serving starts once every counters feed that counts the impression log has caught up (module
        doc), or after ``FEED_OPEN_WAIT_S`` (a broker down at start, kafka-python taking 30 s to give up;
        a long backlog): said in a warning."""
        deadline = time.monotonic() + FEED_OPEN_WAIT_S
        for name, feed in self.feeds.items():
            if feed.shown_topic is None:
                continue
            if not feed.caught_up.wait(max(0.0, deadline - time.monotonic())):
                why = feed.problem or "broker down? a long backlog?"
                log.warning(
                    "%s: its feed (the samples topic and the impression log %s) is not read up to date "
                    "after %g s (%s); serving anyway: impressions not read yet are not in the counts it "
                    "serves",
                    name, feed.shown_topic, FEED_OPEN_WAIT_S, why,
                )  # fmt: skip

    def serve_in_thread(
        self, *, host: str | None = None, port: int | None = None, reuse_port: bool = False
    ) -> str:
        """Run uvicorn on a daemon thread; returns the base URL. Port 0 lets the OS pick a free port.

        The listening socket is made here with ``IPPROTO_TCP`` named: asyncio sets TCP_NODELAY only on
        connections accepted from such a socket, and without it every response waited ~40 ms for a
        delayed ACK (measured, docs/bench-serve.md). ``reuse_port`` sets SO_REUSEPORT so that several
        worker processes share one port (reloop.engine.serve.workers)."""
        import uvicorn

        host = host or self.config.host
        port = self.config.port if port is None else port
        sock = listen_socket(host, port, reuse_port=reuse_port)
        server = uvicorn.Server(
            uvicorn.Config(
                self.asgi,
                log_level="warning",
                access_log=False,
                http=_http_impl(
                    self.config.read_timeout_s,
                    lambda: count_failed(self.service, 408),
                    self.config.max_connections,
                    lambda: count_failed(self.service, 503),
                ),
                loop=_loop_impl(),
                timeout_keep_alive=self.config.keep_alive_s,
                backlog=2048,
            )
        )
        server.install_signal_handlers = lambda: None  # the owner of the process handles signals
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn"
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the scoring service did not start on {host}:{port}")
            time.sleep(0.02)
        self.port = int(sock.getsockname()[1])
        return http_url(host, self.port)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop serving and release everything within ``timeout_s`` (``serve.shutdown_timeout_s``) +
        ``CLOSE_SLACK_S``, whatever Kafka does (module doc)."""
        timeout = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout

        def left(most: float | None = None) -> float:
            remaining = max(0.0, deadline - time.monotonic())
            return remaining if most is None else min(most, remaining)

        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(left(_SERVER_STOP_S))
                if self._thread.is_alive():  # requests still in flight: cut them off
                    self._server.force_exit = True
                    self._thread.join(left(1.0))
        self.watcher.close(left(_WATCHER_STOP_S))
        self._close_all(deadline)
        gc.unfreeze()  # let the interpreter's exit clean up what freeze_live_objects() froze
        if self._switch_interval_before is not None:
            sys.setswitchinterval(self._switch_interval_before)
            self._switch_interval_before = None

    def _close_all(self, deadline: float) -> None:
        """Close every arm's impression logger and memory feed at once, each within what is left of the
        shutdown timeout: one after the other, 4 arms whose loggers each waited their flush timeout while
        Kafka was down took 40 s and more, past a pod's grace period (SIGKILL: what was left was never
        counted); one failing close must not skip the others, and one that hangs is left behind."""
        budget = max(0.0, deadline - time.monotonic())

        def close(name: str, what: str, closer: Callable[[], None]) -> None:
            try:
                closer()
            except Exception:  # noqa: BLE001 - the other arms' loggers still close
                log.exception("%s %s: close failed", what, name)

        jobs: list[tuple[str, str, Callable[[], None]]] = []
        for name, feed in self.feeds.items():
            jobs.append((name, "samples feed", lambda f=feed: f.close(timeout_s=budget)))
        for arm in self.arms.values():
            if arm.logger is not None:
                jobs.append((arm.name, "impression log", lambda lg=arm.logger: lg.close(timeout_s=budget)))
        threads = [
            threading.Thread(target=close, args=job, name=f"close-{job[1]}-{job[0]}", daemon=True)
            for job in jobs
        ]
        for t in threads:
            t.start()
        end = deadline + CLOSE_SLACK_S
        for t, (name, what, _) in zip(threads, jobs, strict=True):
            t.join(max(0.0, end - time.monotonic()))
            if t.is_alive():
                log.error("%s %s: still closing after the shutdown timeout; left behind", what, name)


class _AsgiEndpoint:
    """An ASGI app as a Route endpoint (Starlette calls a plain function with a Request instead)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
