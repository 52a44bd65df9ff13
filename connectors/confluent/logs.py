"""librdkafka's log lines through Python's logging (logger ``librdkafka``), served by the clients' polls.

Without a ``logger`` librdkafka writes its own lines to stderr ("%3|1796415372.239|FAIL|rdkafka#consumer-1|
..."), past reloop's JSON log: a log shipper that parses every line as JSON dropped or mangled them. A
``logger`` given in ``client_config`` is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

LIBRDKAFKA_LOG = logging.getLogger("librdkafka")


def logged(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with librdkafka's log lines routed to ``LIBRDKAFKA_LOG``."""
    return {"logger": LIBRDKAFKA_LOG, **config}
