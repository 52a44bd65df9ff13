"""The whole loop on a live stream: ``reloop run`` (two processes) fed at a fixed rate, one torch thread in
its train process against two.

Figure 9 (bench/suite_stages.py) times the loop through a backlog, where the join stage works flat out
beside the train stage. A live stream is different: the join stage works only at the input's rate and
leaves the rest of its core idle. This probe asks what ``reloop run``'s thread default (one core left to
the join process, docs/data-plane.md) gives there. For each input rate and train thread count it starts
``reloop run`` on fresh topics, waits until both stages run, then produces Criteo-shaped impressions at
the rate for ``--seconds`` (stamped as they are sent, a quarter of them clicked 10-1,500 ms later, each
click sent when it falls due), and reads the stages' progress lines (every 0.5 s) afterwards:

* joined/s and trained/s: the join and train stages' samples/s over the feed's last two thirds (steady
  state);
* kept up: trained/s within 3% of the input's rate;
* backlog: samples the join stage had sent by the feed's end that the train stage had not trained yet
  (both read off their progress lines at that moment): how far behind the stream training ran.

Run: ``python -m reloop.bench.live_loop --rates 10000,16000,22000 --threads 1,2 --rounds 2``
(a local broker is started; runs alternate their order round by round).
"""

from __future__ import annotations

import argparse
import heapq
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import yaml

REPO = Path(__file__).resolve().parents[1]
BATCH = 1024
WINDOW_MS = 2_000
PROGRESS_EVERY_S = 0.5


@dataclass
class LiveRun:
    rate: int
    threads: int
    sent: int
    joined_rate: float | None
    trained_rate: float | None
    backlog: int | None

    @property
    def kept_up(self) -> bool:
        return self.trained_rate is not None and self.trained_rate >= 0.97 * self.rate


def _events(n: int, seed: int) -> list[tuple[Any, int | None]]:
    """(impression, click delay ms or None) of ``n`` Criteo-shaped impressions, drawn as figure 9 draws
    them (bench/suite_e2e.py's ``make_events``); each is stamped anew when it is sent."""
    from reloop.bench.suite_e2e import make_events

    imps, clicks = make_events(n, seed)
    delays = {c.impression_id: c.event_time_ms for c in clicks}
    return [
        (imp, delays[imp.impression_id] - imp.event_time_ms if imp.impression_id in delays else None)
        for imp in imps[:-1]  # not the closing sentinel
    ]


def _feed(bootstrap: str, topics: tuple[str, str], events: list[Any], rate: int, seconds: float) -> int:
    """Produce impressions at ``rate`` per second for ``seconds`` (clicks when due); returns impressions
    sent. The events are encoded as they are sent, stamped with the send time."""
    from reloop.connectors.confluent.sink import ConfluentSink
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Click

    imps = ConfluentSink(bootstrap=bootstrap, topic=topics[0])
    clicks = ConfluentSink(bootstrap=bootstrap, topic=topics[1])
    due: list[tuple[int, str]] = []
    sent = 0
    t0 = time.monotonic()
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= seconds:
            break
        now_ms = int(time.time() * 1000)
        target = min(len(events), int(elapsed * rate))
        while sent < target:
            imp, delay = events[sent]
            iid = imp.impression_id
            imps.send(encode(replace(imp, event_time_ms=now_ms)), key=iid.encode(), timestamp_ms=now_ms)
            if delay is not None:
                heapq.heappush(due, (now_ms + delay, iid))
            sent += 1
        while due and due[0][0] <= now_ms:
            at, iid = heapq.heappop(due)
            clicks.send(encode(Click(impression_id=iid, event_time_ms=at)), key=iid.encode(), timestamp_ms=at)
        time.sleep(0.002)
    for at, iid in sorted(due):  # the clicks still to come: sent when due
        time.sleep(max(0.0, at / 1000 - time.time()))
        clicks.send(encode(Click(impression_id=iid, event_time_ms=at)), key=iid.encode(), timestamp_ms=at)
    imps.flush(30)
    clicks.flush(30)
    imps.close()
    clicks.close()
    return sent


