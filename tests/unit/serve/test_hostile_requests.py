"""Hostile requests against the real HTTP service (uvicorn on loopback, a real model): refused fast
with a clear 4xx, never a 500, never a stall for the requests around them; optional bearer token."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import orjson
import pytest
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import build_learner
from reloop.engine.serve.config import serve_config_from_dict
from reloop.engine.serve.stack import ServingStack

SPEC = {
    "fields": [
        {"kind": "categorical", "name": "user", "buckets": 100},
        {"kind": "categorical", "name": "item", "buckets": 100},
        {"kind": "numeric", "name": "price", "transform": "minmax", "min": 0, "max": 100},
        {"kind": "multi", "name": "tags", "buckets": 50, "max_len": 4},
        {"kind": "numeric", "name": "raw"},  # the identity transform: unbounded
    ]
}


def _rows(n: int) -> list[dict]:
    return [{"user": "u1", "item": f"i{j}", "price": j % 90, "tags": ["a", "b"]} for j in range(n)]


def _body(n: int = 100, **extra) -> dict:
    cands = [{"item_id": f"i{j}", "features": {"item": f"i{j}", "price": j % 90}} for j in range(n)]
    return {"request_id": "r", "user_id": "u1", "context": {"user": "u1"}, "candidates": cands, **extra}


def _published(root) -> None:
    spec = FeatureSpec.from_dict(SPEC)
    learner = build_learner("dcn", spec, "ce", 0.0, seed=0, embedding_dim=8, hidden_units=[32, 32])
    batch = Featurizer(spec).transform(_rows(64))
    learner.learn(batch, (np.arange(64) % 3 == 0).astype(np.float32))
    SnapshotRegistry(root / "reg").publish({"model": learner.state_dict()})


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    _published(root)
    (root / "token").write_text("s3cret-token\n")
    config = serve_config_from_dict(
        {
            "serve": {"port": 0, "log": {"enabled": False}, "auth_token_file": str(root / "token")},
            "arms": [{"name": "A", "registry": str(root / "reg")}],
        }
    )
    stack = ServingStack(config).start()
    url = stack.serve_in_thread()
    client = httpx.Client(base_url=url, headers={"authorization": "Bearer s3cret-token"}, timeout=30)
    yield client, url
    client.close()
    stack.close()


def _post(client: httpx.Client, body: dict | bytes) -> tuple[httpx.Response, float]:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    t0 = time.perf_counter()
    r = client.post("/score", content=content, headers={"content-type": "application/json"})
    return r, time.perf_counter() - t0


def test_normal_request_is_scored(service):
    client, _ = service
    r, _ = _post(client, _body())
    assert r.status_code == 200, r.text
    assert len(r.json()["scores"]) == 100


def test_a_million_character_value_is_refused_without_stalling_a_concurrent_request(service):
    client, _ = service
    evil = _body(5)
    evil["candidates"][0]["features"]["item"] = "x" * 1_000_000
    result: dict = {}

    def normal() -> None:
        time.sleep(0.01)
        result["normal"] = _post(client, _body())

    thread = threading.Thread(target=normal)
    thread.start()
    r, took = _post(client, evil)
    thread.join()
    assert r.status_code == 422 and "1000000 characters" in r.text, r.text
    assert r.json()["detail"][0]["loc"][:3] == ["body", "candidates", 0]
    # It used to take 6.3 s (and the concurrent request 5.9 s); bounded work now: well under a second.
    assert took < 1.0
    normal_r, normal_took = result["normal"]
    assert normal_r.status_code == 200 and normal_took < 1.0


@pytest.mark.parametrize(
    ("features", "needle"),
    [
        ({"price": "abc"}, "price"),
        ({"user": ["a", "b"]}, "single value"),
        ({"tags": "solo"}, "list of strings"),
        ({"tags": ["t"] * 2000}, "items"),
    ],
)
def test_values_the_spec_cannot_read_get_a_422_not_a_500(service, features, needle):
    client, _ = service
    body = _body(3)
    body["candidates"][1]["features"].update(features)
    r, _ = _post(client, body)
    assert r.status_code == 422, r.text
    assert needle in r.text and r.json()["detail"][0]["loc"][2] == 1


def test_a_bad_context_value_behind_one_every_candidate_overrides_gets_a_422(service):
    # The checker names one bad value per row: the overridden "item" hid the used, bad "tags" (a 500).
    client, _ = service
    body = _body(3)
    body["context"].update({"item": ["x"], "tags": "solo"})
    r, _ = _post(client, body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "context", "tags"]
    del body["context"]["tags"]
    assert _post(client, body)[0].status_code == 200  # the overridden one alone is still no error


@pytest.mark.parametrize(
    ("raw", "where", "kind"),
    [
        (1e39, ["features", "raw"], "bad_feature"),  # inf in float32: refused by the spec check
        ("-1e39", ["features", "raw"], "bad_feature"),  # a numeric string alike
        (1e30, ["features"], "unscorable"),  # fits float32, but the model's logit is NaN
    ],
)
def test_values_the_model_cannot_take_get_a_422_naming_the_candidate(service, raw, where, kind):
    client, _ = service
    body = _body(3)
    body["candidates"][2]["features"]["raw"] = raw
    r, _ = _post(client, body)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "candidates", 2, *where] and error["type"] == kind, error
    body["candidates"][2]["features"]["raw"] = 12.5
    assert _post(client, body)[0].status_code == 200


def test_event_times_far_from_the_clock_are_refused(service):
    client, _ = service
    now = int(time.time() * 1000)
    assert _post(client, _body(3, event_time_ms=now))[0].status_code == 200
    for t in (32_503_680_000_000, now + 3_600_000, 0):  # year 3000, an hour ahead, 1970
        r, _ = _post(client, _body(3, event_time_ms=t))
        assert r.status_code == 422 and "event_time_ms" in r.text, r.text


def test_a_context_of_thousands_of_keys_is_refused_before_it_is_multiplied_into_the_log(service):
    # Every logged impression carries the context: 69,000 keys the model does not read (1 MB) made one
    # request write 90 MB to Kafka and hold the event loop for a second.
    client, _ = service
    body = _body(100, top_k=100)
    body["context"] = {"user": "u1", **{f"k{i}": "v" for i in range(5_000)}}
    r, _ = _post(client, body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "context"], r.text
    body = _body(3)
    body["candidates"][1]["features"] |= {f"k{i}": "v" for i in range(1_025)}
    r, _ = _post(client, body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "candidates", 1, "features"]
    body["candidates"][1]["features"] = {f"k{i}": "v" for i in range(1_024)}  # at the limit
    assert _post(client, body)[0].status_code == 200


def test_a_large_context_times_a_large_top_k_is_refused_before_it_is_multiplied_into_the_log(service):
    # Within every other limit: 120 keys of 4,000 characters (480 KB) logged with each of 2,000 impressions
    # wrote ~1 GB to Kafka and held the event loop 2.3 s.
    client, _ = service
    body = _body(2000, top_k=2000)
    body["context"] = {"user": "u1", **{f"k{i}": "x" * 4000 for i in range(120)}}
    r, took = _post(client, body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "top_k"] and "impression log" in detail["msg"], detail
    body["top_k"] = 30  # 30 x 480 KB: under the 16 MiB
    r, _ = _post(client, body)
    assert r.status_code == 200 and len(r.json()["ranking"]) == 30, r.text[:300]
    # Bytes, not characters: 150,000 emoji are 600 KB of UTF-8, 30 of them 18 MB (counted as 150 KB each,
    # they passed).
    body["context"] = {"user": "u1", "note": "\N{GRINNING FACE}" * 150_000}
    r, _ = _post(client, body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "top_k"], r.text[:300]


def test_oversized_bodies_get_413_fast(service):
    client, _ = service
    ten_mb = (
        b'{"request_id":"r","user_id":"u","candidates":['
        + b'{"item_id":"x"},' * 700_000
        + b'{"item_id":"y"}]}'
    )
    r, took = _post(client, ten_mb)
    assert r.status_code == 413 and took < 2.0
    hundred_k = _body(100_000)
    r, took = _post(client, hundred_k)
    assert r.status_code == 413 and took < 2.0
    # Chunked (no Content-Length): the limit holds while reading.
    r = client.post("/score", content=iter([ten_mb[i : i + 65536] for i in range(0, len(ten_mb), 65536)]))
    assert r.status_code == 413
    # Under the size bound but over the candidate bound: a 422 naming candidates.
    r, took = _post(client, _body(3000))
    assert r.status_code == 422 and "candidates" in r.text and took < 2.0


def test_a_compressed_body_gets_415_saying_so(service):
    # Parsed as JSON as it came: "invalid JSON ... (byte 0)", with no word of the encoding.
    import gzip

    client, _ = service
    body = gzip.compress(orjson.dumps(_body(3)))
    r = client.post("/score", content=body, headers={"content-encoding": "gzip"})
    assert r.status_code == 415 and "Content-Encoding gzip is not supported" in r.json()["detail"]
    same = client.post("/score", content=orjson.dumps(_body(3)), headers={"content-encoding": "identity"})
    assert same.status_code == 200  # the identity encoding is none


def test_a_body_declared_as_other_than_json_gets_415(service):
    # text/plain and forms need no CORS preflight: a web page could have scored (and logged) requests
    # on a loopback service from the user's browser.
    client, _ = service
    raw = orjson.dumps(_body(3))
    r = client.post("/score", content=raw, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "Content-Type text/plain is not JSON" in r.json()["detail"]
    ok = client.post("/score", content=raw, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_a_token_protects_everything_but_the_probes(service):
    _, url = service
    with httpx.Client(base_url=url, timeout=10) as anonymous:
        for path in ("/stats", "/metrics"):
            assert anonymous.get(path).status_code == 401
        assert anonymous.post("/score", json=_body(2)).status_code == 401
        wrong = anonymous.post("/score", json=_body(2), headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        # the scheme is case-insensitive (RFC 7235), the token and the scheme's name are not optional
        for header, status in (
            ("bearer s3cret-token", 200), ("BEARER s3cret-token", 200), ("Bearer S3CRET-TOKEN", 401),
            ("Basic s3cret-token", 401), ("s3cret-token", 401), ("Bearer", 401),
        ):  # fmt: skip
            r = anonymous.post("/score", json=_body(2), headers={"authorization": header})
            assert r.status_code == status, header


def test_metrics_answers_on_its_own_path_without_a_redirect(service):
    # The mount alone answered /metrics with a 307 to /metrics/: Prometheus follows it, curl does not.
    client, _ = service
    for path in ("/metrics", "/metrics/"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 200, (path, r.status_code)
        assert "# TYPE reloop_" in r.text


def test_answers_without_a_ranking_are_counted_by_status(service):
    # Only 200s were counted (reloop_serve_requests_total): a service failing every request looked idle.
    from reloop.engine.metrics.stats import STATS

    client, _ = service

    def failed() -> dict[str, float]:
        return {k[0]: v for k, v in STATS.serve_failed_requests.items()}

    before = failed()
    assert _post(client, b"{not json")[0].status_code == 422
    assert _post(client, _body(3, event_time_ms=0))[0].status_code == 422
    assert _post(client, b"x" * (2 << 20))[0].status_code == 413
    assert _post(client, _body(3))[0].status_code == 200
    after = failed()
    assert after.get("422", 0) - before.get("422", 0) == 2
    assert after.get("413", 0) - before.get("413", 0) == 1
    assert after.get("500", 0) == before.get("500", 0)


def _serving(tmp_path, **serve) -> tuple[ServingStack, str, str, str]:
    """A published model served on a free port with these serve settings (keep-alive 30 s, no log):
    the stack, its URL, host and port."""
    _published(tmp_path)
    settings = {"port": 0, "log": {"enabled": False}, "keep_alive_s": 30, **serve}
    config = serve_config_from_dict(
        {"serve": settings, "arms": [{"name": "A", "registry": str(tmp_path / "reg")}]}
    )
    stack = ServingStack(config).start()
    url = stack.serve_in_thread()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return stack, url, host, port


def test_slow_or_silent_clients_are_closed_at_the_read_timeout_and_others_are_served(tmp_path):
    # uvicorn times nothing before a request is read whole: a client that sent nothing, part of its
    # headers or part of its body held its connection for ever (20,000 of them used up the process's
    # file descriptors).
    import socket

    stack, url, host, port = _serving(tmp_path, read_timeout_s=1.0)
    body = orjson.dumps(_body(3))
    sends = {
        "nothing": b"",
        "part of its headers": b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Le",
        "part of its body": b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body[:10]),
        "a request, then part of the next": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /heal",
        # idle between requests: closed (keep_alive_s is longer here), but no failed request
        "a request, then nothing": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    slow = {}
    try:
        for what, data in sends.items():
            sock = socket.create_connection((host, int(port)))
            sock.sendall(data)
            sock.settimeout(10)
            slow[what] = sock
        with httpx.Client(base_url=url, timeout=10) as client:  # others are served meanwhile
            assert client.post("/score", content=body).status_code == 200
        start = time.monotonic()
        for what, sock in slow.items():
            received = b""
            while chunk := sock.recv(65536):  # b"": the service closed it
                received += chunk
            assert time.monotonic() - start < 5, what
            if what.startswith("a request"):
                assert received.startswith(b"HTTP/1.1 200"), received
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/stats").json()["failed_requests"] == {"408": 4}  # not the idle one
    finally:
        for sock in slow.values():
            sock.close()
        stack.close()


def test_connections_beyond_the_cap_get_a_503_at_once_and_the_others_are_served(tmp_path):
    # No cap: every connection was kept (until its read timeout), so a flood of them used up the file
    # descriptors the registry watcher and the Kafka client need.
    import socket

    stack, url, host, port = _serving(tmp_path, max_connections=3)
    body = orjson.dumps(_body(3))
    held: list[socket.socket] = []
    try:
        for _ in range(3):  # the cap's worth, sending nothing yet
            held.append(socket.create_connection((host, int(port))))
        time.sleep(0.3)  # accepted by the service
        with socket.create_connection((host, int(port))) as extra:
            extra.settimeout(10)
            answer = b""
            while chunk := extra.recv(65536):  # closed by the service after its answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"Retry-After: 1" in answer and b"serve.max_connections" in answer
        for _ in range(5):  # a client that sends its request at once gets the 503 too, not a reset
            with socket.create_connection((host, int(port))) as extra:
                extra.sendall(
                    b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                extra.settimeout(10)
                assert extra.recv(65536).startswith(b"HTTP/1.1 503 ")
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # one within the cap is served
        held[0].settimeout(10)
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200")
        for sock in held:
            sock.close()
        held.clear()
        time.sleep(0.3)  # their slots are free again
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post("/score", content=body).status_code == 200
            assert client.get("/stats").json()["failed_requests"] == {"503": 6}
    finally:
        for sock in held:
            sock.close()
        stack.close()
