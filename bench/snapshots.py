"""Figure 5: snapshot write time and publish-to-serving time against model size.

    python -m reloop.bench --only snapshots              # through the suite (writes to stdout)
    python -m reloop.bench.snapshots --rows 1e5,1e6 --rounds 3

Model: DCN on the Criteo layout (13 log-bucketed numeric + 26 hashed fields), embedding dim 16, the
table sized to 1e5 / 1e6 / 1e7 rows, after one training step so the optimizer's full-size state
exists: the snapshot holds what the stream processor publishes (``learner.state_dict()``: weights,
optimizer state, RNG, config), preceded by the serving bundle (weights only).

* write time: ``SnapshotRegistry.publish`` (torch.save to memory, CRC32C, write + fsync each part and the
  manifest, rename, fsync the root) against a bare ``torch.save`` of the same state dict to a file on
  the same disk.
* publish-to-serving: from the start of the trainer's publish (serving bundle, then snapshot) in this
  process until a serving process (a child running the scoring service's own ``ReloadWatcher`` and
  loader) has the new version swapped in, read from the child's report of ``time.time()`` on the same
  host. Baseline: a bare ``torch.save`` + ``torch.load(weights_only=True)`` of the same weights.

Both pairs are alternated round by round in one process; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from reloop.bench.suite import Context, Figure, Row, alternate, fmt_number

COMMAND = "python -m reloop.bench --only snapshots"
WATCH_INTERVAL_S = 0.05
NUMERIC_ROWS = 13 * 1001  # the Criteo spec's numeric fields, bucketed
MIN_ROWS = NUMERIC_ROWS + 26 * 3  # every categorical field 2 buckets or more
TITLE = "5. Snapshots: write and publish-to-serving time"


# ------------------------------------------------------------------------------------------ model
def trained_learner(rows: int, dim: int = 16, seed: int = 0) -> tuple[Any, int]:
    """A DCN with about ``rows`` embedding rows after one step; (learner, rows)."""
    import numpy as np
    import torch
    from reloop.engine.features.featurizer import Featurizer
    from reloop.engine.features.spec import criteo_spec
    from reloop.engine.models.registry import build_learner

    numeric_rows = NUMERIC_ROWS
    spec = criteo_spec(buckets=max(1, (rows - numeric_rows) // 26 - 1), numeric_buckets=1000)
    torch.set_num_threads(1)
    learner = build_learner("dcn", spec, "reloop", 0.2, seed=seed, embedding_dim=dim)
    rng = np.random.default_rng(seed)
    feats = [
        {
            **{f"I{i}": float(rng.integers(0, 1000)) for i in range(1, 14)},
            **{f"C{i}": f"{rng.integers(0, 1 << 30):x}" for i in range(1, 27)},
        }
        for _ in range(256)
    ]
    batch = Featurizer(spec).transform(feats)
    learner.learn(batch, rng.integers(0, 2, 256).astype(np.float32))
    return learner, spec.total_rows


def state_bytes(state: Any) -> int:
    import torch

    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state)
    return 0


# ------------------------------------------------------------------------------------------ watcher
def watch(root: Path, interval_s: float) -> int:
    """The serving side, run as a child process: the scoring service's reload watcher and loader on
    ``root``; prints one JSON line per version swapped in (times are ``time.time()``)."""
    import psutil
    import torch
    from reloop.engine.serve.bundle import ModelHolder
    from reloop.engine.serve.config import ArmConfig
    from reloop.engine.serve.reload import ArmSource, ReloadWatcher
    from reloop.engine.serve.stack import registry_loader_factory

    torch.set_num_threads(1)
    latest, load_version, _ = registry_loader_factory(ArmConfig(name="bench", registry=root))
    holder = ModelHolder()
    seen: dict[int, float] = {}

    def load(version: int):
        seen[version] = time.time()
        return load_version(version)

    watcher = ReloadWatcher(
        sources=[ArmSource(name="bench", holder=holder, latest=latest, load=load)],
        interval_s=interval_s,
    )
    # The runtime: everything a service imports before its first model (the backbone registry and its
    # plugins, safetensors), so that the RSS after a load minus this is the model's own share.
    # One tiny model through the whole load path (torch's meta device, safetensors, the backbone
    # registry and its plugins): their one-time imports and allocations are runtime, not model.
    import tempfile

    from reloop.engine.features.spec import FeatureSpec
    from reloop.engine.models.registry import build_learner
    from reloop.engine.serve.bundle_format import learner_from_bundle, read_bundle, write_bundle

    spec = FeatureSpec.from_dict({"fields": [{"kind": "categorical", "name": "a", "buckets": 8}]})
    tiny = build_learner("dcn", spec, "ce", 0.0)
    with tempfile.TemporaryDirectory() as warm:
        write_bundle(warm, 1, tiny)
        learner_from_bundle(*read_bundle(warm, 1))
    del tiny
    proc = psutil.Process()
    gc.collect()
    print(json.dumps({"ready": True, "rss": proc.memory_info().rss}), flush=True)
    # The watcher's own loop (ReloadWatcher._run), with a report after each swap.
    while True:
        if watcher.poll_once():
            v = holder.version
            loaded = time.time()
            gc.collect()
            rss = proc.memory_info().rss
            print(json.dumps({"version": v, "seen": seen.get(v), "loaded": loaded, "rss": rss}), flush=True)
        if watcher.refused:
            print(json.dumps({"refused": watcher.refused}), flush=True)
            return 1
        time.sleep(interval_s)


class Watcher:
    """The child process running ``watch``; ``wait_for(version)`` returns its report for that version."""

    def __init__(self, root: Path, interval_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reloop.bench.snapshots", "--watch", str(root),
             "--interval", str(interval_s)],
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self._line(120.0)
        if not first.get("ready"):
            raise RuntimeError(f"snapshot watcher did not start: {first}")
        self.runtime_rss = int(first["rss"])

    def _line(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"snapshot watcher silent for {timeout_s:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"snapshot watcher exited with status {self.proc.wait()}")
        return json.loads(line)

    def wait_for(self, version: int, timeout_s: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            report = self._line(max(0.1, deadline - time.monotonic()))
            if "refused" in report:
                raise RuntimeError(f"the serving side refused a snapshot: {report}")
            if report.get("version") == version:
                return report
            if time.monotonic() > deadline:
                raise TimeoutError(f"snapshot v{version} not served within {timeout_s:.0f} s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ------------------------------------------------------------------------------------------ measure
def measure(
    rows: int,
    rounds: int,
    work: Path,
    interval_s: float = WATCH_INTERVAL_S,
    profile_over_s: float | None = None,
) -> dict[str, Any]:
    """Both alternations for one size; with ``profile_over_s``, when the median publish-to-serving time
    exceeds it, also cProfile one publish and one serving-side load in this process."""
    import torch
    from reloop.engine.checkpoint.registry import SnapshotRegistry
    from reloop.engine.serve.bundle_format import publish_serving_bundle, serving_tensors

    learner, actual_rows = trained_learner(rows)
    state = learner.state_dict()
    nbytes = state_bytes(state)
    bundle_tensors = serving_tensors(learner)
    assert bundle_tensors is not None
    weights = dict(bundle_tensors[0])
    weight_bytes = state_bytes(weights)
    root = work / f"reg-{rows}"
    registry = SnapshotRegistry(root, keep=2)
    bare = work / f"bare-{rows}.pt"
    detail: dict[str, list[float]] = {"detect_s": [], "load_s": [], "publish_s": [], "bundle_s": []}
    rss: list[int] = []

    def publish_write() -> float:
        t0 = time.perf_counter()
        registry.publish({"model": state}, meta={"bench": "write"})
        return time.perf_counter() - t0

    def bare_save() -> float:
        t0 = time.perf_counter()
        torch.save(state, bare)
        return time.perf_counter() - t0

    # No serving process during the write rounds: its loads would compete with the writes for the disk.
    write, write_base, write_ratio = alternate(publish_write, bare_save, rounds)
    watcher = Watcher(root, interval_s)
    try:
        watcher.wait_for(registry.latest_version() or 0)

        def publish_to_serving() -> float:
            # What the trainer does at a period boundary: the serving bundle, then the snapshot.
            t0 = time.time()
            publish_serving_bundle(registry, learner)
            tb = time.time()
            version = registry.publish({"model": state}, meta={"bench": "serve"})
            t1 = time.time()
            report = watcher.wait_for(version)
            detail["bundle_s"].append(tb - t0)
            detail["publish_s"].append(t1 - tb)
            detail["detect_s"].append(report["seen"] - tb)
            detail["load_s"].append(report["loaded"] - report["seen"])
            rss.append(int(report["rss"]))
            return report["loaded"] - t0

        def bare_save_load() -> float:
            t0 = time.perf_counter()
            torch.save(weights, bare)
            torch.load(bare, map_location="cpu", weights_only=True)
            return time.perf_counter() - t0

        serve, serve_base, serve_ratio = alternate(publish_to_serving, bare_save_load, rounds)
        runtime_rss = watcher.runtime_rss
    finally:
        watcher.close()
        bare.unlink(missing_ok=True)
    for k in detail:  # drop the warm-up round
        detail[k] = detail[k][1:]
    profiles: list[str] = []
    if profile_over_s is not None and _median(serve) > profile_over_s:
        from reloop.bench.suite_profile import cprofile_top
        from reloop.engine.serve.loader import load_serving_bundle

        version, text = cprofile_top(lambda: publish_serving_bundle(registry, learner))
        profiles.append("`publish_serving_bundle` (the trainer's side), " + text)
        _, text = cprofile_top(lambda: load_serving_bundle(registry, version))
        profiles.append("`load_serving_bundle` (the serving side's load), " + text)
    return {
        "weight_bytes": weight_bytes,
        "runtime_rss": runtime_rss,
        "served_rss": rss[-1] if rss else 0,
        "profiles": profiles,
        "rows": actual_rows,
        "bytes": nbytes,
        "write_s": write,
        "bare_save_s": write_base,
        "write_ratio": write_ratio,
        "serve_s": serve,
        "bare_save_load_s": serve_base,
        "serve_ratio": serve_ratio,
        **detail,
    }


def _median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else float("nan")


def _disk_note(work: Path) -> str:
    try:
        st = os.statvfs(work)
        return f"{st.f_bavail * st.f_frsize / 2**30:.0f} GiB free"
    except OSError:
        return "?"


def run(ctx: Context) -> Figure:
    sizes = ctx.pick([100_000, 1_000_000, 10_000_000], [100_000, 1_000_000])
    rounds = max(2, min(ctx.rounds, ctx.pick(3, 2)))
    rows: list[Row] = []
    table = [
        "| rows | snapshot MB | bundle MB | publish s | bare save s | ratio | publish-to-serving s | "
        "bare save+load (weights) s | ratio | of which: bundle / snapshot / detect / load s | "
        "serving RSS over runtime MB (x bundle) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    base_dir = os.environ.get("RELOOP_BENCH_TMP") or None
    profiles: list[str] = []
    targets = {1_000_000: 0.3, 10_000_000: 1.0}
    with tempfile.TemporaryDirectory(prefix="reloop-bench-snap-", dir=base_dir) as tmp:
        work = Path(tmp)
        disk = _disk_note(work)
        for n in sizes:
            # 1e7 rows: ~2 GB per snapshot, tens of seconds per round; two rounds keep the run bounded.
            r = measure(n, rounds if n < 10_000_000 else 2, work, profile_over_s=targets.get(n))
            profiles += r["profiles"]
            label = f"{n:.0e}".replace("+0", "")
            w, wb = _median(r["write_s"]), _median(r["bare_save_s"])
            s, sb = _median(r["serve_s"]), _median(r["bare_save_load_s"])
            rows.append(
                Row(
                    figure=f"snapshot write, {label} rows ({r['bytes'] / 2**20:.0f} MB)",
                    value=w,
                    unit="s",
                    baseline_name="bare torch.save, same state, same disk",
                    baseline_value=wb,
                    ratio=r["write_ratio"],
                    command=COMMAND,
                )
            )
            target = targets.get(n)
            rows.append(
                Row(
                    figure=f"publish-to-serving, {label} rows (serving bundle)",
                    value=s,
                    unit="s",
                    baseline_name="bare torch.save + torch.load of the weights",
                    baseline_value=sb,
                    ratio=r["serve_ratio"],
                    target=f"<= {target:g} s" if target else "",
                    met=(s <= target) if target else None,
                    command=COMMAND,
                )
            )
            over = (r["served_rss"] - r["runtime_rss"]) / 2**20
            bundle_mb = r["weight_bytes"] / 2**20
            if n >= 1_000_000:
                rows.append(
                    Row(
                        figure=f"serving RSS over runtime, {label} rows",
                        value=over,
                        unit="MB",
                        baseline_name="serving bundle (weights) MB",
                        baseline_value=bundle_mb,
                        ratio=over / bundle_mb,
                        target="<= 1.3 x weights",
                        met=over <= 1.3 * bundle_mb,
                        command=COMMAND,
                    )
                )
            table.append(
                f"| {r['rows']:,} | {r['bytes'] / 2**20:.0f} | {bundle_mb:.0f} | {w:.3f} | {wb:.3f} | "
                f"{r['write_ratio']:.2f} | {s:.3f} | {sb:.3f} | {r['serve_ratio']:.2f} | "
                f"{_median(r['bundle_s']):.3f} / {_median(r['publish_s']):.3f} / "
                f"{_median(r['detect_s']):.3f} / {_median(r['load_s']):.3f} | "
                f"{over:.0f} ({over / bundle_mb:.2f}x; runtime {r['runtime_rss'] / 2**20:.0f} MB) |"
            )
            gc.collect()
    notes = (
        f"DCN (Criteo layout: 13 numeric + 26 hashed fields, embedding dim 16, cross 3, default MLP) "
        f"after one step with the default optimizer (Adagrad embeddings, Adam dense, no wide part), so "
        f"the training snapshot holds weights + optimizer state. {rounds} rounds per "
        f"size (2 at 1e7 rows), alternating with the baseline; medians shown. Temporary registry on the "
        f"local disk ({disk}; set RELOOP_BENCH_TMP to use another).\n\n" + "\n".join(table) + "\n\n"
        "Publish-to-serving is what the trainer does at a period boundary, from its start: "
        "`publish_serving_bundle` (weights only, engine/serve/bundle_format.py: safetensors + CRC32C "
        "manifest, renamed into place, not fsynced: a torn bundle fails its checksum and the snapshot "
        "serves), then `SnapshotRegistry.publish` of the training state, "
        "until a separate serving process has the version swapped in. The serving side runs the "
        "service's own `ReloadWatcher` and loader (`reloop.engine.serve.stack.registry_loader_factory`), "
        f"polling every {WATCH_INTERVAL_S * 1000:.0f} ms: it sees the bundle while the snapshot is still "
        "being written (*detect* is from the end of the bundle write; the two compete for the 2 cores "
        "and the disk), and its load reads + checksums the bundle, builds the model on the meta device "
        "(no random init) and takes the tensors as loaded; the optimizer state is never read. "
        "The service's default `reload_interval_s` is 1.0 s: add on average 0.5 s of detection (set "
        "`serve.reload_interval_s` lower where that matters; a poll is one directory listing). "
        "Baseline: a bare `torch.save` + `torch.load(weights_only=True)` of the same weights in one "
        "process. RSS: the serving process's resident memory after the last load minus its resident "
        "memory before the first (the runtime: Python, torch, the service's modules), against the "
        "bundle's size."
    )
    if profiles:
        notes += "\n\nA target is missed; where the time goes:\n\n" + "\n\n".join(profiles)
    return Figure(key="snapshots", title=TITLE, rows=rows, notes=notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watch", type=Path, help=argparse.SUPPRESS)  # the child: serve from this registry
    parser.add_argument("--interval", type=float, default=WATCH_INTERVAL_S)
    parser.add_argument("--rows", default="1e5,1e6,1e7", help="comma-separated embedding-row counts")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.watch is not None:
        return watch(args.watch, args.interval)
    sizes = [int(float(x)) for x in args.rows.split(",")]
    if min(sizes) < MIN_ROWS:  # a traceback (a spec of 1 bucket per field) said it
        parser.error(f"--rows: at least {MIN_ROWS:,} (13 numeric fields of 1,001 rows, 26 of 2 or more)")
    with tempfile.TemporaryDirectory(prefix="reloop-bench-snap-") as tmp:
        for n in sizes:
            r = measure(n, args.rounds, Path(tmp))
            print(
                f"{r['rows']:,} rows, {r['bytes'] / 2**20:.0f} MB: "
                f"publish {fmt_number(_median(r['write_s']))} s "
                f"(bare save {fmt_number(_median(r['bare_save_s']))} s, ratio {r['write_ratio']:.2f}); "
                f"publish-to-serving {fmt_number(_median(r['serve_s']))} s (bare save+load "
                f"{fmt_number(_median(r['bare_save_load_s']))} s, ratio {r['serve_ratio']:.2f}); "
                f"publish/detect/load {_median(r['publish_s']):.3f}/{_median(r['detect_s']):.3f}/"
                f"{_median(r['load_s']):.3f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