def _config(work: Path, bootstrap: str, topics: tuple[str, str], threads: int) -> Path:
    from reloop.engine.features.spec import criteo_spec

    tag = uuid.uuid4().hex[:8]
    cfg = {
        "kafka": {"bootstrap": bootstrap},
        "source": {"impressions_topic": topics[0], "clicks_topic": topics[1]},
        "consumer": {"group_id": f"live-train-{tag}"},
        "sink": {"dead_letter_topic": None},
        "stages": {"samples_topic": f"live.samples.{tag}", "join_group_id": f"live-join-{tag}",
                   "join_checkpoint_every_s": 3600, "processes": 2},
        "join": {"window_ms": WINDOW_MS, "allowed_lateness_ms": 0, "idle_timeout_ms": 1_000},
        "model": {"backbone": "dcn", "strategy": "reloop", "alpha": 0.2, "spec": criteo_spec().to_dict()},
        "train": {"batch_size": BATCH, "threads": threads},
        "period": {"every_samples": 10**9},
        "checkpoint": {"dir": str(work / "snaps"), "keep": 2},
        "log": {"stats_every_s": PROGRESS_EVERY_S},
    }  # fmt: skip
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def live_run(bootstrap: str, rate: int, threads: int, seconds: float, events: list[Any]) -> LiveRun:
    from reloop.connectors.kafka.admin import create_topics

    suffix = uuid.uuid4().hex[:8]
    topics = (f"live.imp.{suffix}", f"live.clk.{suffix}")
    create_topics(bootstrap, {topics[0]: 1, topics[1]: 1})
    with tempfile.TemporaryDirectory(prefix="reloop-bench-live-") as tmp:
        work = Path(tmp)
        path = _config(work, bootstrap, topics, threads)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        with open(work / "run.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "reloop.engine.runtime.cli", "run", "--config", str(path)],
                cwd=REPO, stdout=log, stderr=log, env=env,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while (work / "run.log").read_text(errors="replace").count('"msg":"started","stage"') < 2:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("reloop run did not start: " + (work / "run.log").read_text()[-2000:])
                time.sleep(0.1)
            time.sleep(3)  # the train stage's first fetch and torch's start-up, before the stream
            fed: list[int] = []
            feeder = threading.Thread(
                target=lambda: fed.append(_feed(bootstrap, topics, events, rate, seconds)), daemon=True
            )
            t_start = time.time()
            feeder.start()
            time.sleep(seconds)
            t_end = time.time()
            feeder.join(60)
            sent = fed[0]
            time.sleep(2 * PROGRESS_EVERY_S)  # the progress lines just after the feed's end
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        text = (work / "run.log").read_text(errors="replace")
        trained = _progress(text)
        joined = _progress(text, "join", "samples_sent")
    steady_from = t_start + seconds / 3
    trained_end, joined_end = _at(trained, t_end), _at(joined, t_end)
    backlog = None if trained_end is None or joined_end is None else round(joined_end - trained_end)
    return LiveRun(
        rate, threads, sent, _rate(joined, steady_from, t_end), _rate(trained, steady_from, t_end), backlog
    )


def _at(points: list[tuple[float, int]], t: float) -> float | None:
    """The count at time ``t``, interpolated between the progress lines around it."""
    for (t0, n0), (t1, n1) in zip(points, points[1:], strict=False):
        if t0 <= t <= t1:
            return n0 + (n1 - n0) * (t - t0) / (t1 - t0) if t1 > t0 else float(n1)
    return None


def _rate(points: list[tuple[float, int]], start: float, end: float) -> float | None:
    first, last = _at(points, start), _at(points, end)
    return None if first is None or last is None else (last - first) / (end - start)


def _progress(log_text: str, stage: str = "train", count: str = "samples_trained") -> list[tuple[float, int]]:
    """(Unix time, ``count``) of ``stage``'s progress lines in a run's log."""
    out = []
    for line in log_text.splitlines():
        if '"msg":"progress"' in line and f'"stage":"{stage}"' in line:
            entry = orjson.loads(line)
            out.append((entry["ts"], entry[count]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates", default="10000,16000,22000", help="impressions per second, comma-separated"
    )
    parser.add_argument(
        "--threads", default="1,2", help="torch threads of the train process, comma-separated"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the stream runs")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    from reloop.bench.suite_broker import local_broker

    rates = [int(r) for r in args.rates.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    events = _events(int(max(rates) * args.seconds) + 1, seed=0)
    runs: list[LiveRun] = []
    print(f"load at start {os.getloadavg()}, {os.cpu_count()} cores", flush=True)
    with local_broker() as bootstrap:
        for r in range(args.rounds):
            order = [(rate, t) for rate in rates for t in thread_counts]
            for rate, threads in order if r % 2 == 0 else order[::-1]:
                run = live_run(bootstrap, rate, threads, args.seconds, events)
                runs.append(run)
                print(f"round {r + 1}: {run}", flush=True)
    print(f"load at end {os.getloadavg()}")
    print("\n| input impressions/s | train threads | joined/s | trained/s | kept up | backlog at the end |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in runs:
        joined, trained = (
            f"{x:,.0f}" if x is not None else "n/a" for x in (run.joined_rate, run.trained_rate)
        )
        backlog = f"{run.backlog:,}" if run.backlog is not None else "n/a"
        kept = "yes" if run.kept_up else "no"
        print(f"| {run.rate:,} | {run.threads} | {joined} | {trained} | {kept} | {backlog} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
