"""``reloop deadletters`` without a broker to read from: one line and the exit code, within ``--timeout``;
bad options refused before anything is read."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from reloop.engine.runtime.cli import main

CONFIG = """kafka: {bootstrap: "127.0.0.1:1"}
sink: {dead_letter_topic: reloop.deadletter}
model:
  backbone: dcn
  spec: {fields: [{kind: categorical, name: user, buckets: 100}]}
"""


def test_an_unreachable_broker_is_one_line_within_the_timeout(tmp_path: Path, capsys) -> None:
    # It was a KafkaTimeoutError traceback after kafka-python's own 30 s, whatever --timeout said.
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    t0 = time.monotonic()
    assert main(["deadletters", "--config", str(config), "summary", "--timeout", "2"]) == 1
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("reloop deadletters: cannot read 'reloop.deadletter'")


def test_an_unknown_reason_is_refused_before_anything_is_read_or_committed(tmp_path: Path, capsys) -> None:
    # A typo (bad-feature) chose nothing, and `redrive --group` then committed the group past every
    # record read: the next `redrive --reason bad_feature --group ...` found none to send.
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    t0 = time.monotonic()
    argv = ["deadletters", "--config", str(config), "redrive", "--reason", "bad-feature", "--group", "g"]
    assert main([*argv, "--timeout", "20"]) == 2
    assert time.monotonic() - t0 < 10  # refused at once, not after failing to reach the broker
    err = capsys.readouterr().err
    assert "unknown --reason bad-feature" in err and "bad_feature" in err
    replay = tmp_path / "dead-letters.jsonl"
    replay.write_text("")
    assert main(["deadletters", "summary", "--file", str(replay), "--reason", "bad_feature,unlearnable"]) == 0
    assert main(["deadletters", "summary", "--file", str(replay), "--reason", "nope"]) == 2


@pytest.mark.parametrize(
    "option", [["--timeout", "0"], ["--timeout", "-1"], ["--limit", "-5"], ["--to", "not a topic!"]]
)
def test_options_out_of_range_are_usage_errors(tmp_path: Path, capsys, option: list[str]) -> None:
    # --timeout 0 said "Unable to bootstrap" (exit 1) of a reachable broker; --limit -5 showed nothing; a
    # --to Kafka refuses was a traceback after the whole dead-letter topic was read.
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    with pytest.raises(SystemExit) as exit_:
        main(["deadletters", "--config", str(config), "show", *option])
    assert exit_.value.code == 2
    assert f"argument {option[0]}" in capsys.readouterr().err


def test_a_file_that_holds_no_dead_letters_says_so(tmp_path: Path, capsys) -> None:
    # A YAML file or garbage said "0 of 0 dead letters" and exited 0.
    wrong = tmp_path / "run.yaml"
    wrong.write_text(CONFIG)
    assert main(["deadletters", "summary", "--file", str(wrong)]) == 2
    lines = len([x for x in CONFIG.splitlines() if x.strip()])
    assert f"{lines} line(s) under {wrong} are not dead letters" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["deadletters", "summary", "--file", str(empty)]) == 0  # a replay that refused nothing
    assert "0 of 0 dead letters" in capsys.readouterr().out


def test_a_summary_writes_control_characters_in_an_envelope_as_escapes(tmp_path: Path, capsys) -> None:
    # An envelope is anyone's to write (the topic, a file): its reason and topic reached the terminal raw,
    # escape sequences and a carriage return that overwrote the line included.
    import orjson

    letter = {"topic": "imp\x1b[2Jressions\r", "partition": 0, "offset": 1, "timestamp_ms": 0, "key": None,
              "value": {"encoding": "utf8", "data": "{}"}, "reason": "bad\x1b[31m_json",
              "detail": "x", "dead_lettered_at_ms": 0}  # fmt: skip
    path = tmp_path / "dead-letters.jsonl"
    path.write_bytes(orjson.dumps(letter) + b"\n")
    assert main(["deadletters", "summary", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out, repr(out)
    assert "bad\\x1b[31m_json" in out and "imp\\x1b[2Jressions\\r" in out, out


def test_show_escapes_invisible_and_reordering_characters_in_valid_json(tmp_path: Path, capsys) -> None:
    # orjson wrote U+202E (right-to-left override) and U+200B (zero-width space) raw: the terminal showed
    # text other than the envelope's.
    import orjson

    data = '{"id":"a\u202eb\u200bc", "é": 1}'
    letter = {"topic": "impressions", "partition": 0, "offset": 1, "timestamp_ms": 0, "key": None,
              "value": {"encoding": "utf8", "data": data}, "reason": "bad_json", "detail": "x",
              "dead_lettered_at_ms": 0}  # fmt: skip
    path = tmp_path / "dead-letters.jsonl"
    path.write_bytes(orjson.dumps(letter) + b"\n")
    assert main(["deadletters", "show", "--file", str(path)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert "\u202e" not in line and "\u200b" not in line and "\\u202e" in line and "é" in line, line
    assert orjson.loads(line)["value"]["data"] == data  # the same JSON


def test_a_summary_says_how_many_records_were_dead_lettered_again(tmp_path: Path, capsys) -> None:
    import orjson

    def letter(offset: int) -> bytes:
        return orjson.dumps({"topic": "impressions", "partition": 0, "offset": offset, "timestamp_ms": 0,
                             "key": None, "value": {"encoding": "utf8", "data": "{"}, "reason": "malformed",
                             "detail": "x", "dead_lettered_at_ms": 0})  # fmt: skip

    path = tmp_path / "dead-letters.jsonl"
    path.write_bytes(b"\n".join(letter(o) for o in (1, 2, 1, 2, 1)) + b"\n")
    assert main(["deadletters", "summary", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "from impressions (2 distinct records; the others dead-lettered again)" in out, out
