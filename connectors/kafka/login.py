"""Telling a refused login from an unreachable broker, for kafka-python.

When the broker refuses a SASL login, kafka-python logs the broker's answer (a
``SaslAuthenticationFailedError`` among the log record's arguments) and then keeps reconnecting until its
bootstrap times out, raising only ``KafkaTimeoutError: Unable to bootstrap`` (an outage, to anyone who
reads it). On some attempts the broker's answer does not reach the client at all ("socket disconnected"),
so a bootstrap can end without any sign of the refusal; it is then retried like an outage and the next
attempt tells.

A filter on kafka-python's connection loggers notes each refusal it sees; ``login_checked`` turns a
client's failure into ``AuthenticationFailed`` when a refusal was noted while that client was being built.
The filter never drops a record, and it sees only what those loggers let through: the refusal is logged at
ERROR ("Connection lost"), which ``reloop``'s own logging keeps (it sets the ``kafka`` loggers to ERROR).
Clients of one process share the notes; a reloop process has one set of credentials.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kafka.errors import KafkaError, SaslAuthenticationFailedError
from reloop.engine.streams import AuthenticationFailed

# kafka.net.connection logs "Connection lost: <exc>" (ERROR), kafka.net.manager "Connection failed" and
# "Bootstrap connection to <node> failed: <exc>" (ERROR, WARNING).
_LOGGERS = ("kafka.net.connection", "kafka.net.manager")


class _RefusalNotes(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.count = 0
        self.last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, SaslAuthenticationFailedError):
                with self._lock:
                    self.count += 1
                    self.last = _reason(arg)
        return True

    def since(self, count: int) -> str | None:
        """The last refusal noted after ``count`` refusals, None when there was none since."""
        with self._lock:
            return self.last if self.count > count else None


def _reason(exc: SaslAuthenticationFailedError) -> str:
    # "[Error 58] SaslAuthenticationFailedError: SaslAuthenticationFailedError: Authentication failed: ..."
    return str(exc).rpartition("SaslAuthenticationFailedError: ")[2] or type(exc).__name__


NOTES = _RefusalNotes()
for _name in _LOGGERS:
    logging.getLogger(_name).addFilter(NOTES)


@contextmanager
def login_checked(bootstrap: str) -> Iterator[None]:
    """Raise ``AuthenticationFailed`` instead of the client's error when the broker refused the login
    while the block ran (building a client bootstraps it: the first contact with the broker)."""
    before = NOTES.count
    try:
        yield
    except SaslAuthenticationFailedError as exc:
        raise AuthenticationFailed(bootstrap, _reason(exc)) from exc
    except KafkaError as exc:
        reason = NOTES.since(before)
        if reason is None:
            raise
        raise AuthenticationFailed(bootstrap, reason) from exc
