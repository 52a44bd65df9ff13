"""The HTTP face of the scoring service (FastAPI)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from reloop.engine.metrics.stats import STATS
from reloop.engine.serve.schema import ScoreRequest, ScoreResponse
from reloop.engine.serve.service import BadRequest, NotReady, ScoringService
from reloop.engine.serve.wire import WireError, decode_request, error_body

log = logging.getLogger(__name__)

_SCHEMA = ScoreRequest.model_json_schema()  # OpenAPI 3.1 accepts JSON Schema with local $defs


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed ``limit`` (from Content-Length, or while
    reading a chunked body): a 10 MB body is refused without being read whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> bytes:
    return orjson.dumps({"detail": f"request body larger than {limit} bytes"})


def encoded(encoding: bytes | str) -> bytes:
    """The 415 answer to a body sent with a Content-Encoding (gzip ...): it was parsed as JSON as it
    came, and refused as "invalid JSON at byte 0", which did not say why."""
    name = encoding.decode("latin-1") if isinstance(encoding, bytes) else encoding
    return orjson.dumps(
        {"detail": f"Content-Encoding {name[:40]} is not supported: send the JSON body as is"}
    )


def _encoding_refused(encoding: bytes | str | None) -> bool:
    if encoding is None:
        return False
    value = encoding.strip().lower()
    return value not in (b"", b"identity", "", "identity")


def _media_type_refused(content_type: bytes | str | None) -> bool:
    """A body declared as anything but JSON (``application/json``, ``application/*+json``; none declared
    is read as JSON, as FastAPI does). Why refuse it: a web page can POST ``text/plain`` or a form to a
    service on the user's loopback without a CORS preflight, and each request scored is an impression
    logged, trained on as a negative."""
    if content_type is None:
        return False
    value = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    media = value.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return not (main == "application" and (sub == "json" or sub.endswith("+json")))


def unsupported_media(content_type: bytes | str) -> bytes:
    name = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    return orjson.dumps(
        {"detail": f"Content-Type {name[:60]} is not JSON: send the body as application/json"}
    )


# 408: a connection closed at serve.read_timeout_s before its request arrived whole (engine/serve/stack.py).
_FAILED = {
    status: STATS.serve_failed_requests.child(str(status)) for status in (408, 413, 415, 422, 500, 503)
}


def score_body(service: ScoringService, body: bytes) -> tuple[int, bytes]:
    """``POST /score``: (status, JSON body); an answer other than 200 is counted by its status
    (``reloop_serve_failed_requests_total``, and ``failed_requests`` in ``GET /stats``)."""
    status, content = _score_body(service, body)
    if status != 200:
        count_failed(service, status)
    return status, content


def body_too_large(service: ScoringService, limit: int) -> tuple[int, bytes]:
    count_failed(service, 413)
    return 413, too_large(limit)


def count_failed(service: ScoringService, status: int) -> None:
    _FAILED[status].add()
    service.failed[status] = service.failed.get(status, 0) + 1


def _score_body(service: ScoringService, body: bytes) -> tuple[int, bytes]:
    """Parsed and validated by msgspec (engine/serve/wire.py); scoring runs inline on the event loop
    (~1-2 ms of CPU under the GIL either way; a hand-off to a thread pool costs two more thread wake-ups
    per request)."""
    try:
        request = decode_request(body)
    except WireError as exc:
        return 422, error_body(exc.errors)
    try:
        return 200, service.score_json(request)
    except NotReady as exc:
        return 503, orjson.dumps({"detail": str(exc)})
    except BadRequest as exc:
        return 422, error_body(exc.errors)
    except Exception:
        log.exception("scoring request %s failed", request.request_id[:256])
        return 500, b'{"detail":"scoring failed; see the service log"}'


_JSON_HEADERS = [(b"content-type", b"application/json")]
# The scope key under which the HTTP protocol notes when a request arrived whole (monotonic seconds).
RECEIVED_KEY = "reloop.received_s"
_RETRY_AFTER = [(b"retry-after", b"1")]


def overloaded(waited_s: float, most_s: float) -> bytes:
    return orjson.dumps(
        {
            "detail": f"overloaded: the request waited {waited_s * 1000:.0f} ms for its turn, more than "
            f"serve.limits.max_queue_ms ({most_s * 1000:g}); not scored, try again"
        }
    )


class ScoreRoute:
    """ASGI front door: ``POST /score`` straight to ``score_body`` (no routing, no Request object, no
    dependency injection: ~0.1 ms less per request than the FastAPI route); everything else goes on to
    ``app``. The body limit is enforced from Content-Length and while reading a chunked body."""

    def __init__(self, app: Any, service: ScoringService) -> None:
        self.app = app
        self.service = service
        self.limit = service.limits.max_body_bytes
        most = service.limits.max_queue_ms
        self.max_queue_s = None if most is None else most / 1000

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/score" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        status = 0
        encoding = None
        content_type = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > limit:
                    status = 413
            elif name == b"content-encoding":
                encoding = value
            elif name == b"content-type":
                content_type = value
        if not status and _encoding_refused(encoding):
            count_failed(self.service, 415)
            await _answer(send, 415, encoded(encoding))  # type: ignore[arg-type]
            return
        if not status and _media_type_refused(content_type):
            count_failed(self.service, 415)
            await _answer(send, 415, unsupported_media(content_type))  # type: ignore[arg-type]
            return
        body = b""
        if not status:
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    status = 413
                    break
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if not status and self.max_queue_s is not None:
                received = scope.get(RECEIVED_KEY)  # set by the HTTP protocol (engine/serve/stack.py)
                if received is not None and (waited := time.monotonic() - received) > self.max_queue_s:
                    count_failed(self.service, 503)
                    await _answer(send, 503, overloaded(waited, self.max_queue_s), _RETRY_AFTER)
                    return
        status, content = (
            body_too_large(self.service, limit) if status == 413 else score_body(self.service, body)
        )
        await _answer(send, status, content)


async def _answer(
    send: Any, status: int, content: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", b"%d" % len(content)), *(extra or ())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def create_app(
    service: ScoringService,
    *,
    stats: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """``stats`` adds to ``GET /stats``. ``GET /metrics`` is mounted by the caller (engine/serve/stack.py)."""
    app = FastAPI(title="reloop scoring service", version="1")
    max_body_bytes = service.limits.max_body_bytes

    @app.post(
        "/score",
        response_model=ScoreResponse,
        responses={
            413: {"description": "request body too large"},
            415: {"description": "a Content-Encoding (gzip ...), or a Content-Type other than JSON"},
            422: {"description": "invalid request"},
            503: {"description": "no model loaded yet"},
        },
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": _SCHEMA}}}
        },
    )
    async def score(http_request: Request) -> Response:
        # Served by ScoreRoute in front of this app (reloop.engine.serve.stack); this route is its documented
        # twin and what an app without the front door answers (the same score_body).
        encoding = http_request.headers.get("content-encoding")
        if _encoding_refused(encoding):
            count_failed(service, 415)
            return Response(content=encoded(encoding), status_code=415, media_type="application/json")
        content_type = http_request.headers.get("content-type")
        if _media_type_refused(content_type):
            count_failed(service, 415)
            return Response(
                content=unsupported_media(content_type),  # type: ignore[arg-type]
                status_code=415,
                media_type="application/json",
            )
        body = await _bounded_body(http_request, max_body_bytes)
        status, content = (
            body_too_large(service, max_body_bytes) if body is None else score_body(service, body)
        )
        return Response(content=content, status_code=status, media_type="application/json")

    # HEAD too: load balancers probe with it (it got 405).
    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz() -> JSONResponse:
        reasons = service.not_ready()  # arm -> why it cannot score
        body: dict[str, Any] = {"ready": not reasons, "versions": service.versions()}
        if reasons:
            body["not_ready"] = reasons
        return JSONResponse(status_code=503 if reasons else 200, content=body)

    @app.get("/stats")
    async def get_stats() -> dict[str, Any]:
        body: dict[str, Any] = {
            "versions": service.versions(),
            # By status, as reloop_serve_failed_requests_total counts them (it read 0 for 413s and 422s).
            "failed_requests": {str(status): n for status, n in sorted(service.failed.items())},
            "pid": os.getpid(),  # which worker answered (reloop serve --workers N)
        }
        body["arms"] = {
            name: {
                "version": arm.holder.version,
                "reloads": arm.holder.reloads,
                **(
                    {
                        "impressions_accepted": arm.logger.accepted,
                        "impressions_sent": arm.logger.sent,
                        "impressions_dropped": arm.logger.dropped,
                        "impressions_pending": arm.logger.pending,
                        "sink_errors": arm.logger.send_errors,
                    }
                    if arm.logger is not None
                    else {}
                ),
            }
            for name, arm in service.arms.items()
        }
        if stats is not None:
            body.update(stats())
        return body

    return app
