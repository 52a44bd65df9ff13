"""Optional bearer-token protection of the scoring service.

Off by default because the service binds to 127.0.0.1. A deployment that exposes it beyond loopback
sets a token (``serve.auth_token_file``, or ``serve.auth_token``: the ``RELOOP__SERVE__AUTH_TOKEN``
environment variable, e.g. from a Kubernetes Secret); every request except the probes (``/healthz``,
``/readyz``) must then carry ``Authorization: Bearer <token>``, or it gets a 401. The comparison is
constant-time. The token is never logged and never written anywhere by the service.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

TOKEN_ENV = "RELOOP__SERVE__AUTH_TOKEN"  # serve.auth_token (engine/serve/config.py)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]


def load_token(token_file: str | Path | None, token: SecretStr | None = None) -> str | None:
    """The token from ``token_file`` (surrounding whitespace stripped), else ``token`` (serve.auth_token)."""
    if token_file is not None:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as exc:  # "[Errno 2] No such file or directory: ..." named no setting
            raise ValueError(
                f"serve.auth_token_file {token_file} cannot be read: {exc.strerror or exc}"
            ) from None
        except UnicodeDecodeError:
            raise ValueError(f"serve.auth_token_file {token_file} is not UTF-8 text") from None
        if not text:
            raise ValueError(f"serve.auth_token_file {token_file} is empty")
        mode = Path(token_file).stat().st_mode & 0o777
        if mode & 0o077:  # said, not refused: a container's mounted secret may be 0644 by design
            logging.getLogger("reloop.engine.serve").warning(
                "serve.auth_token_file %s is readable by other users (mode %o): chmod 600 it",
                token_file,
                mode,
            )
        return text
    return (token.get_secret_value().strip() if token is not None else "") or None


class BearerAuth:
    """ASGI middleware: 401 unless the request carries the bearer token (probes excepted)."""

    def __init__(self, app: ASGIApp, token: str, *, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        """``open_paths``: none for an app that answers every path alike (a worker's /metrics port, where
        the probes' paths served the metrics to anyone)."""
        self.app = app
        self._expected = token.encode()
        self._open = open_paths

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        # Only lifespan passes unchecked: a websocket (a route added later, a proxy's upgrade) carried no
        # token past this and reached the app.
        if scope["type"] not in ("http", "websocket") or scope.get("path") in self._open:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, credentials = given.partition(b" ")
        # The scheme is case-insensitive (RFC 7235: "bearer x" is as good as "Bearer x"); the token is not.
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._expected):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # refused before the handshake: the server answers 403
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"detail":"missing or wrong bearer token"}'})
