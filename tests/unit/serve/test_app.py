from __future__ import annotations

import gzip

import orjson
from fastapi.testclient import TestClient
from reloop.connectors.memory.memory import MemoryLog, MemorySink
from reloop.engine.events.codec import decode_impression, encode
from reloop.engine.serve.app import create_app
from reloop.engine.serve.arms import ArmRouter
from reloop.engine.serve.bundle import ModelHolder
from reloop.engine.serve.impression_log import ImpressionLogger
from reloop.engine.serve.service import ArmRuntime, ScoringService

from .fakes import bundle


def _client(loaded: bool = True):
    mlog = MemoryLog()
    holder = ModelHolder(bundle(2) if loaded else None)
    logger = ImpressionLogger(sink=MemorySink(mlog, "imp"), encode=encode, arm="A", linger_s=0).start()
    service = ScoringService(
        router=ArmRouter([("A", 1.0)], salt="s"), arms={"A": ArmRuntime("A", holder, logger)}, top_k=2
    )
    return TestClient(create_app(service)), holder, logger, mlog


BODY = {
    "request_id": "r1",
    "user_id": "u1",
    "context": {"device": "mobile"},
    "candidates": [{"item_id": f"i{j}", "features": {"x": j / 10}} for j in range(5)],
}


def test_score_returns_ranking_and_logs_it():
    client, _, logger, mlog = _client()
    r = client.post("/score", json=BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == 2 and body["arm"] == "A"
    assert [x["item_id"] for x in body["ranking"]] == ["i4", "i3"]
    logger.close()
    logged = [decode_impression(rec.value) for rec in mlog.read(mlog.partitions("imp")[0], 0, 10)]
    assert [(e.impression_id, e.served_prediction) for e in logged] == [
        (x["impression_id"], x["score"]) for x in body["ranking"]
    ]


def test_health_and_readiness():
    client, holder, logger, _ = _client(loaded=False)
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    assert client.post("/score", json=BODY).status_code == 503
    holder.swap(bundle(1))
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["versions"] == {"A": 1}
    logger.close()


def test_bad_requests_get_clear_422():
    client, _, logger, _ = _client()
    cases = [
        ({**BODY, "candidates": []}, "candidates"),
        ({k: v for k, v in BODY.items() if k != "user_id"}, "user_id"),
        ({**BODY, "candidates": [{"item_id": "a"}, {"item_id": "a"}]}, "duplicate item_id"),
        ({**BODY, "candidates": [{"item_id": "a", "features": {"x": {"nested": 1}}}]}, "features"),
        ({**BODY, "top_k": 0}, "top_k"),
        ({**BODY, "surprise": 1}, "surprise"),
    ]
    for body, needle in cases:
        r = client.post("/score", json=body)
        assert r.status_code == 422, (body, r.text)
        assert needle in r.text, r.text
    r = client.post("/score", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert logger.accepted == 0
    logger.close()


def test_stats_reports_versions_and_log_counters():
    client, _, logger, _ = _client()
    client.post("/score", json=BODY)
    stats = client.get("/stats").json()
    assert stats["arms"]["A"]["version"] == 2
    assert stats["arms"]["A"]["impressions_accepted"] == 2
    logger.close()


def test_stats_counts_failed_requests_by_status_as_the_metric_does():
    # It counted 500s only: after 413s and 422s it read 0 while the metric counted them.
    client, _, logger, _ = _client(loaded=False)
    client.post("/score", json={**BODY, "top_k": 0})  # 422
    client.post("/score", content=b"{not json", headers={"content-type": "application/json"})  # 422
    client.post("/score", json=BODY)  # 503: no model yet
    client.post("/score", content=b"x" * ((1 << 20) + 1))  # 413
    # 415: a gzip body was parsed as JSON as it came ("invalid JSON at byte 0")
    gzipped = client.post("/score", content=gzip.compress(b"{}"), headers={"content-encoding": "gzip"})
    assert gzipped.status_code == 415 and "Content-Encoding gzip is not supported" in gzipped.text
    assert client.get("/stats").json()["failed_requests"] == {"413": 1, "415": 1, "422": 2, "503": 1}
    logger.close()


def test_health_and_readiness_answer_head_as_load_balancers_probe():
    client, _, logger, _ = _client()
    assert client.head("/healthz").status_code == 200 and client.head("/readyz").status_code == 200
    logger.close()
    client, _, logger, _ = _client(loaded=False)
    assert client.head("/readyz").status_code == 503
    logger.close()


def test_openapi_documents_the_request_body():
    client, _, logger, _ = _client()
    doc = client.get("/openapi.json").json()
    body = doc["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "candidates" in body["properties"] and "Candidate" in body["$defs"]
    logger.close()


def test_a_body_declared_as_other_than_json_is_refused_with_415():
    # A page on any site can POST text/plain or a form to a loopback service without a CORS preflight:
    # each such request was scored and its impressions logged (trained as negatives).
    client, _, logger, _ = _client()
    raw = orjson.dumps(BODY)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x"):
        r = client.post("/score", content=raw, headers={"content-type": content_type})
        assert r.status_code == 415 and f"Content-Type {content_type} is not JSON" in r.text
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"):
        assert client.post("/score", content=raw, headers={"content-type": content_type}).status_code == 200
    assert client.post("/score", content=raw).status_code == 200  # none declared: read as JSON
    assert logger.accepted == 4 * 2  # top 2 of each of the 4 requests scored
    assert client.get("/stats").json()["failed_requests"] == {"415": 3}
    logger.close()
