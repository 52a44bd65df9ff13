"""The stage processes' stderr is JSON lines only: Python's warnings included."""

from __future__ import annotations

import logging
import subprocess
import sys

import orjson
import pytest

_CODE = """
import warnings
from reloop.engine.runtime.jsonlog import setup_json_logging
setup_json_logging("INFO")
warnings.warn("Sparse invariant checks are implicitly disabled", UserWarning)
"""


def test_a_warning_is_one_json_line() -> None:
    done = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    assert done.returncode == 0 and lines
    [record] = [orjson.loads(ln) for ln in lines]  # not JSON: raises
    assert record["logger"] == "py.warnings" and "Sparse invariant" in record["msg"]


@pytest.mark.parametrize(
    ("env", "fields"),
    [
        ({"RANK": "1", "WORLD_SIZE": "2"}, {"rank": 1, "ranks": 2}),
        ({"RANK": "0", "WORLD_SIZE": "1"}, {}),  # one process: nothing to tell apart
        ({}, {}),
        ({"RANK": "x", "WORLD_SIZE": "2"}, {}),
    ],
)
def test_a_data_parallel_rank_names_itself_on_every_line(monkeypatch, env, fields) -> None:
    # The supervisor's "waiting for a topic", "started" and "metrics" lines of two ranks were identical.
    import logging

    from reloop.engine.runtime import jsonlog

    monkeypatch.setattr(jsonlog, "_RANK", jsonlog._rank_fields(env))
    record = logging.LogRecord("reloop.supervisor", logging.WARNING, __file__, 1, "waiting", (), None)
    out = orjson.loads(jsonlog.JsonFormatter().format(record))
    assert {k: out[k] for k in ("rank", "ranks") if k in out} == fields
    record.fields = {"rank": 5}  # a line that names a rank itself keeps it
    assert orjson.loads(jsonlog.JsonFormatter().format(record))["rank"] == 5


_AUTO_CREATED = """
import logging
from reloop.engine.runtime.jsonlog import setup_json_logging
setup_json_logging("INFO")
for _ in range(2):  # the second within 10 s: throttled, whatever its level
    logging.getLogger("kafka.cluster").error("Topic %s not found in cluster metadata", "impressions")
logging.getLogger("kafka.net.manager").error("Connection failed: %s", "ECONNREFUSED")
"""


def test_kafka_pythons_error_for_a_topic_its_first_message_creates_is_a_warning() -> None:
    # A broker that auto-creates topics: the first impression sent logged an ERROR on the normal path.
    done = subprocess.run([sys.executable, "-c", _AUTO_CREATED], capture_output=True, text=True, timeout=60)
    records = [orjson.loads(ln) for ln in done.stderr.splitlines()]
    assert [(r["logger"], r["level"]) for r in records] == [
        ("kafka.cluster", "WARNING"),
        ("kafka.net.manager", "ERROR"),  # a real error stays one
    ]
    assert records[0]["msg"] == "Topic impressions not found in cluster metadata"


_CLOSED_UNDER_ITS_READER = """
import logging
from reloop.engine.runtime.jsonlog import setup_json_logging
setup_json_logging("INFO")
transport = logging.getLogger("kafka.net.transport")
for exc in (AttributeError("'NoneType' object has no attribute 'recv'"), ConnectionResetError(104, "reset")):
    try:
        raise exc
    except BaseException:
        transport.exception("%s: Error receiving network data closing socket", "<KafkaTCPTransport (closed)>")
"""


def test_kafka_pythons_traceback_of_a_read_from_a_socket_it_closed_is_left_out() -> None:
    # A clean SIGTERM (exit 0) logged an ERROR with kafka-python's traceback of its own close race.
    done = subprocess.run(
        [sys.executable, "-c", _CLOSED_UNDER_ITS_READER], capture_output=True, text=True, timeout=60
    )
    records = [orjson.loads(ln) for ln in done.stderr.splitlines()]
    assert len(records) == 1 and "ConnectionResetError" in records[0]["exc"]  # a real one stays


def test_plain_lines_carry_the_fields_after_the_message():
    # reloop serve's plain lines dropped them: "a request feature named like one the model reads but
    # not the same" named neither name.
    from reloop.engine.runtime.jsonlog import TextFormatter

    record = logging.LogRecord("reloop.engine.serve.service", logging.WARNING, "f", 1, "misnamed", (), None)
    record.fields = {"arm": "A", "misnamed": {"user-ID": "user_id"}}
    line = TextFormatter().format(record)
    assert line.endswith(
        ' WARNING reloop.engine.serve.service: misnamed {"arm":"A","misnamed":{"user-ID":"user_id"}}'
    )
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    first, *rest = TextFormatter().format(record).splitlines()
    assert first.endswith('{"user-ID":"user_id"}}') and rest[0] == "Traceback (most recent call last):"
