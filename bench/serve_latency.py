"""Scoring-service latency for 100 candidates at a fixed request rate, with and without impression logging.

    .venv/bin/python bench/serve_latency.py --rate 100 --seconds 10 --rounds 4

Two service processes (``reloop serve``) run side by side on loopback with the same snapshot: one logs
impressions to a real local Kafka broker, one does not (``--no-log``). An open-loop load generator
(requests leave on a fixed schedule whatever the answers do, so a slow answer cannot hide the queue
behind it) alternates between them round by round; latency is measured from each request's scheduled
send time to its answer, client side. Reported: p50/p99 per mode (all rounds pooled), the per-round
p50/p99 ratio log/no-log and its median, and the service's own logging counters (sent, dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]


def _bodies(n: int, candidates: int, seed: int = 0) -> list[bytes]:
    from reloop.engine.simulate.world import World, WorldConfig

    world = World(WorldConfig(seed=seed, n_items=max(500, candidates), n_candidates=candidates))
    out = []
    for i in range(n):
        req = world.sample_request(float(i))
        ctx = world.context_features(req)
        body = {
            "request_id": f"bench-{i}",
            "user_id": ctx["user_id"],
            "context": ctx,
            "candidates": [
                {"item_id": world.item_id(it), "features": world.item_features(it)}
                for it in req.candidates.tolist()
            ],
            "top_k": 10,
        }
        out.append(orjson.dumps(body))
    return out


class _NullSink:
    """Accepts and discards: isolates the request-path cost of logging from Kafka itself."""

    def send(self, value, key=None, timestamp_ms=None):
        pass

    def flush(self, timeout_s=None):
        pass

    def close(self):
        pass


def inprocess(bodies: list[bytes], backbone: str, params: dict, rounds: int) -> None:
    """``ScoringService.score`` alone (parse excluded), with a logger (null sink) vs without, alternating."""
    import torch
    from reloop.engine.events.codec import encode
    from reloop.engine.features.featurizer import Featurizer
    from reloop.engine.features.spec import FeatureSpec
    from reloop.engine.models.registry import build_learner
    from reloop.engine.serve.arms import ArmRouter
    from reloop.engine.serve.bundle import ModelBundle, ModelHolder
    from reloop.engine.serve.impression_log import ImpressionLogger
    from reloop.engine.serve.schema import ScoreRequest
    from reloop.engine.serve.service import ArmRuntime, ScoringService
    from reloop.engine.simulate.spec import world_spec_dict

    torch.set_num_threads(1)
    spec = FeatureSpec.from_dict(world_spec_dict())
    learner = build_learner(backbone, spec, "reloop", 0.5, seed=0, **params).clone_frozen()
    bundle = ModelBundle(version=1, learner=learner, featurizer=Featurizer(spec))
    logger = ImpressionLogger(sink=_NullSink(), encode=encode, arm="A").start()
    services = {
        mode: ScoringService(
            router=ArmRouter([("A", 1.0)], salt="b"),
            arms={"A": ArmRuntime("A", ModelHolder(bundle), logger if mode == "log" else None)},
        )
        for mode in ("log", "nolog")
    }
    requests = [ScoreRequest.model_validate_json(b) for b in bodies]
    times: dict[str, list[float]] = {"log": [], "nolog": []}
    for r in range(rounds * 2):
        mode = ("log", "nolog")[r % 2]
        for req in requests:
            t0 = time.perf_counter()
            services[mode].score(req)
            times[mode].append(time.perf_counter() - t0)
    logger.close()
    parse = []
    for b in bodies:
        t0 = time.perf_counter()
        ScoreRequest.model_validate_json(b)
        parse.append(time.perf_counter() - t0)
    print("in-process ScoringService.score (no HTTP), 100 candidates:")
    for mode in ("nolog", "log"):
        lat = np.array(times[mode]) * 1e3
        p50, p99 = np.percentile(lat, [50, 99])
        print(f"  {mode:5s}: p50 {p50:.3f} ms, p99 {p99:.3f} ms (n={len(lat)})")
    print(f"  request JSON parse + validation: p50 {np.percentile(np.array(parse) * 1e3, 50):.3f} ms")


def _publish_snapshot(root: Path, backbone: str, params: dict) -> None:
    from reloop.engine.checkpoint.registry import SnapshotRegistry
    from reloop.engine.features.spec import FeatureSpec
    from reloop.engine.models.registry import build_learner
    from reloop.engine.simulate.spec import world_spec_dict

    spec = FeatureSpec.from_dict(world_spec_dict())
    learner = build_learner(backbone, spec, "reloop", 0.5, seed=0, **params)
    SnapshotRegistry(root).publish({"model": learner.state_dict()}, meta={})


def _start_service(config: dict, path: Path, port: int, *, log: bool, out: Path) -> subprocess.Popen:
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", str(path),
           "--port", str(port)]
    if not log:
        cmd.append("--no-log")
    return subprocess.Popen(cmd, cwd=REPO, stdout=out.open("wb"), stderr=subprocess.STDOUT)


def _wait_ready(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"service at {url} not ready")


async def _load(url: str, bodies: list[bytes], rate: float, seconds: float) -> tuple[np.ndarray, int]:
    """Open loop: request i leaves at start + i/rate; returns latencies (s) from the scheduled time."""
    n = int(rate * seconds)
    latencies = np.full(n, np.nan)
    errors = 0
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as client:
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            nonlocal errors
            at = start + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                r = await client.post(
                    "/score", content=bodies[i % len(bodies)], headers={"content-type": "application/json"}
                )
            except httpx.HTTPError:
                errors += 1
                return
            if r.status_code != 200:
                errors += 1
                return
            latencies[i] = time.perf_counter() - at

        await asyncio.gather(*(one(i) for i in range(n)))
    return latencies[~np.isnan(latencies)], errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second")
    ap.add_argument("--seconds", type=float, default=10.0, help="per round and mode")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--backbone", default="fm", help="fm (the demo's model) or dcn ...")
    ap.add_argument("--embedding-dim", type=int, default=8)
    ap.add_argument("--inprocess-only", action="store_true", help="only the in-process breakdown")
    args = ap.parse_args()
    params = {"embedding_dim": args.embedding_dim}
    bodies = _bodies(500, args.candidates)
    inprocess(bodies, args.backbone, params, rounds=args.rounds)
    if args.inprocess_only:
        return 0

    from reloop.connectors.kafka.admin import create_topics
    from reloop.connectors.kafka.local_broker import LocalBroker, free_port

    work = Path(tempfile.mkdtemp(prefix="reloop-bench-serve-"))
    _publish_snapshot(work / "reg", args.backbone, params)
    broker = LocalBroker(work / "kafka")
    procs: list[subprocess.Popen] = []
    try:
        from reloop.engine.runtime.demo import start_broker

        bootstrap = start_broker(broker)
        create_topics(bootstrap, {"bench.impressions": 1})
        config = {
            "serve": {"top_k": 10, "reload_interval_s": 1.0},
            "arms": [{"name": "A", "registry": str(work / "reg"), "impressions_topic": "bench.impressions"}],
            "kafka": {"bootstrap": bootstrap},
        }
        urls = {}
        for mode, log in (("log", True), ("nolog", False)):
            port = free_port()
            procs.append(
                _start_service(config, work / f"{mode}.yaml", port, log=log, out=work / f"{mode}.out")
            )
            urls[mode] = f"http://127.0.0.1:{port}"
        for url in urls.values():
            _wait_ready(url)
        # Warm-up (JIT-free, but caches, connection pools and torch's first calls).
        for url in urls.values():
            asyncio.run(_load(url, bodies, args.rate, 2.0))
        pooled: dict[str, list[np.ndarray]] = {"log": [], "nolog": []}
        ratios_p50, ratios_p99, errors = [], [], {"log": 0, "nolog": 0}
        for r in range(args.rounds):
            order = ("log", "nolog") if r % 2 == 0 else ("nolog", "log")
            this = {}
            for mode in order:
                lat, err = asyncio.run(_load(urls[mode], bodies, args.rate, args.seconds))
                errors[mode] += err
                pooled[mode].append(lat)
                this[mode] = (np.percentile(lat, 50), np.percentile(lat, 99))
            ratios_p50.append(this["log"][0] / this["nolog"][0])
            ratios_p99.append(this["log"][1] / this["nolog"][1])
            print(
                f"round {r}: log p50 {this['log'][0] * 1e3:.2f} ms p99 {this['log'][1] * 1e3:.2f} ms | "
                f"no-log p50 {this['nolog'][0] * 1e3:.2f} ms p99 {this['nolog'][1] * 1e3:.2f} ms",
                flush=True,
            )
        time.sleep(1.0)
        stats = httpx.get(urls["log"] + "/stats").json()["arms"]["A"]
        print()
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs; {args.candidates} candidates, "
            f"top-10 logged, {args.backbone} (dim {args.embedding_dim}), open loop at {args.rate:.0f} req/s, "
            f"{args.rounds} rounds x {args.seconds:.0f} s per mode"
        )
        print("| mode | requests | p50 ms | p90 ms | p99 ms | max ms | errors |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for mode in ("nolog", "log"):
            lat = np.concatenate(pooled[mode]) * 1e3
            p50, p90, p99 = np.percentile(lat, [50, 90, 99])
            label = "with impression logging" if mode == "log" else "without logging"
            row = (
                label,
                len(lat),
                f"{p50:.2f}",
                f"{p90:.2f}",
                f"{p99:.2f}",
                f"{lat.max():.2f}",
                errors[mode],
            )
            print("| " + " | ".join(map(str, row)) + " |")
        print(
            f"median per-round ratio log/no-log: p50 {statistics.median(ratios_p50):.3f}, "
            f"p99 {statistics.median(ratios_p99):.3f}"
        )
        print(
            f"impressions logged by the service: sent {stats['impressions_sent']}, "
            f"dropped {stats['impressions_dropped']}, pending {stats['impressions_pending']}"
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
