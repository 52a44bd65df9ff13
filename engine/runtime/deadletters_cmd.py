"""``reloop deadletters --config FILE {summary,show,redrive}``: read the dead-letter topic back.

* ``summary``: how many dead letters per reason and origin topic;
* ``show``: the envelopes themselves, one JSON object per line (``--limit``), each with where it lies
  on the dead-letter topic (``dead_letter_partition``, ``dead_letter_offset``; its ``partition`` and
  ``offset`` are the refused record's);
* ``redrive``: send the records of the chosen dead letters again to the input topic they came from
  (original key and value; engine/deadletter_review.py says which cannot be), once their cause is
  fixed. ``--dry-run`` says what it would send.

``summary`` and ``show`` also read the JSONL dead letters a replay writes (``--file OUT/dead-letters``,
a folder or one ``.jsonl`` file; no ``--config`` needed); a replayed log's records are not re-sent to
live topics: fix the cause and replay again.

Each reads the dead-letter topic from its oldest record up to its end when the command starts, and
filters by ``--reason``, ``--origin`` and ``--since-ms`` (when it was dead-lettered). The connection is
the run config's (``kafka``, secrets included), through kafka-python.

``--group NAME`` remembers, as Kafka consumers do: each action reads from the group's committed offsets
(the oldest record where it has none), and a redrive commits the offsets it read up to once every record
it sent is delivered, so the next redrive with that group takes only dead letters written since. The
commit covers every record read, chosen by the filters or not: keep one group per filter. A redrive
that fails between its sends and its commit sends those records again next time (at least once; the
joiner drops an impression it still holds or remembers, ``join.retention_ms``). Without ``--group``
nothing is remembered and a second redrive sends the same records again.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from reloop.engine.config_common import int_at_least, positive_float
from reloop.engine.deadletter_review import DeadLetter, Resend, parse_envelope, resend, select, summary
from reloop.engine.runtime.config import ConfigError, RunConfig, load_config
from reloop.engine.runtime.dead_letter_reasons import KNOWN_REASONS
from reloop.engine.streams import Positions, TopicNotFound

if TYPE_CHECKING:
    from reloop.connectors.kafka.source import KafkaSource


# A --reason outside KNOWN_REASONS is a typo that chooses nothing; with --group a redrive would still
# commit past every record read, and the letters meant were never sent.


def _topic(text: str) -> str:
    """A name Kafka accepts for a topic: the producer refused any other only after the whole dead-letter
    topic was read, with a traceback."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", text) or text in {".", ".."}:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Kafka topic name (ASCII letters, digits, '.', '_', '-')"
        )
    return text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("summary", "show", "redrive"), help="what to do")
    parser.add_argument("--config", help="YAML or TOML run config (RELOOP__* env overrides)")
    parser.add_argument(
        "--file",
        type=Path,
        default=None,
        help="summary/show: read the JSONL dead letters `reloop replay` wrote (OUT/dead-letters, a folder "
        "or one .jsonl file) instead of the dead-letter topic",
    )
    parser.add_argument("--reason", default="", help="comma list of reasons (default: every reason)")
    parser.add_argument("--origin", default="", help="comma list of origin topics (default: every topic)")
    parser.add_argument("--since-ms", type=int, default=None, help="dead-lettered at or after (epoch ms)")
    parser.add_argument("--limit", type=int_at_least(0), default=20, help="show: at most this many envelopes")
    parser.add_argument(
        "--to", type=_topic, default=None, help="redrive: this topic instead of each record's own"
    )
    parser.add_argument(
        "--keep-timestamps",
        action="store_true",
        help="redrive: keep each record's original timestamp (default: stamped when sent; a record older "
        "than the topic's retention.ms may be deleted by the broker before it is read)",
    )
    parser.add_argument("--dry-run", action="store_true", help="redrive: only say what it would send")
    parser.add_argument(
        "--group",
        default=None,
        help="read from this consumer group's committed offsets; redrive commits what it read once its "
        "records are delivered (the offsets cover every record read, chosen by the filters or not)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=30.0, help="seconds without a record read before giving up"
    )


