"""Training throughput (samples/s of ``Learner.learn``) per backbone on Criteo-shaped synthetic data.

39 fields (I1..I13 log-bucketed, C1..C26 hashed; ~1e6 embedding rows), Zipf-distributed ids,
pre-featurised (bench/featurize_throughput.py measures featurisation). Backbones use their registry
defaults (BARS: embedding dim 10, MLP [400, 400, 400], 3 cross layers) and the optimizer the bare loop
has too (sparse embedding gradients + SparseAdam, Adam for the rest, no wide part: the learner defaults
before the streaming study, ``OptimizerConfig.previous_defaults()``; the streaming defaults are measured
against them by ``python -m reloop.bench.suite_trainer``). Every step gets y_last, so the loss is
the full ReLoop loss. Backbones are measured round-robin over several rounds and the median is shown,
because the shared machine's speed drifts (docs/performance.md).

    .venv/bin/python -m reloop.bench.train_throughput [--batches 1024 4096] [--rounds 3] [--seconds 2] \
        [--current-defaults]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from reloop.bench.backbone_args import Backbones
from reloop.engine.features.featurizer import FeatureBatch
from reloop.engine.features.spec import FeatureSpec, criteo_spec
from reloop.engine.models.config import OptimizerConfig
from reloop.engine.models.registry import available_backbones, backbone_entry, build_learner


def synthetic_criteo(spec: FeatureSpec, n: int, seed: int = 0) -> tuple[FeatureBatch, np.ndarray, np.ndarray]:
    """Ids drawn Zipf(1.2) inside each field's block (row 0 = missing 5% of the time); CTR ~ 25%."""
    rng = np.random.default_rng(seed)
    cat = np.empty((n, len(spec.cat_fields)), dtype=np.int64)
    for j, (f, off) in enumerate(zip(spec.cat_fields, spec.cat_offsets, strict=True)):
        ids = 1 + (rng.zipf(1.2, n) - 1) % (f.buckets - 1)
        cat[:, j] = off + np.where(rng.random(n) < 0.05, 0, ids)
    batch = FeatureBatch(
        cat=cat,
        num=np.zeros((n, 0), dtype=np.float32),
        multi=np.zeros((n, 0, 0), dtype=np.int64),
        multi_mask=np.zeros((n, 0, 0), dtype=np.float32),
    )
    labels = (rng.random(n) < 0.25).astype(np.float32)
    y_last = rng.uniform(0.05, 0.6, n).astype(np.float32)
    return batch, labels, y_last


class BareLoop:
    """A baseline written straight in torch (no Learner, no blocks): ``lr`` or ``dcn`` (BARS shape),
    sparse embedding + SparseAdam, Adam for the rest, plain BCE. It shows the engine's overhead."""

    def __init__(self, kind: str, rows: int, fields: int, dim: int = 10) -> None:
        torch.manual_seed(0)
        self.kind = kind
        self.emb = torch.nn.Embedding(rows, 1 if kind == "lr" else dim, sparse=True)
        torch.nn.init.normal_(self.emb.weight, std=1e-4)
        dense: list[torch.nn.Parameter] = []
        if kind == "lr":
            self.bias = torch.nn.Parameter(torch.zeros(1))
            dense.append(self.bias)
        else:
            width = fields * dim
            self.cross_w = torch.nn.Parameter(torch.randn(3, width) * width**-0.5)
            self.cross_b = torch.nn.Parameter(torch.zeros(3, width))
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(width, 400),
                torch.nn.ReLU(),
                torch.nn.Linear(400, 400),
                torch.nn.ReLU(),
                torch.nn.Linear(400, 400),
                torch.nn.ReLU(),
            )
            self.fc = torch.nn.Linear(width + 400, 1)
            dense += [self.cross_w, self.cross_b, *self.mlp.parameters(), *self.fc.parameters()]
        self.sparse_opt = torch.optim.SparseAdam([self.emb.weight], lr=1e-3)
        self.dense_opt = torch.optim.Adam(dense, lr=1e-3, fused=True)

    def learn(self, batch: FeatureBatch, labels: np.ndarray, y_last: np.ndarray) -> None:
        ids = torch.from_numpy(batch.cat)
        y = torch.from_numpy(labels)
        e = self.emb(ids)
        if self.kind == "lr":
            logit = e.sum(dim=(1, 2)) + self.bias
        else:
            x0 = e.flatten(1)
            x = x0
            for k in range(3):
                x = x0 * (x @ self.cross_w[k]).unsqueeze(-1) + self.cross_b[k] + x
            logit = self.fc(torch.cat([x, self.mlp(x0)], dim=1)).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, y)
        self.sparse_opt.zero_grad()
        self.dense_opt.zero_grad()
        loss.backward()
        self.sparse_opt.step()
        self.dense_opt.step()


