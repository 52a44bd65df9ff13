"""Small deterministic model doubles for serving tests: the serving logic is under test, not a model."""

from __future__ import annotations

import time

import numpy as np
from reloop.engine.serve.bundle import ModelBundle


class RowFeaturizer:
    def transform(self, rows):
        return rows


class VersionedLearner:
    """Score = sigmoid(w * x + version / 100): the version is recoverable from any score, and the
    ranking depends on the feature ``x``. ``delay_s`` makes scoring slow so a swap can race it."""

    def __init__(self, version: int, w: float = 1.0, delay_s: float = 0.0) -> None:
        self.version = version
        self.w = w
        self.delay_s = delay_s

    def predict_proba(self, rows) -> np.ndarray:
        if self.delay_s:
            time.sleep(self.delay_s)
        x = np.array([float(r.get("x", 0.0)) for r in rows])
        return 1.0 / (1.0 + np.exp(-(self.w * x + self.version / 100.0)))


def bundle(version: int, **kw) -> ModelBundle:
    return ModelBundle(version=version, learner=VersionedLearner(version, **kw), featurizer=RowFeaturizer())


def version_of(score: float, x: float, w: float = 1.0) -> int:
    logit = np.log(score / (1 - score))
    return round((logit - w * x) * 100)


def raw_score_request(i: int) -> bytes:
    """A whole HTTP/1.1 ``POST /score`` of two candidates, as bytes for a plain socket: tests that need
    to know exactly when a request's bytes were sent."""
    import orjson

    body = orjson.dumps(
        {"request_id": f"r{i}", "user_id": f"u{i}", "candidates": [{"item_id": "a"}, {"item_id": "b"}]}
    )
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body