def main(args: argparse.Namespace) -> int:
    unknown = sorted(_names(args.reason) - KNOWN_REASONS)
    if unknown:
        print(f"reloop deadletters: unknown --reason {', '.join(unknown)} (the reasons: "
              f"{', '.join(sorted(KNOWN_REASONS))})", file=sys.stderr, flush=True)  # fmt: skip
        return 2
    if args.file is not None:
        return _from_file(args)
    if args.config is None:
        print("reloop deadletters: --config (the run config) or --file (a replay's dead letters) is required",
              file=sys.stderr, flush=True)  # fmt: skip
        return 2
    try:
        cfg = load_config(args.config)
        if not cfg.sink.dead_letter_topic:
            raise ConfigError("sink.dead_letter_topic is not set: there is no dead-letter topic to read")
        connection = cfg.kafka.connection("kafka-python")
    except ConfigError as exc:
        print(f"reloop deadletters: {exc}", file=sys.stderr, flush=True)
        return 2
    reached: Positions = {}
    others = [0]  # records on the topic that are not envelopes
    tally = _Tally()  # filtered as read: only the chosen envelopes are held

    from reloop.connectors.kafka.source import CLIENT_ERRORS  # the command reads through kafka-python

    try:
        chosen = select(
            tally.count(
                read_dead_letters(
                    cfg, connection, timeout_s=args.timeout, group=args.group, reached=reached, others=others
                )
            ),
            reasons=_names(args.reason),
            topics=_names(args.origin),
            since_ms=args.since_ms,
        )
    except (*CLIENT_ERRORS, TimeoutError, OSError) as exc:  # an unreachable broker, refused credentials
        topic = cfg.sink.dead_letter_topic
        print(f"reloop deadletters: cannot read {topic!r}: {exc!r}", file=sys.stderr, flush=True)
        return 1
    except TopicNotFound as exc:  # was a traceback
        print(f"reloop deadletters: {exc} (sink.dead_letter_topic)", file=sys.stderr, flush=True)
        return 2
    if not tally.origins_known(args, {cfg.source.impressions_topic, cfg.source.clicks_topic,
                                      cfg.stages.samples_topic}):  # fmt: skip
        return 2
    if others[0]:  # skipped without a word, and a redrive --group committed past them
        print(
            f"reloop deadletters: {others[0]} record(s) on {cfg.sink.dead_letter_topic!r} are not dead "
            "letters (not reloop's envelopes): left out",
            file=sys.stderr,
            flush=True,
        )
    if args.action != "redrive":
        after = f" after group {args.group!r}'s offsets" if args.group else ""
        return _report(args, chosen, f"{tally.read} dead letters on {cfg.sink.dead_letter_topic!r}{after}")
    sent = [0]
    try:
        code = _redrive(cfg, connection, chosen, args, sent)
    except Exception as exc:  # noqa: BLE001 - a refused record, a broker gone: one line, nothing committed
        group = (
            f"; group {args.group!r} not committed: the next redrive sends them again" if args.group else ""
        )
        print(f"reloop deadletters: redrive failed after {sent[0]} record(s) handed to the producer: "
              f"{exc!r:.500}{group}", file=sys.stderr, flush=True)  # fmt: skip
        return 1
    if code:
        return code
    if not args.group and not args.dry_run and sent[0]:
        # Each redrive without a group reads the topic from its start: what it sent, and what is refused
        # again (a new dead letter), would be sent once more by the next one.
        print("reloop deadletters: no --group: nothing remembered; a later redrive sends these again, and "
              "records refused again come back as new dead letters (--group NAME sends only what is new)",
              file=sys.stderr, flush=True)  # fmt: skip
    if args.group and not args.dry_run:
        # Only now: every record sent is delivered (the sinks' close flushed them, or raised).
        _commit(cfg, connection, args.group, reached)
        print(f"committed group {args.group!r} at {tally.read} record(s) read")
    return code


