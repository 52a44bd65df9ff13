"""Structured logs: one JSON object per line on stderr (time, level, logger, message, fields)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_json_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python's warnings (torch's sparse Adagrad warns at a train stage's first step) printed two raw lines
    # on stderr between the JSON ones: logged instead, as "py.warnings".
    logging.captureWarnings(True)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; keep ours readable.
    logging.getLogger("kafka").setLevel(logging.ERROR)


class ThrottledWarning:
    """A warning that a loop may hit at every step (each 100 ms while the broker is down): logged at most
    once every ``every_s``, with how many were left out since the last one ("suppressed")."""

    def __init__(
        self,
        logger: logging.Logger,
        msg: str,
        *,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._msg = msg
        self._every_s = every_s
        self._clock = clock
        self._next_at = float("-inf")
        self._suppressed = 0

    def __call__(self, **fields: Any) -> None:
        now = self._clock()
        if now < self._next_at:
            self._suppressed += 1
            return
        self._next_at = now + self._every_s
        if self._suppressed:
            fields["suppressed"], self._suppressed = self._suppressed, 0
        self._logger.warning(self._msg, extra={"fields": fields})
