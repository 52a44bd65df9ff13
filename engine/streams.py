"""The seam between the engine and the outside world: Source and Sink protocols.

A source delivers records from one or more (topic, partition) pairs. Its position is, per pair,
the offset of the NEXT record it will deliver, so a snapshot taken after processing a batch
resumes exactly after that batch (bytewax's convention).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple, Protocol, runtime_checkable


class TopicPartition(NamedTuple):
    topic: str
    partition: int


Positions = dict[TopicPartition, int]


@dataclass(frozen=True, slots=True)
class PartitionShare:
    """The partitions one of ``count`` readers owns: partition p goes to reader ``p % count`` (the
    data-parallel train ranks split the samples topic this way; every rank computes the same split)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"reader {self.index} of {self.count} does not exist")

    def owns(self, tp: TopicPartition) -> bool:
        return tp.partition % self.count == self.index


class Record(NamedTuple):
    """One record as a source delivers it. A named tuple (immutable, like the topic's record) rather
    than a frozen dataclass: built once per consumed record, it costs ~0.26 us against ~0.74 us."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


@runtime_checkable
class Source(Protocol):
    def partitions(self) -> list[TopicPartition]:
        """All (topic, partition) pairs this source reads."""
        ...

    def open(self, positions: Mapping[TopicPartition, int] | None = None) -> None:
        """Start reading; pairs missing from ``positions`` start at their beginning."""
        ...

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` records; an empty list when idle, after at most ``timeout_s``."""
        ...

    def position(self) -> Positions:
        """Per pair, the offset of the next record ``poll`` will return."""
        ...

    def close(self) -> None:
        """Release resources; calling it twice is harmless."""
        ...


# C-level getters for the per-record hot paths. ``record_partition(r)`` is a plain (topic, partition)
# tuple, equal to and hashed as ``TopicPartition(r.topic, r.partition)``: it finds a partition's entries
# in a dict keyed by TopicPartition without building a named tuple per record.
record_partition = itemgetter(0, 1)
record_offset = itemgetter(2)


class MissingTopic(RuntimeError):
    """The topic a new one copies its partition count from does not exist (yet)."""

    def __init__(self, like: str, topic: str) -> None:
        super().__init__(
            f"topic {like!r} does not exist; {topic!r} is created with as many partitions as it has "
            "(create the input topics first: reloop kafka topics --config FILE; or check "
            "source.impressions_topic)"
        )


class ReplicationRefused(ValueError):
    """The cluster cannot hold the replication factor a topic is created with (fewer brokers than it
    asks): refused again at every try, a setting to change (``kafka.replication_factor``)."""


class TopicNotFound(ValueError):
    """A topic a source reads does not exist (yet): the stage is rebuilt after a backoff, which waits
    for it (the train stage started before the join stage has created the samples topic)."""


class AuthenticationFailed(RuntimeError):
    """The Kafka cluster refused the client's login (SASL: a wrong user, password or mechanism). The same
    credentials will be refused again, so this is not retried like an outage: the stage exits 2 with this
    message, and an orchestrator's restart picks up credentials that were rotated since."""

    def __init__(self, bootstrap: str, reason: str) -> None:
        super().__init__(
            f"the Kafka cluster at {bootstrap} refused the login ({reason}); check kafka.security_protocol, "
            "kafka.sasl_mechanism, kafka.sasl_username and kafka.sasl_password"
        )


class TlsRefused(AuthenticationFailed):
    """The TLS handshake with the Kafka cluster failed on its certificates or keys: the broker's certificate
    not signed by the CA given or not for the host name, the client's certificate refused, an SSL file that
    cannot be read. Not an outage (the clients themselves report it as one and keep retrying): the same
    files fail again, so it exits 2 like a refused login."""

    def __init__(self, bootstrap: str, reason: str) -> None:
        RuntimeError.__init__(
            self,
            f"TLS with the Kafka cluster at {bootstrap} failed ({reason}); check kafka.security_protocol, "
            "kafka.ssl_cafile (the CA that signed the broker's certificate), the host names in "
            "kafka.bootstrap and the advertised listeners (the certificate must name them; "
            "kafka.client_config: ssl_check_hostname, librdkafka's ssl.endpoint.identification.algorithm) "
            "and, for a client certificate, kafka.ssl_certfile, kafka.ssl_keyfile and kafka.ssl_key_password",
        )


class RecordTooLarge(ValueError):
    """A sink refused ONE record for its size (the sink itself still works): the caller dead-letters it."""


@runtime_checkable
class Sink(Protocol):
    def send(self, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None) -> None:
        """Queue one record (may return before it is durable). Raises ``RecordTooLarge`` for a record
        the sink can never deliver because of its size; any other error is about the sink. Sinks that
        can address partitions also take ``partition=`` (the key then does not choose it)."""
        ...

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every queued record is durable."""
        ...

    def close(self, timeout_s: float | None = None) -> None:
        """Flush and release resources; calling it twice is harmless. ``timeout_s`` bounds the wait for
        delivery: what is still undelivered then is given up and the sink raises, saying how many
        records (``undelivered`` on the error where it can count them); None waits as long as the sink
        itself retries. A sink that never waits ignores it."""
        ...


def positions_to_json(positions: Mapping[TopicPartition, int]) -> dict[str, int]:
    return {f"{tp.topic}:{tp.partition}": offset for tp, offset in sorted(positions.items())}


def positions_from_json(data: Mapping[str, int]) -> Positions:
    out: Positions = {}
    for key, offset in data.items():
        topic, _, partition = key.rpartition(":")
        out[TopicPartition(topic, int(partition))] = int(offset)
    return out


def merge_ends(source: object) -> Positions | None:
    """The log ends a merge compares positions with: None for a source that cannot tell (no
    ``end_positions``). A source that also has ``fetched_ends`` (the ends its last fetch responses
    reported: the Kafka sources) answers from it when it knows every partition, with no round trip to the
    broker; otherwise ``end_positions()`` asks. Raises what they raise. A stall check or a lag metric
    wants the broker's answer now and calls ``end_positions`` itself."""
    fetched = getattr(source, "fetched_ends", None)
    if fetched is not None:
        ends = fetched()
        if ends is not None:
            return dict(ends)
    end = getattr(source, "end_positions", None)
    return None if end is None else dict(end())
