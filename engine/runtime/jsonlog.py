"""Structured logs: one JSON object per line on stderr (time, level, logger, message, fields)."""

from __future__ import annotations

import logging
import os
import sys
import threading
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
        for key, value in _RANK.items():  # a data-parallel rank says which on every line (supervisor too)
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """Plain lines for a person at a terminal (``reloop serve``, ``simulate``, ``demo``), with the record's
    fields as JSON after the message: a warning's fields (which feature names were misspelt, which
    arm) were dropped from these lines, leaving a warning that named nothing."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if not isinstance(fields, dict) or not fields:
            return line
        head, sep, rest = line.partition("\n")  # a traceback stays below the message and its fields
        return f"{head} {orjson.dumps(fields, default=str).decode()}{sep}{rest}"


def setup_text_logging(level: int | str = logging.INFO) -> None:
    """Plain lines on stderr (``TextFormatter``) for a process that logs through the root logger."""
    logging.basicConfig(level=level)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(TextFormatter())


def _rank_fields(env: dict[str, str] | os._Environ[str]) -> dict[str, int]:
    """``rank`` and ``ranks`` of a process that torchrun started in a group of more than one, else none."""
    try:
        ranks, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    except ValueError:
        return {}
    return {"rank": rank, "ranks": ranks} if ranks > 1 else {}


_RANK: dict[str, int] = _rank_fields(os.environ)


def setup_json_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python's warnings (torch's sparse Adagrad warns at a train stage's first step) printed two raw lines
    # on stderr between the JSON ones: logged instead, as "py.warnings".
    logging.captureWarnings(True)
    quiet_kafka_python(handler)


def quiet_kafka_python(handler: logging.Handler) -> None:
    """kafka-python's records through ``handler``: its errors only, and each of them at most once in 10 s.
    It logs every reconnect attempt (INFO and WARNING) and every failed one at ERROR: with the broker down,
    170 of a run's 198 lines in 45 s were its "Connection failed" and "Metadata refresh: failed"; our own
    warning ("no Kafka broker answers at ...") says once in 10 s what is wrong."""
    logging.getLogger("kafka").setLevel(logging.ERROR)
    if not any(isinstance(f, DemotedRecords) for f in handler.filters):  # before the throttle edits .msg
        handler.addFilter(DemotedRecords(KAFKA_PYTHON_NOT_ERRORS))
    if not any(isinstance(f, ClosedSocketRead) for f in handler.filters):
        handler.addFilter(ClosedSocketRead())
    if not any(isinstance(f, ThrottledRecords) for f in handler.filters):
        handler.addFilter(ThrottledRecords("kafka"))


# kafka-python's ERRORs that are no error of the run: a topic the first message creates (a broker that
# auto-creates topics) is "not found" at that message. Where it is really missing, reloop's own warning
# names it ("waiting for a topic", a send that fails).
KAFKA_PYTHON_NOT_ERRORS = frozenset({("kafka.cluster", "Topic %s not found in cluster metadata")})


class ClosedSocketRead(logging.Filter):
    """A handler's filter that drops kafka-python's traceback of a read from a connection closed under its
    reader (``AttributeError: 'NoneType' object has no attribute 'recv'``): a race of its own close, seen
    as an ERROR with a traceback in a clean stop (exit 0), and no error of the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "kafka.net.transport"
            and record.msg == "%s: Error receiving network data closing socket"
            and record.exc_info is not None
            and isinstance(record.exc_info[1], AttributeError)
            and "recv" in str(record.exc_info[1])
        )


class DemotedRecords(logging.Filter):
    """A handler's filter: the ERROR records of these (logger, message template) pairs pass as WARNING."""

    def __init__(self, templates: frozenset[tuple[str, str]]) -> None:
        super().__init__()
        self._templates = templates

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and (record.name, record.msg) in self._templates:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ThrottledRecords(logging.Filter):
    """A handler's filter: the records of the loggers under ``prefix`` pass at most once per ``every_s``
    per logger and message template; the next one that passes says how many were left out. A logger's
    own filter would not see its children's records, so this sits on the handler."""

    MAX_KEYS = 1024  # a library that formats into its template makes a key per text: bounded

    def __init__(
        self, prefix: str, *, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._prefix, self._dotted = prefix, prefix + "."
        self._every_s = every_s
        self._clock = clock
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [passed at, suppressed since]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name != self._prefix and not name.startswith(self._dotted):
            return True
        key = (name, str(record.msg))
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self._every_s:
                seen[1] += 1
                return False
            if seen is None and len(self._seen) >= self.MAX_KEYS:
                self._seen.clear()
            suppressed = 0 if seen is None else int(seen[1])
            self._seen[key] = [now, 0]
        if suppressed:
            record.msg = f"{record.msg} [{suppressed} more like it in {self._every_s:g} s not logged]"
        return True


class _Throttle:
    """At most one line every ``every_s`` (the first at once), on ``clock``."""

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

    def _due(self) -> bool:
        """Whether a line may go out now (and if so, the next one not before ``every_s``)."""
        now = self._clock()
        if now < self._next_at:
            return False
        self._next_at = now + self._every_s
        return True


class ThrottledWarning(_Throttle):
    """A warning that a loop may hit at every step (each 100 ms while the broker is down): logged at most
    once every ``every_s``, with how many were left out since the last one ("suppressed")."""

    def __init__(self, logger: logging.Logger, msg: str, **kwargs: Any) -> None:
        super().__init__(logger, msg, **kwargs)
        self._suppressed = 0

    def __call__(self, *args: Any, **fields: Any) -> None:
        """``args`` fill the message's ``%`` placeholders (for a log read as plain text); ``fields`` go to
        the JSON line."""
        if not self._due():
            self._suppressed += 1
            return
        if self._suppressed:
            fields["suppressed"], self._suppressed = self._suppressed, 0
        self._logger.warning(self._msg, *args, extra={"fields": fields})


class ThrottledCountLog(_Throttle):
    """One WARNING for counts that may come at every poll: the first at once, then at most one every
    ``every_s`` with the counts since the line before. Call it at every publish, with nothing new too:
    counts held back go out once ``every_s`` is up."""

    def __init__(self, logger: logging.Logger, msg: str, **kwargs: Any) -> None:
        super().__init__(logger, msg, **kwargs)
        self._held: dict[str, int] = {}

    def add(self, counts: dict[str, int], **fields: object) -> None:
        for name, n in counts.items():
            self._held[name] = self._held.get(name, 0) + n
        if not any(self._held.values()) or not self._due():
            return
        self._logger.warning(self._msg, extra={"fields": {**self._held, **fields}})
        self._held = {}
