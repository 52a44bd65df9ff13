"""Reading dead letters back: what is there, and which can be sent again to the topic they came from.

Each dead letter is an envelope (engine/deadletter.py) holding the rejected record's topic, key,
timestamp and value byte for byte. Once the cause is fixed (a producer bug, a feature spec that now
takes the value, a topic limit raised), an operator re-sends the records of chosen reasons to their
input topic with ``reloop deadletters redrive``; the pipeline then reads them as new arrivals.

A dead letter cannot be re-sent when its envelope does not hold the record: a value truncated to fit
the dead-letter topic, a value that was not bytes, or a record that did not come from an input topic
(a samples message, a sample the model could not learn: its JSON is there to read, not to re-send).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from reloop.engine.deadletter import decode_raw


@dataclass(frozen=True)
class DeadLetter:
    """One envelope as read from the dead-letter topic, with where it was read."""

    envelope: dict[str, Any]
    partition: int
    offset: int

    @property
    def reason(self) -> str:
        return str(self.envelope.get("reason"))

    @property
    def topic(self) -> str | None:
        topic = self.envelope.get("topic")
        return topic if isinstance(topic, str) else None

    @property
    def origin(self) -> tuple[str, int, int, bytes] | None:
        """The refused record: its topic, partition, offset and content (key and value as the envelope
        holds them). One record dead-lettered again after a restart (the join resumes from its last
        checkpoint) has several letters of one origin; records of one place but other content (written
        by hand, or by a tool that numbers its own) stay apart."""
        topic, partition, offset = (self.envelope.get(k) for k in ("topic", "partition", "offset"))
        if isinstance(topic, str) and type(partition) is int and type(offset) is int:
            try:
                content = orjson.dumps(
                    [self.envelope.get("key"), self.envelope.get("value")], option=orjson.OPT_SORT_KEYS
                )
            except (TypeError, orjson.JSONEncodeError):  # (an integer past 64 bits): a letter of its own
                return None
            return topic, partition, offset, content
        return None


@dataclass(frozen=True)
class Resend:
    """A record to send again: the original key and value, to ``topic``."""

    topic: str
    key: bytes | None
    value: bytes
    timestamp_ms: int | None


def parse_envelope(value: bytes) -> dict[str, Any] | None:
    """The envelope in a dead-letter record, or None when the record is not one (another writer)."""
    try:
        envelope = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(envelope, dict) or "reason" not in envelope or "value" not in envelope:
        return None
    return envelope


def select(
    letters: Iterable[DeadLetter],
    *,
    reasons: Collection[str] = (),
    topics: Collection[str] = (),
    since_ms: int | None = None,
) -> list[DeadLetter]:
    """The dead letters with one of ``reasons`` (all when empty), from one of ``topics`` (all when empty),
    dead-lettered at or after ``since_ms``."""
    out = []
    for letter in letters:
        if reasons and letter.reason not in reasons:
            continue
        if topics and letter.topic not in topics:
            continue
        at = letter.envelope.get("dead_lettered_at_ms")
        if since_ms is not None and not (isinstance(at, int) and at >= since_ms):
            continue
        out.append(letter)
    return out


def summary(letters: Iterable[DeadLetter]) -> list[tuple[str, str, int, int]]:
    """(reason, origin topic, count, distinct records), most frequent first: a record dead-lettered
    again after a restart counts once among the distinct ones."""
    counts: Counter[tuple[str, str]] = Counter()
    origins: dict[tuple[str, str], set[object]] = {}
    for letter in letters:
        group = (letter.reason, letter.topic or "-")
        counts[group] += 1
        origins.setdefault(group, set()).add(letter.origin or object())  # no origin: its own
    return [(reason, topic, n, len(origins[reason, topic])) for (reason, topic), n in counts.most_common()]


def resend(
    letter: DeadLetter,
    *,
    inputs: Collection[str],
    to: str | None = None,
    keep_timestamp: bool = False,
) -> Resend | str:
    """The record to send again for ``letter``, or why it cannot be.

    It goes back to the topic it came from, which must be one of ``inputs`` (the pipeline's input
    topics), or to ``to`` when given. The record is stamped by the producer's clock unless
    ``keep_timestamp``: the join reads a re-sent record as a new arrival, and one stamped with its
    original time would merge as far behind the stream as it is old.
    """
    envelope = letter.envelope
    if envelope.get("truncated"):
        return "truncated: the envelope keeps only the first bytes of the value"
    target = to or letter.topic
    if target is None or (to is None and target not in inputs):
        return f"not from an input topic (from {letter.topic!r})"
    try:
        value = decode_raw(envelope.get("value"))
        key = decode_raw(envelope.get("key"))
    except (KeyError, TypeError, ValueError) as exc:
        return f"the envelope does not hold the record's bytes ({exc})"
    if value is None:
        return "the envelope has no value"
    stamp = envelope.get("timestamp_ms") if keep_timestamp else None
    kept = type(stamp) is int and 0 <= stamp < 2**63  # a Kafka timestamp is an int64
    return Resend(target, key, value, stamp if kept else None)
