"""``reloop deadletters`` without a broker to read from: one line and the exit code, within ``--timeout``."""

from __future__ import annotations

import time
from pathlib import Path

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
