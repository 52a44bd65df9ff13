"""``reloop deadletters`` on the real broker: the dead-letter topic read back, and its records sent again
to the input topics they came from, byte for byte."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from reloop.connectors.kafka.admin import create_topics
from reloop.connectors.kafka.sink import KafkaSink
from reloop.connectors.kafka.source import KafkaSource
from reloop.engine.deadletter import TRUNCATED_VALUE_BYTES, DeadLetterSink
from reloop.engine.events.validation import EventError
from reloop.engine.streams import Record

from .test_run_kafka import _config, _now_ms, _topics

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]


def _cli(config: Path, *args: str, said: list[str] | None = None) -> str:
    """The command's stdout; its stderr appended to ``said``."""
    out = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "deadletters", *args, "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    if said is not None:
        said.append(out.stderr)
    return out.stdout


def _read(bootstrap: str, topic: str) -> list[Record]:
    """Every record on ``topic``: up to its end offsets, asked first (not a guess of how long to poll)."""
    source = KafkaSource(bootstrap=bootstrap, topics=[topic])
    try:
        source.open()
        ends = source.end_positions(timeout_s=30)
        out: list[Record] = []
        deadline = time.monotonic() + 60
        while any(source.position()[tp] < end for tp, end in ends.items()):
            assert time.monotonic() < deadline, f"{topic} not read to its end {ends}"
            out += source.poll(1000, 0.5)
        return out
    finally:
        source.close()


def test_dead_letters_are_summarised_and_sent_again_to_their_topics(kafka_broker, unique_topic, tmp_path):
    topics = _topics(unique_topic)
    create_topics(kafka_broker.bootstrap, {t: 1 for t in topics.values()})
    config = _config(tmp_path, kafka_broker.bootstrap, topics, "correct")
    feature = b'{"impression_id": "imp-1", "features": {"price": "abc"}}'
    binary = b"\xff\xfe\x00 a click that is not UTF-8"
    # Recent stamps: re-sent with --keep-timestamps, records stamped years ago would be the broker's to
    # delete at its next retention check (records' own timestamps decide time-based retention).
    t0 = _now_ms()
    dead = DeadLetterSink(
        KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topics["deadletter"]),
        max_envelope_bytes=4 * TRUNCATED_VALUE_BYTES,
    )
    for record, reason in (
        (Record(topics["impressions"], 0, 3, b"imp-1", feature, t0), "bad_feature"),
        (Record(topics["clicks"], 0, 9, b"imp-2", binary, t0 + 500), "malformed"),
        (Record(topics["impressions"], 0, 4, b"imp-3", b"x" * 20_000, t0 + 1_000), "oversized"),
        (Record(topics["samples"], 0, 1, b"imp-4", b'{"sample_id": 4}', t0 + 2_000), "unlearnable"),
    ):  # fmt: skip
        dead.send(record, EventError(reason, "test"))
    dead.close()
    stray = KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topics["deadletter"])
    stray.send(b"not an envelope")  # another producer's record on the topic: said, not silently skipped
    stray.close()

    lines = _cli(config, "summary").splitlines()
    assert lines[0].startswith("4 of 4 dead letters")
    said = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "deadletters", "summary", "--config",
         str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "1 record(s) on" in said.stderr and "are not dead letters" in said.stderr
    assert sorted(" ".join(ln.split()) for ln in lines[1:]) == sorted(
        [
            f"1 bad_feature from {topics['impressions']}",
            f"1 malformed from {topics['clicks']}",
            f"1 oversized from {topics['impressions']}",
            f"1 unlearnable from {topics['samples']}",
        ]
    )
    shown = orjson.loads(_cli(config, "show", "--reason", "malformed", "--limit", "1"))
    assert shown["reason"] == "malformed"
    # The refused record's place (clicks partition 0, offset 9) and the letter's own (the second on the
    # dead-letter topic); the letter's overwrote the record's.
    assert (shown["partition"], shown["offset"]) == (0, 9)
    assert (shown["dead_letter_partition"], shown["dead_letter_offset"]) == (0, 1)

    out = _cli(config, "redrive", "--dry-run")
    assert f"would send 1 record(s) to '{topics['impressions']}'" in out
    assert "not sent: 1 (oversized: truncated" in out and "not sent: 1 (unlearnable: not from an input" in out
    assert _read(kafka_broker.bootstrap, topics["impressions"]) == []

    warned: list[str] = []
    out = _cli(config, "redrive", "--reason", "bad_feature,malformed", "--keep-timestamps", said=warned)
    assert f"sent 1 record(s) to '{topics['impressions']}'" in out and "not sent" not in out
    assert "no --group: nothing remembered; a later redrive sends these again" in warned[0]
    [imp] = _read(kafka_broker.bootstrap, topics["impressions"])
    assert (imp.key, imp.value, imp.timestamp_ms) == (b"imp-1", feature, t0)
    [click] = _read(kafka_broker.bootstrap, topics["clicks"])
    assert (click.key, click.value, click.timestamp_ms) == (b"imp-2", binary, t0 + 500)


