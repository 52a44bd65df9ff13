"""The bearer-token middleware at the ASGI level: what it lets through to the app and what it refuses
(the service end to end: test_hostile_requests.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from reloop.engine.serve.auth import BearerAuth

TOKEN = "s3cret-token"


def _through(scope: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
    """(whether the app was reached, what the middleware sent itself)."""
    reached: list[bool] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(BearerAuth(app, TOKEN)(scope, receive, send))
    return bool(reached), sent


def test_a_websocket_without_the_token_is_refused_before_the_app() -> None:
    # Every scope but "http" passed unchecked: a websocket route carried no token to the app.
    reached, sent = _through({"type": "websocket", "path": "/score", "headers": []})
    assert not reached and sent == [{"type": "websocket.close", "code": 1008}]
    auth = [(b"authorization", f"Bearer {TOKEN}".encode())]
    assert _through({"type": "websocket", "path": "/score", "headers": auth}) == (True, [])


def test_lifespan_and_the_probes_pass_without_a_token() -> None:
    assert _through({"type": "lifespan"}) == (True, [])
    assert _through({"type": "http", "path": "/readyz", "headers": []}) == (True, [])
    reached, sent = _through({"type": "http", "path": "/metrics", "headers": []})
    assert not reached and sent[0]["status"] == 401


def test_a_workers_metrics_port_needs_the_token_on_every_path() -> None:
    # `reloop serve --workers N` with a token: each worker's own /metrics port answered /healthz and
    # /readyz, without the token, with the whole exposition (prometheus_client's app answers any path).
    import urllib.error
    import urllib.request

    from reloop.engine.serve.cli import _GuardedMetrics

    metrics = _GuardedMetrics("127.0.0.1", 0, TOKEN)
    try:
        base = metrics.url.removesuffix("/metrics")
        for path in ("/healthz", "/readyz", "/metrics"):
            try:
                urllib.request.urlopen(base + path, timeout=10)
                raise AssertionError(f"{path} answered without the token")
            except urllib.error.HTTPError as e:
                assert e.code == 401, path
        asked = urllib.request.Request(metrics.url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(asked, timeout=10) as answer:
            assert b"reloop_" in answer.read()
    finally:
        metrics.close()


def test_a_token_file_other_users_can_read_is_taken_with_a_warning(tmp_path, caplog) -> None:
    import logging

    from reloop.engine.serve.auth import load_token

    path = tmp_path / "token"
    path.write_text("s3cret\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert load_token(path) == "s3cret"
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_token(path) == "s3cret"
    [record] = caplog.records
    assert "readable by other users (mode 644)" in record.getMessage() and "s3cret" not in record.getMessage()
