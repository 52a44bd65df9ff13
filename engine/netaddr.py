"""Addresses as URLs: an IPv6 host goes in brackets (``http://[::1]:9464/metrics``); without them the
URL a log line or a report printed did not parse, and its port read as part of the address."""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a service on this machine (127.0.0.0/8, ::1, ``localhost``); a name
    other than localhost counts as not (it may resolve to any interface)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def http_url(host: str, port: int, path: str = "") -> str:
    """The URL of ``path`` on ``host:port``.

    >>> http_url("::1", 9464, "/metrics"), http_url("127.0.0.1", 8080)
    ('http://[::1]:9464/metrics', 'http://127.0.0.1:8080')
    """
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def bootstrap_problem(value: str) -> str | None:
    """Why ``value`` is not a Kafka bootstrap list (``host:port`` entries, comma-separated; a port may be
    left out for 9092, an IPv6 host goes in brackets), or None when it is one. Checked where the value is
    read: a malformed one failed later inside the client, in words naming neither the key nor the
    value (kafka-python: "invalid literal for int()"), or never connected (a port over 65535).

    >>> bootstrap_problem("127.0.0.1:9092,[::1]:9093,broker"), bootstrap_problem("a b:1")
    (None, "entry 'a b:1' is not host:port")
    >>> bootstrap_problem("127.0.0.1:99999")
    "entry '127.0.0.1:99999': port 99999 is not in 1..65535"
    """
    entries = [e.strip() for e in value.split(",")]
    if not value.strip() or not all(entries):
        return "expected host:port entries separated by commas"
    for entry in entries:
        match = _ENTRY.fullmatch(entry)
        if match is None:
            return f"entry {entry!r} is not host:port"
        port = match.group("port")
        if port is not None and not 1 <= int(port) <= 65535:
            return f"entry {entry!r}: port {int(port)} is not in 1..65535"
    return None


# An optional listener scheme (PLAINTEXT://), a host (a name or IPv4 without ':' or spaces, or [IPv6]),
# an optional :port.
_ENTRY = re.compile(
    r"(?:[A-Za-z_]+://)?(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^\s:/,\[\]]+))(?::(?P<port>\d{1,6}))?"
)


def bootstrap_addresses(value: str) -> list[tuple[str, int]]:
    """The (host, port) of each entry of a bootstrap list that ``bootstrap_problem`` takes (9092 where
    the port is left out); entries it would refuse are left out.

    >>> bootstrap_addresses("PLAINTEXT://kafka:9093,[::1],broker")
    [('kafka', 9093), ('::1', 9092), ('broker', 9092)]
    """
    out = []
    for entry in (e.strip() for e in value.split(",")):
        match = _ENTRY.fullmatch(entry)
        if match is not None:
            out.append((match.group("v6") or match.group("host"), int(match.group("port") or 9092)))
    return out


def as_arg(problem: Callable[[str], str | None]) -> Callable[[str], str]:
    """A ``..._problem`` check as an argparse ``type``: a refused value exits 2 naming the option."""

    def arg(value: str) -> str:
        why = problem(value)
        if why is not None:
            raise argparse.ArgumentTypeError(f"{value!r}: {why}")
        return value

    return arg


bootstrap_arg = as_arg(bootstrap_problem)


def service_url_problem(value: str) -> str | None:
    """Why ``value`` is not the base URL of an HTTP service (``http://host[:port][/path]``), or None.
    A URL without a scheme or host (``notaurl``, ``localhost:8000``) never connects, and the command waiting
    for the service said only, a minute later, that nothing answered there.

    >>> service_url_problem("http://[::1]:8000"), service_url_problem("localhost:8000")
    (None, "expected http://host[:port], got scheme 'localhost'")
    >>> service_url_problem("http://127.0.0.1:99999")
    'port 99999 is not in 1..65535'
    """
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        got = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        return f"expected http://host[:port], got {got}"
    if any(c.isspace() for c in value):
        return "a URL has no spaces"
    if not parts.hostname:
        return "expected http://host[:port], got no host"
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port_text = parts.netloc.rpartition(":")[2]
        if port_text.isdigit():
            return f"port {int(port_text)} is not in 1..65535"
        return f"port {port_text!r} is not a number"
    if port == 0:
        return "port 0 is not in 1..65535"
    if parts.query or parts.fragment:
        return "a service's base URL takes no query or fragment"
    return None


service_url_arg = as_arg(service_url_problem)
