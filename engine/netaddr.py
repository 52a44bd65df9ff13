"""Addresses as URLs: an IPv6 host goes in brackets (``http://[::1]:9464/metrics``); without them the
URL a log line or a report printed did not parse, and its port read as part of the address."""

from __future__ import annotations


def http_url(host: str, port: int, path: str = "") -> str:
    """The URL of ``path`` on ``host:port``.

    >>> http_url("::1", 9464, "/metrics"), http_url("127.0.0.1", 8080)
    ('http://[::1]:9464/metrics', 'http://127.0.0.1:8080')
    """
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"