def test_a_redrive_with_a_group_sends_only_the_dead_letters_written_since_its_last_one(
    kafka_broker, unique_topic, tmp_path
):
    topics = _topics(unique_topic)
    create_topics(kafka_broker.bootstrap, {t: 1 for t in topics.values()})
    config = _config(tmp_path, kafka_broker.bootstrap, topics, "correct")
    t0 = _now_ms()

    def dead_letter(*ids: str) -> None:
        dead = DeadLetterSink(KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topics["deadletter"]))
        for i in ids:
            record = Record(
                topics["impressions"], 0, 1, i.encode(), b'{"impression_id": "%s"}' % i.encode(), t0
            )
            dead.send(record, EventError("bad_feature", "test"))
        dead.close()

    group = f"{unique_topic}-redrive"
    dead_letter("imp-1", "imp-2")
    # An --origin no letter came from and the config does not name (a typo) chose nothing, and the
    # redrive committed the group past both letters: the redrive meant then found none to send.
    typo = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "deadletters", "redrive", "--group", group,
         "--origin", topics["impressions"] + "x", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert typo.returncode == 2, typo.stderr[-3000:]
    assert f"--origin {topics['impressions']}x: no dead letter read came from it" in typo.stderr
    assert f"origins read: {topics['impressions']}; nothing done" in typo.stderr
    assert _cli(config, "summary", "--group", group).startswith("2 of 2 dead letters")  # nothing committed
    assert _cli(config, "summary", "--origin", topics["clicks"]).startswith("0 of 2")  # the config's topic
    assert _cli(config, "redrive", "--group", group, "--dry-run").count("would send 2 record(s)") == 1
    warned: list[str] = []
    out = _cli(config, "redrive", "--group", group, said=warned)
    assert "sent 2 record(s)" in out and f"committed group '{group}' at 2 record(s) read" in out
    assert "no --group" not in warned[0]
    # A dry run commits nothing, a redrive with the group then sends nothing again; without it, all.
    out = _cli(config, "redrive", "--group", group)
    assert "sent" not in out.replace("committed", "") and "at 0 record(s) read" in out
    assert _cli(config, "summary", "--group", group).startswith("0 of 0 dead letters")
    assert "would send 2 record(s)" in _cli(config, "redrive", "--dry-run")

    dead_letter("imp-3")
    assert _cli(config, "summary", "--group", group).startswith("1 of 1 dead letters")
    assert "sent 1 record(s)" in _cli(config, "redrive", "--group", group)
    sent = [r.key for r in _read(kafka_broker.bootstrap, topics["impressions"])]
    assert sent == [b"imp-1", b"imp-2", b"imp-3"]


