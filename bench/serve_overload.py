"""One scoring worker pushed past what it can score, with and without load shedding
(``serve.limits.max_queue_ms``).

    .venv/bin/python bench/serve_overload.py --connections 200 --seconds 10 --rounds 2

Closed loop: each of ``--connections`` keep-alive connections sends its next request as soon as the last
one is answered, so the offered load is whatever the service can take plus a queue of one request per
connection. Two ``reloop serve`` processes (without impression logging) share the snapshot, one with
``max_queue_ms`` and one without; they run one at a time, alternating round by round. Reported per mode:
requests scored (200) per second and their client-side p50/p99/max, and the 503s (shed, unscored).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import _bodies, _publish_snapshot, _start_service, _wait_ready  # noqa: E402


def _framed(bodies: list[bytes]) -> list[bytes]:
    head = (
        b"POST /score HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    )
    return [head % len(b) + b for b in bodies]


async def _answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def _load(port: int, requests: list[bytes], connections: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    stop = time.monotonic() + seconds

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += connections
            try:
                status = await _answer(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - t0)
        writer.close()

    began = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(connections)))
    return {"latencies": latencies, "statuses": statuses, "seconds": time.monotonic() - began}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0, help="per round and mode")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--max-queue-ms", type=float, default=100.0, help="the shedding mode's limit")
    ap.add_argument("--backbone", default="fm")
    ap.add_argument("--embedding-dim", type=int, default=8)
    args = ap.parse_args()
    params = {"embedding_dim": args.embedding_dim}
    requests = _framed(_bodies(500, args.candidates))
    work = Path(tempfile.mkdtemp(prefix="reloop-bench-overload-"))
    try:
        pooled = _run(args, work, requests, params)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(args, pooled)
    return 0


def _run(args: argparse.Namespace, work: Path, requests: list[bytes], params: dict) -> dict[str, list[dict]]:
    from reloop.connectors.kafka.local_broker import free_port

    _publish_snapshot(work / "reg", args.backbone, params)
    modes = {"unbounded": None, f"max_queue_ms {args.max_queue_ms:g}": args.max_queue_ms}
    pooled: dict[str, list[dict]] = {mode: [] for mode in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else reversed(list(modes)):
            port = free_port()
            config = {
                "serve": {"top_k": 10, "reload_interval_s": 1.0, "limits": {"max_queue_ms": modes[mode]}},
                "arms": [{"name": "A", "registry": str(work / "reg")}],
            }
            proc = _start_service(config, work / "serve.yaml", port, log=False, out=work / f"serve-{r}.out")
            try:
                _wait_ready(f"http://127.0.0.1:{port}")
                asyncio.run(_load(port, requests, 8, 1.0))  # warm-up
                pooled[mode].append(asyncio.run(_load(port, requests, args.connections, args.seconds)))
            finally:
                proc.terminate()
                proc.wait(30)
    return pooled


def _report(args: argparse.Namespace, pooled: dict[str, list[dict]]) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the "
        f"end; one serve worker (torch 1 thread), {args.candidates} candidates, {args.backbone} "
        f"(dim {args.embedding_dim}); closed loop, {args.connections} connections; {args.rounds} rounds x "
        f"{args.seconds:g} s per mode; the load generator shares the machine"
    )
    print("| mode | scored/s | p50 ms | p99 ms | max ms | 503/s | other |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, runs in pooled.items():
        lat = np.array([x for run in runs for x in run["latencies"]]) * 1e3
        seconds = sum(run["seconds"] for run in runs)
        statuses: dict[str, int] = {}
        for run in runs:
            for k, v in run["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        shed = statuses.pop("503", 0)
        statuses.pop("200", None)
        p50, p99 = np.percentile(lat, [50, 99])
        print(
            f"| {mode} | {len(lat) / seconds:.0f} | {p50:.0f} | {p99:.0f} | {lat.max():.0f} | "
            f"{shed / seconds:.0f} | {statuses or '-'} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
