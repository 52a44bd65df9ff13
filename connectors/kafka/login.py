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

TLS failures go the same way: kafka-python logs a certificate the client cannot verify (wrong CA, another
host name), a broker's alert refusing the client's certificate, or an SSL file it cannot load (a wrong
ssl_password), then retries them like an outage until "Unable to bootstrap"; they become ``TlsRefused``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kafka.errors import KafkaError, SaslAuthenticationFailedError
from reloop.engine.streams import AuthenticationFailed, TlsRefused

# kafka.net.connection logs "Connection lost: <exc>" (ERROR), kafka.net.manager "Connection failed" and
# "Bootstrap connection to <node> failed: <exc>" (ERROR, WARNING).
_LOGGERS = ("kafka.net.connection", "kafka.net.manager")


class _RefusalNotes(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.count = 0
        self.last = ""
        self.kind: type[AuthenticationFailed] = AuthenticationFailed

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, SaslAuthenticationFailedError):
                self._note(AuthenticationFailed, _reason(arg))
            elif isinstance(arg, BaseException) and (tls := _tls_failure(arg)) is not None:
                self._note(TlsRefused, tls)
        return True

    def _note(self, kind: type[AuthenticationFailed], reason: str) -> None:
        with self._lock:
            self.count += 1
            self.last = reason
            self.kind = kind

    def refusal(self, bootstrap: str, count: int) -> AuthenticationFailed | None:
        """The last refusal noted after ``count`` refusals as the error to raise, None when none since."""
        with self._lock:
            return self.kind(bootstrap, self.last) if self.count > count else None


def _reason(exc: SaslAuthenticationFailedError) -> str:
    # "[Error 58] SaslAuthenticationFailedError: SaslAuthenticationFailedError: Authentication failed: ..."
    return str(exc).rpartition("SaslAuthenticationFailedError: ")[2] or type(exc).__name__


# Lost connections, not TLS settings: a broker that closed or reset the connection mid-handshake.
_TRANSIENT_SSL = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ssl.SSLSyscallError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


def _tls_failure(exc: BaseException) -> str | None:
    """What failed when ``exc`` is (or wraps: kafka-python's "Handshake failed" keeps it as the context,
    a lost connection as its argument) an SSL error of the settings, None for anything else."""
    for err in (exc, exc.__cause__, exc.__context__, *exc.args):
        if isinstance(err, ssl.SSLError) and not isinstance(err, _TRANSIENT_SSL):
            return str(err)
        if isinstance(err, (FileNotFoundError, PermissionError)):  # only loading the SSL files opens files
            return f"cannot read an SSL file: {err}"
    return None


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
        refusal = NOTES.refusal(bootstrap, before)
        if refusal is None:
            raise
        raise refusal from exc
