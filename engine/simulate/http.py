"""The simulator's HTTP client for ``POST /score`` (loopback, keep-alive)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
from reloop.engine.simulate.driver import NotReadyYet


class HttpScorer:
    def __init__(self, url: str, *, timeout_s: float = 5.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        # The service's bearer token (serve.auth_token): every request was a 401 against one with it.
        auth = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=auth)

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(
            "/score", content=orjson.dumps(body), headers={"content-type": "application/json"}
        )
        if r.status_code == 503:
            raise NotReadyYet(r.text)
        if r.status_code != 200:
            raise RuntimeError(f"POST /score answered {r.status_code}: {r.text[:300]}")
        return orjson.loads(r.content)

    def ready(self) -> bool:
        try:
            return self.client.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def stats(self) -> dict[str, Any] | None:
        try:
            r = self.client.get("/stats")
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def close(self) -> None:
        self.client.close()
