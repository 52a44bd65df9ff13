"""Nothing on the request path grows with uptime: thousands of requests with ever new item ids, logged,
leave the traced memory where the first ones left it (the hash memo is bounded, nothing is kept)."""

from __future__ import annotations

import gc
import tracemalloc

import orjson
from reloop.engine.events.codec import encode
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import build_learner
from reloop.engine.serve import bundle as bundle_module
from reloop.engine.serve import columns
from reloop.engine.serve.app import score_body
from reloop.engine.serve.arms import ArmRouter
from reloop.engine.serve.bundle import ModelBundle, ModelHolder
from reloop.engine.serve.producer_log import ProducerLogger
from reloop.engine.serve.service import ArmRuntime, ScoringService

SPEC = FeatureSpec.from_dict(
    {
        "fields": [
            {"kind": "categorical", "name": "user", "buckets": 1000},
            {"kind": "categorical", "name": "item", "buckets": 5000},
        ]
    }
)


class NullProducer:
    def __init__(self) -> None:
        self.n = 0

    def offer(self, value, key=None, timestamp_ms=None) -> bool:
        self.n += 1
        return True

    def poll(self, timeout_s=0.0) -> None:
        pass

    def pending(self) -> int:
        return 0

    def close(self, timeout_s=None) -> None:
        pass


def test_memory_does_not_grow_with_requests(monkeypatch):
    monkeypatch.setattr(columns, "MEMO_SIZE", 500)
    monkeypatch.setattr(bundle_module, "_COLUMNS", {})
    learner = build_learner("dcn", SPEC, "ce", 0.0, embedding_dim=4, hidden_units=[16]).clone_frozen()
    bundle = ModelBundle(version=1, learner=learner, featurizer=Featurizer(SPEC))
    producer = NullProducer()
    logger = ProducerLogger(make_sink=lambda failure: producer, encode=encode, arm="A")
    service = ScoringService(
        router=ArmRouter([("A", 1.0)], salt="s"), arms={"A": ArmRuntime("A", ModelHolder(bundle), logger)}
    )

    def burst(start: int) -> None:
        for r in range(start, start + 400):
            body = {
                "request_id": f"r{r}",
                "user_id": f"u{r}",
                "context": {"user": f"u{r}"},
                "candidates": [
                    {"item_id": f"i{r}-{j}", "features": {"item": f"i{r}-{j}"}} for j in range(20)
                ],
            }
            status, _ = score_body(service, orjson.dumps(body))
            assert status == 200

    burst(0)  # warm: memo filled to its bound, caches made
    gc.collect()
    tracemalloc.start()
    try:
        burst(1000)
        gc.collect()
        first = tracemalloc.get_traced_memory()[0]
        burst(2000)
        burst(3000)
        gc.collect()
        last = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert producer.n == 1600 * 10
    assert last - first < 256 * 1024, f"grew by {last - first} bytes over 800 requests"
    assert bundle.columns is not None and bundle.columns.memo_entries() <= 2 * 500