def test_a_record_dead_lettered_again_after_a_restart_is_summarised_and_sent_once(
    kafka_broker, unique_topic, tmp_path
):
    # A join stage rebuilt from its last checkpoint dead-letters what it reads again: the summary said
    # "10 oversized" for 2 records, and a redrive sent each as often as it was dead-lettered.
    topics = _topics(unique_topic)
    create_topics(kafka_broker.bootstrap, {t: 1 for t in topics.values()})
    config = _config(tmp_path, kafka_broker.bootstrap, topics, "correct")
    t0 = _now_ms()
    dead = DeadLetterSink(KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topics["deadletter"]))
    for _ in range(3):  # three incarnations of the join stage
        for offset, key in ((5, b"imp-5"), (6, b"imp-6")):
            value = b'{"impression_id": "%s", "features": 1}' % key
            dead.send(
                Record(topics["impressions"], 0, offset, key, value, t0), EventError("bad_feature", "t")
            )
    dead.close()
    lines = _cli(config, "summary").splitlines()
    assert lines[0].startswith("6 of 6 dead letters")
    assert "(2 distinct records; the others dead-lettered again)" in lines[1]
    out = _cli(config, "redrive")
    assert f"sent 2 record(s) to '{topics['impressions']}'" in out
    assert "not sent: 4 (a copy of a record chosen already: dead-lettered again after a restart)" in out
    assert [r.key for r in _read(kafka_broker.bootstrap, topics["impressions"])] == [b"imp-5", b"imp-6"]


def test_a_redrive_that_fails_to_send_says_so_in_one_line_and_commits_nothing(
    kafka_broker, unique_topic, tmp_path
):
    # A record the target topic refuses (or a broker gone) ended the redrive with a traceback.
    topics = _topics(unique_topic)
    create_topics(kafka_broker.bootstrap, {t: 1 for t in topics.values()})
    small = unique_topic("small")
    create_topics(kafka_broker.bootstrap, {small: 1}, configs={"max.message.bytes": "20"})
    config = _config(tmp_path, kafka_broker.bootstrap, topics, "correct")
    dead = DeadLetterSink(KafkaSink(bootstrap=kafka_broker.bootstrap, topic=topics["deadletter"]))
    record = Record(
        topics["impressions"],
        0,
        1,
        b"imp-1",
        b'{"impression_id": "imp-1", "x": "%s"}' % (b"y" * 100),
        _now_ms(),
    )
    dead.send(record, EventError("bad_feature", "test"))
    dead.close()
    group = unique_topic("redrive")
    args = [
        "deadletters",
        "redrive",
        "--config",
        str(config),
        "--to",
        small,
        "--group",
        group,
        "--timeout",
        "20",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("reloop deadletters: redrive failed after") and "not committed" in line
    assert _cli(config, "summary", "--group", group).startswith("1 of 1 dead letters")
    bad_to = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "deadletters", "redrive", "--config", str(config),
         "--to", "not a topic!"], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad_to.returncode == 2 and "--to" in bad_to.stderr
    # A --to naming no topic (a typo): the producer created it, sent there, and the group was committed.
    typo = unique_topic("typo")
    missing = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "deadletters", "redrive", "--config", str(config),
         "--to", typo, "--group", group, "--timeout", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2 and f"no topic {typo!r}" in missing.stderr, missing.stderr
    assert "nothing committed" in missing.stderr
    assert _cli(config, "summary", "--group", group).startswith("1 of 1 dead letters")
    from reloop.connectors.kafka.admin import admin_client

    admin = admin_client(kafka_broker.bootstrap)
    try:
        assert typo not in admin.list_topics()
    finally:
        admin.close()
    # The config's dead-letter topic missing: one line, no traceback.
    gone = tmp_path / "gone.yaml"
    gone.write_text(config.read_text().replace(topics["deadletter"], unique_topic("no-such-dlq")))
    no_dlq = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "deadletters", "summary", "--config", str(gone)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert no_dlq.returncode == 2 and "Traceback" not in no_dlq.stderr
    assert "sink.dead_letter_topic" in no_dlq.stderr