def measure(learner, data, batch_size: int, seconds: float, offset: int) -> float:
    batch, labels, y_last = data
    n = len(batch)
    steps, t0 = 0, time.perf_counter()
    while True:
        i = (offset + steps * batch_size) % (n - batch_size)
        sl = slice(i, i + batch_size)
        learner.learn(batch.take(sl), labels[sl], y_last[sl])
        steps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and steps >= 3:
            return steps * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = [n for n in available_backbones() if backbone_entry(n).kind in {"torch", "numpy"}]
    parser.add_argument("--backbones", nargs="+", action=Backbones, default=default)
    parser.add_argument("--batches", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per backbone, batch size and round")
    parser.add_argument("--strategy", default="reloop")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare torch baselines")
    parser.add_argument(
        "--device", default="cpu", help="TorchLearner.to(device); numpy learners stay on the CPU"
    )
    parser.add_argument("--rows", type=int, default=200_000, help="synthetic samples to cycle through")
    parser.add_argument(
        "--current-defaults",
        action="store_true",
        help="the learners with today's optimizer defaults (OptimizerConfig()) instead of the previous ones",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = criteo_spec()
    data = synthetic_criteo(spec, args.rows)
    # FTRL ignores the optimizer settings
    optimizer = OptimizerConfig() if args.current_defaults else OptimizerConfig.previous_defaults()
    learners = {
        name: build_learner(name, spec, args.strategy, 0.2, seed=0, optimizer=optimizer)
        for name in args.backbones
    }
    for learner in learners.values():
        if hasattr(learner, "to"):
            learner.to(args.device)
    for kind in ("lr", "dcn"):
        if kind in learners and args.bare and args.device == "cpu":
            learners[f"bare torch {kind} (baseline)"] = BareLoop(kind, spec.total_rows, spec.num_fields)
    for learner in learners.values():  # warm-up: first-step allocations and lazy imports
        measure(learner, data, 1024, 0.0, 0)
    results: dict[tuple[str, int], list[float]] = {}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for name, learner in learners.items():
            for b in args.batches:
                results.setdefault((name, b), []).append(measure(learner, data, b, args.seconds, r * 7919))
    load_after = os.getloadavg()[0]
    print(
        f"Criteo-shaped synthetic: {spec.num_fields} fields, {spec.total_rows:,} embedding rows; strategy "
        f"{args.strategy} with y_last; {'current' if args.current_defaults else 'previous'} optimizer "
        f"defaults; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {args.device}; "
        f"{args.rounds} rounds x {args.seconds}s; load average {load_before:.1f} -> {load_after:.1f}"
    )
    header = (
        "| backbone | " + " | ".join(f"batch {b} (samples/s, median [min-max])" for b in args.batches) + " |"
    )
    print(header)
    print("|" + " --- |" * (len(args.batches) + 1))
    for name in learners:
        cells = []
        for b in args.batches:
            v = results[(name, b)]
            cells.append(f"{statistics.median(v):,.0f} [{min(v):,.0f}-{max(v):,.0f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for kind in ("lr", "dcn"):
        bare = f"bare torch {kind} (baseline)"
        if bare not in learners:
            continue
        for b in args.batches:
            ratios = [e / r for e, r in zip(results[(kind, b)], results[(bare, b)], strict=True)]
            print(
                f"engine {kind} / bare torch {kind}, batch {b}: "
                f"median per-round ratio {statistics.median(ratios):.2f}"
            )


if __name__ == "__main__":
    main()
