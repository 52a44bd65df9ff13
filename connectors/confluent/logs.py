"""librdkafka's log lines through Python's logging (logger ``librdkafka``), served by the clients' polls.

Without a ``logger`` librdkafka writes its own lines to stderr ("%3|1796415372.239|FAIL|rdkafka#consumer-1|
..."), past reloop's JSON log: a log shipper that parses every line as JSON dropped or mangled them. A
``logger`` given in ``client_config`` is kept.

While a broker is down every client logs each reconnect attempt ("Connect to ipv4#... failed: Connection
refused"), and librdkafka's own suppression of identical errors still let about 6,000 lines through in a
seven-minute chaos soak of three processes: ``RepeatedLines`` lets one line of a kind through every
``REPEAT_EVERY_S`` and says how many like it it left out. Nothing in reloop reads these lines: refused logins
and TLS refusals are taken from the clients' error callbacks (connectors/confluent/login.py).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException
from reloop.engine.config_common import ConfigError

T = TypeVar("T")

LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
REPEAT_EVERY_S = 10.0
_NUMBERS = re.compile(r"\d+")


class RepeatedLines(logging.Filter):
    """Lets a log line through at most once every ``every_s`` per kind: its level and its text with every
    number taken out (the attempt's timings, ports, "4 identical error(s) suppressed"). The next line of a
    kind let through says how many it stood for. At most ``max_kinds`` kinds are remembered (the oldest
    forgotten first), so a client naming ever new things cannot grow it without bound."""

    def __init__(
        self,
        every_s: float = REPEAT_EVERY_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 512,
    ) -> None:
        super().__init__()
        self.every_s = every_s
        self._clock = clock
        self._max_kinds = max_kinds
        self._kinds: OrderedDict[tuple[int, str], list[float | int]] = OrderedDict()  # [next at, left out]
        self._lock = threading.Lock()  # librdkafka lines are served by any thread's poll

    def forget(self) -> None:
        """Every kind as never seen (a test that looks for a line another one logged just before)."""
        with self._lock:
            self._kinds.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        kind = (record.levelno, _NUMBERS.sub("#", text))
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now < seen[0]:
                seen[1] += 1
                return False
            left_out = int(seen[1]) if seen is not None else 0
            self._kinds[kind] = [now + self.every_s, 0]
            self._kinds.move_to_end(kind)
            while len(self._kinds) > self._max_kinds:
                self._kinds.popitem(last=False)
        if left_out:
            record.msg, record.args = f"{text} ({left_out} more like it since the last one logged)", None
        return True


class ExpectedAtStart(logging.Filter):
    """librdkafka's WARNING that a new broker's transaction coordinator is still loading ("Failed to acquire
    idempotence PID ...: Coordinator load in progress: retrying"): seen at most starts of the demo and of
    a fresh broker, and retried by the client itself. Passed at INFO (dropped where INFO is not logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or "Coordinator load in progress" not in record.getMessage():
            return True
        if not LIBRDKAFKA_LOG.isEnabledFor(logging.INFO):
            return False
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True


REPEATED_LINES = RepeatedLines()
LIBRDKAFKA_LOG.addFilter(ExpectedAtStart())
LIBRDKAFKA_LOG.addFilter(REPEATED_LINES)


def logged(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with librdkafka's log lines routed to ``LIBRDKAFKA_LOG``."""
    return {"logger": LIBRDKAFKA_LOG, **config}


def built(make: Callable[[dict[str, Any]], T], config: Mapping[str, Any]) -> T:
    """``make(logged(config))``: a librdkafka client. It checks its settings when it is built and refuses
    one it cannot use (an unknown key, a bad value, an SSL file it cannot load: "ssl.ca.location failed")
    with _INVALID_ARG; that is a ConfigError (exit 2), not an outage for the supervisor to retry."""
    try:
        return make(logged(config))
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() == KafkaError._INVALID_ARG:
            raise ConfigError(
                f"librdkafka refuses the Kafka settings: {err.str()} (set from kafka.*, kafka.client_config "
                "and the consumer's or producer's client_config)"
            ) from exc
        raise
