"""librdkafka's log lines through Python's logging (logger ``librdkafka``), served by the clients' polls.

Without a ``logger`` librdkafka writes its own lines to stderr ("%3|1796415372.239|FAIL|rdkafka#consumer-1|
..."), past reloop's JSON log: a log shipper that parses every line as JSON dropped or mangled them. A
``logger`` given in ``client_config`` is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException
from reloop.engine.config_common import ConfigError

T = TypeVar("T")

LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


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
