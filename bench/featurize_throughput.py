"""Featurisation rate for 39 Criteo-like fields: the vectorised Featurizer vs a per-sample Python loop.

Both produce identical rows (checked). They run alternately in the same process over several rounds and
the median ratio is reported (the machine's speed drifts between processes: docs/performance.md).

    .venv/bin/python -m reloop.bench.featurize_throughput [--batch 4096] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from reloop.engine.features.featurizer import Featurizer, log_bucket
from reloop.engine.features.spec import FeatureSpec, criteo_spec

_OFFSET = 0xCBF29CE484222325
_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def _fnv_py(s: str) -> int:
    h = _OFFSET
    for byte in s.encode():
        h = ((h ^ byte) * _PRIME) & _MASK
    return h


def _mix_py(k: int) -> int:
    z = (k + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def per_sample_rows(spec: FeatureSpec, features: list[dict]) -> np.ndarray:
    """The same rows as Featurizer.transform(...).cat, one sample and one field at a time."""
    out = np.zeros((len(features), len(spec.cat_fields)), dtype=np.int64)
    for i, d in enumerate(features):
        for j, (f, off) in enumerate(zip(spec.cat_fields, spec.cat_offsets, strict=True)):
            v = d.get(f.name)
            if v is None or v == "":
                out[i, j] = off
            elif f.kind == "numeric":
                k = int(log_bucket(np.array([float(v)]))[0])
                out[i, j] = off + 1 + _mix_py(k & _MASK) % (f.buckets - 1)
            else:
                out[i, j] = off + 1 + _fnv_py(str(v)) % (f.buckets - 1)
    return out


def criteo_like_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    ints = rng.geometric(0.02, size=(n, 13)) - 1
    cats = rng.zipf(1.3, size=(n, 26)) % 200_000
    missing = rng.random((n, 39)) < 0.1
    rows = []
    for i in range(n):
        d: dict = {}
        for j in range(13):
            if not missing[i, j]:
                d[f"I{j + 1}"] = int(ints[i, j])
        for j in range(26):
            if not missing[i, 13 + j]:
                d[f"C{j + 1}"] = format(int(cats[i, j]) * 2654435761 % 2**32, "08x")
        rows.append(d)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    spec = criteo_spec()
    fz = Featurizer(spec)
    rows = criteo_like_rows(args.batch)
    assert np.array_equal(fz.transform(rows).cat, per_sample_rows(spec, rows)), "implementations disagree"
    # CPU time (process_time) as well as wall time: the shared machine's load inflates wall time.
    wall: dict[str, list[float]] = {"vec": [], "loop": []}
    cpu: dict[str, list[float]] = {"vec": [], "loop": []}
    for _ in range(args.rounds):
        for key, fn in (("vec", lambda: fz.transform(rows)), ("loop", lambda: per_sample_rows(spec, rows))):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(args.batch / (time.perf_counter() - t))
            cpu[key].append(args.batch / (time.process_time() - c))
    med = statistics.median
    print(f"39 Criteo-like fields, batch {args.batch}, {args.rounds} alternating rounds (median samples/s)")
    for key, label in (("vec", "Featurizer.transform"), ("loop", "per-sample Python")):
        print(
            f"  {label:<21}: wall {med(wall[key]):>9,.0f}/s ({1e6 / med(wall[key]):5.1f} us)   "
            f"cpu {med(cpu[key]):>9,.0f}/s ({1e6 / med(cpu[key]):5.1f} us)"
        )
    ratios = [a / b for a, b in zip(cpu["vec"], cpu["loop"], strict=True)]
    print(f"  median ratio (cpu)   : {med(ratios):.1f}x")


if __name__ == "__main__":
    main()