# Characters a terminal draws as nothing or uses to reorder text (zero-width, bidirectional overrides):
# orjson writes them raw, and JSON may carry them escaped instead (\uXXXX), the line meaning the same.
_INVISIBLE = re.compile("[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _printable(text: object) -> str:
    """``text`` with its control characters (ESC, CR ...) written as escapes."""
    s = str(text)
    return s if s.isprintable() else s.encode("unicode_escape").decode("ascii")


def _report(args: argparse.Namespace, chosen: list[DeadLetter], read: str) -> int:
    """``summary`` or ``show`` of the chosen letters; ``read`` says how many were read, from where."""
    if args.action == "summary":
        print(f"{len(chosen)} of {read}")
        for reason, topic, n, distinct in summary(chosen):
            # As text the file gave them: control characters escaped (an envelope is anyone's to write,
            # and an escape sequence reached the terminal raw).
            again = f" ({distinct} distinct records; the others dead-lettered again)" if distinct < n else ""
            print(f"{n:>10}  {_printable(reason):<24} from {_printable(topic)}{again}")
        return 0
    for letter in chosen[: max(0, args.limit)]:
        # The envelope's partition and offset are the refused record's; the letter's own go apart.
        line = {**letter.envelope, "dead_letter_partition": letter.partition,
                "dead_letter_offset": letter.offset}  # fmt: skip
        sys.stdout.write(_INVISIBLE.sub(_json_escape, orjson.dumps(line).decode()) + "\n")
    return 0


def _from_file(args: argparse.Namespace) -> int:
    """``summary`` / ``show`` of the JSONL dead letters a replay wrote."""
    refused = {"redrive": "redrive sends to live topics; a replay's refused records are replayed again once "
               "their cause is fixed", "group": "--group remembers offsets of the dead-letter topic, not of "
               "files"}  # fmt: skip
    why = refused["redrive"] if args.action == "redrive" else refused["group"] if args.group else None
    if why is None and not args.file.exists():
        why = f"{args.file} does not exist"
    if why is not None:
        print(f"reloop deadletters --file: {why}", file=sys.stderr, flush=True)
        return 2
    files = sorted(args.file.rglob("*.jsonl")) if args.file.is_dir() else [args.file]
    tally = _Tally()
    others = [0]
    try:
        chosen = select(
            tally.count(read_dead_letter_files(files, others)),
            reasons=_names(args.reason),
            topics=_names(args.origin),
            since_ms=args.since_ms,
        )
    except OSError as exc:
        print(f"reloop deadletters: cannot read {args.file}: {exc}", file=sys.stderr, flush=True)
        return 2
    if others[0]:  # not a dead-letter file: "0 of 0 dead letters" and exit 0 said nothing was wrong
        print(
            f"reloop deadletters --file: {others[0]} line(s) under {args.file} are not dead letters "
            "(a replay writes them under OUT/dead-letters)",
            file=sys.stderr,
            flush=True,
        )
        if not tally.read:
            return 2
    if not tally.origins_known(args, set()):
        return 2
    return _report(args, chosen, f"{tally.read} dead letters in {len(files)} file(s) under {args.file}")


class _Tally:
    """How many dead letters were read, and from which origin topics."""

    def __init__(self) -> None:
        self.read = 0
        self.origins: set[str] = set()

    def count(self, letters: Iterable[DeadLetter]) -> Iterator[DeadLetter]:
        for letter in letters:
            self.read += 1
            if letter.topic is not None:
                self.origins.add(letter.topic)
            yield letter

    def origins_known(self, args: argparse.Namespace, topics: set[str]) -> bool:
        """False, with a line on stderr, when an ``--origin`` is neither one of the config's ``topics``
        nor the origin of any dead letter read: a typo that chose nothing, after which a redrive with
        ``--group`` committed past every record read and the letters meant were never sent."""
        unknown = sorted(_names(args.origin) - topics - self.origins)
        if not unknown:
            return True
        config = f", nor is it a topic of the config ({', '.join(sorted(topics))})" if topics else ""
        print(f"reloop deadletters: --origin {', '.join(unknown)}: no dead letter read came from it{config}; "
              f"origins read: {', '.join(sorted(self.origins)) or 'none'}; nothing done",
              file=sys.stderr, flush=True)  # fmt: skip
        return False


def read_dead_letter_files(files: Iterable[Path], others: list[int] | None = None) -> Iterator[DeadLetter]:
    """The envelopes of JSONL dead-letter files (``partition-NNNNN.jsonl``: the partition from the
    name, else 0; the offset is the line index, as the JSONL source numbers them). ``others[0]`` counts
    the non-empty lines that are not dead-letter envelopes."""
    for path in files:
        match = re.fullmatch(r"partition-(\d+)\.jsonl", path.name)
        partition = int(match.group(1)) if match else 0
        with open(path, "rb") as handle:
            for offset, line in enumerate(handle):
                envelope = parse_envelope(line.rstrip(b"\r\n"))
                if envelope is not None:
                    yield DeadLetter(envelope, partition, offset)
                elif others is not None and line.strip():
                    others[0] += 1


def _redrive(
    cfg: RunConfig, connection: dict, chosen: list[DeadLetter], args: argparse.Namespace, sent_now: list[int]
) -> int:
    inputs = {cfg.source.impressions_topic, cfg.source.clicks_topic}
    plans: list[Resend] = []
    refused: Counter[str] = Counter()
    origins: set[tuple[str, int, int, bytes]] = set()
    for letter in chosen:
        # A record dead-lettered again after a restart: sent once (the join would take a second copy of
        # an impression as a duplicate, of a click after its window as a late click).
        if letter.origin is not None:
            if letter.origin in origins:
                refused["a copy of a record chosen already: dead-lettered again after a restart"] += 1
                continue
            origins.add(letter.origin)
        plan = resend(letter, inputs=inputs, to=args.to, keep_timestamp=args.keep_timestamps)
        if isinstance(plan, str):
            refused[f"{letter.reason}: {plan}"] += 1
        else:
            plans.append(plan)
    sent = Counter(plan.topic for plan in plans)
    missing = _missing_topics(cfg, connection, set(sent))
    if missing:  # a typo in --to: the producer created the topic, sent there and the group was committed
        print(
            f"reloop deadletters: redrive refused: no topic {', '.join(map(repr, missing))} on "
            f"{cfg.kafka.bootstrap} (--to?); nothing sent, nothing committed",
            file=sys.stderr,
            flush=True,
        )
        return 2
    verb = "would send" if args.dry_run else "sent"
    if plans and not args.dry_run:
        _send(cfg, connection, plans, sent_now)
    for topic, n in sorted(sent.items()):
        print(f"{verb} {n} record(s) to {topic!r}")
    for why, n in refused.most_common():
        print(f"not sent: {n} ({why})")
    if not chosen:
        print("no dead letter chosen: nothing to send")
    return 0


def read_dead_letters(
    cfg: RunConfig,
    connection: dict,
    *,
    timeout_s: float,
    group: str | None = None,
    reached: Positions | None = None,
    others: list[int] | None = None,
) -> Iterator[DeadLetter]:
    """Every envelope on the dead-letter topic, from ``group``'s committed offsets (else its oldest
    record) to its end now, as read; ``reached`` gets the positions read up to once it is all read,
    ``others[0]`` how many records were not envelopes."""
    # --timeout bounds the bootstrap too (kafka-python waits 30 s for an unreachable broker otherwise).
    bounded = {"bootstrap_timeout_ms": max(1, int(timeout_s * 1000)), **connection}
    source = _dead_letter_source(cfg, bounded, group)
    try:
        source.open(source.committed() if group else None)
        ends = source.end_positions(timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        while any(source.position()[tp] < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading the dead-letter topic made no progress for {timeout_s} s")
            records = source.poll(1000, 0.5)
            if records:
                deadline = time.monotonic() + timeout_s
            for record in records:
                envelope = parse_envelope(record.value)
                if envelope is not None:
                    yield DeadLetter(envelope, record.partition, record.offset)
                elif others is not None:
                    others[0] += 1
        if reached is not None:
            reached.update(source.position())
    finally:
        source.close()


def _dead_letter_source(cfg: RunConfig, connection: dict, group: str | None) -> KafkaSource:
    from reloop.connectors.kafka.source import KafkaSource

    return KafkaSource(
        bootstrap=cfg.kafka.bootstrap,
        topics=[cfg.sink.dead_letter_topic],
        group_id=group,
        client_config=connection,
    )


def _commit(cfg: RunConfig, connection: dict, group: str, positions: Positions) -> None:
    source = _dead_letter_source(cfg, connection, group)
    try:
        source.commit(positions, timeout_s=30)
    finally:
        source.close()


def _send(cfg: RunConfig, connection: dict, plans: list[Resend], sent: list[int]) -> None:
    from reloop.connectors.kafka.sink import KafkaSink

    sinks: dict[str, KafkaSink] = {}
    try:
        for plan in plans:
            if plan.topic not in sinks:
                sinks[plan.topic] = KafkaSink(
                    bootstrap=cfg.kafka.bootstrap, topic=plan.topic, client_config=connection
                )
            sinks[plan.topic].send(plan.value, key=plan.key, timestamp_ms=plan.timestamp_ms)
            sent[0] += 1
    finally:
        for sink in sinks.values():
            sink.close()  # flushes: raises when a record was not delivered


def _missing_topics(cfg: RunConfig, connection: dict, topics: set[str]) -> list[str]:
    """The topics of ``topics`` the cluster does not have (asked without creating any)."""
    from reloop.connectors.kafka.source import KafkaSource

    missing = []
    for topic in sorted(topics):
        probe = KafkaSource(
            bootstrap=cfg.kafka.bootstrap, topics=[topic], group_id=None, client_config=connection
        )
        try:
            probe.partitions()
        except TopicNotFound:
            missing.append(topic)
        finally:
            probe.close()
    return missing


def _names(text: str) -> set[str]:
    return {name.strip() for name in text.split(",") if name.strip()}
