"""Delayed feedback in the simulated world: calibration and AUC against freshness, window vs FNW.

    .venv/bin/python -m reloop.bench.delayed_feedback --out docs/backtest/reloop2/delayed-feedback

The world (engine/simulate/world.py) knows every impression's true click probability. Impressions
(random candidates of random requests, so the policy does not change what is shown) arrive over
simulated time; a clicked one gets its click after a lognormal delay, counted when within the
attribution window. Events go in time order through the real joiner (engine/join/joiner.py) and the
joined samples train the real learner (CE, mini-batches in arrival order). Every impression is scored
by the model as it was when the impression happened (what serving would have shown).

Policies: ``window W`` (the default: a negative when W has passed, a late click re-emitted as a
correction positive) for several W; ``fnw`` (every impression trained at once as a negative, each click
as one more positive, FNW importance weights in the loss); ``fnw-unweighted`` (the same stream without
the weights: what the weights fix). Reported over the second half of the run (the first half is
warm-up; nothing is tuned): mean prediction / mean true CTR (calibration, 1 = calibrated), AUC against
the clicks, and freshness = mean time from an impression to the training step that used its sample.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from reloop.bench.report import publish
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.join.joiner import Joiner, JoinerConfig
from reloop.engine.loss.delayed import with_delayed_feedback
from reloop.engine.metrics.offline import auc, logloss
from reloop.engine.models.registry import build_learner
from reloop.engine.simulate.world import World, WorldConfig

FIELDS = ("user_id", "user_segment", "device", "hour", "item_id", "item_category")
SPEC = FeatureSpec.model_validate(
    {"fields": [{"kind": "categorical", "name": f, "buckets": 4096} for f in FIELDS]}
)


@dataclass(frozen=True)
class Setup:
    duration_s: float = 1800.0
    requests_per_s: float = 10.0
    shown: int = 3
    delay_median_s: float = 30.0
    delay_sigma: float = 1.0
    attribution_s: float = 600.0
    drift_period_s: float = 900.0
    batch: int = 256


def simulate(seed: int, s: Setup) -> dict[str, np.ndarray | list]:
    """Impressions (time, features, true p, clicked within attribution, click time)."""
    world = World(
        WorldConfig(
            seed=seed,
            drift_period_s=s.drift_period_s,
            delay_median_s=s.delay_median_s,
            delay_sigma=s.delay_sigma,
            attribution_window_s=s.attribution_s,
        )  # fmt: skip
    )
    rng = np.random.default_rng([seed, 1])
    times, feats, probs = [], [], []
    n_req = int(s.duration_s * s.requests_per_s)
    for t in np.sort(rng.uniform(0, s.duration_s, n_req)):
        req = world.sample_request(float(t))
        items = req.candidates[: s.shown]
        p = world.click_probability(req, float(t), items)
        ctx = world.context_features(req)
        for item, pi in zip(items, p, strict=True):
            times.append(float(t))
            feats.append({**ctx, **world.item_features(int(item))})
            probs.append(float(pi))
    p = np.array(probs)
    clicked = world.draw_clicks(p)
    delay = world.draw_delays_s(len(p))
    labelled = clicked & (delay <= s.attribution_s)
    return {"t": np.array(times), "features": feats, "p": p, "label": labelled.astype(float),
            "click_t": np.where(labelled, np.array(times) + delay, np.inf)}  # fmt: skip


def run(data: dict, policy: str, window_s: float, seed: int, s: Setup) -> dict[str, Any]:
    fnw = policy.startswith("fnw")
    cfg = JoinerConfig(
        window_ms=max(1, int(window_s * 1000)),
        allowed_lateness_ms=0,
        retention_ms=int(s.attribution_s * 2000),
        emit_policy="fnw" if fnw else "window",
        max_pending=10**7,
        max_closed=10**7,
        ttl_ms=10**12,
        click_grace_ms=0,
    )
    joiner = Joiner(cfg, clock=lambda: 0)
    learner = build_learner("deepfm", SPEC, "ce", 0.0, seed=seed, hidden_units=(32, 32), embedding_dim=8)
    if policy == "fnw":
        learner.loss = with_delayed_feedback(learner.loss, "fnw")
    batch_all = Featurizer(SPEC).transform(data["features"])
    n = len(data["p"])
    # Events: impressions (kind 0) and clicks (kind 1) in time order; a click never precedes its impression.
    ev_t = np.concatenate([data["t"] * 1000, data["click_t"][np.isfinite(data["click_t"])] * 1000])
    ev_i = np.concatenate([np.arange(n), np.flatnonzero(np.isfinite(data["click_t"]))])
    ev_k = np.concatenate([np.zeros(n, int), np.ones(len(ev_i) - n, int)])
    order = np.lexsort((ev_k, ev_t))
    pred = np.full(n, np.nan)
    scored = seen = 0  # impressions [0, scored) have a prediction; [0, seen) have happened
    queue_i: list[int] = []
    queue_y: list[float] = []
    lag: list[float] = []
    for e in order:
        i, kind, now = int(ev_i[e]), int(ev_k[e]), float(ev_t[e])
        if kind == 0:
            seen = i + 1  # impressions are numbered in time order
            out = joiner.on_impression(str(i), int(now), i)
        else:
            out = joiner.on_click(str(i), int(now))
        for j in out:
            queue_i.append(j.payload)
            queue_y.append(float(j.label))
        while len(queue_i) >= s.batch:
            if seen > scored:  # the impressions so far were served by the model before this step
                idx = np.arange(scored, seen)
                pred[idx] = learner.predict_proba(batch_all.take(idx))
                scored = seen
            take, y = np.array(queue_i[: s.batch]), np.array(queue_y[: s.batch])
            del queue_i[: s.batch], queue_y[: s.batch]
            learner.learn(batch_all.take(take), y)
            lag.extend((now / 1000.0 - data["t"][take]).tolist())
    if scored < n:
        pred[scored:] = learner.predict_proba(batch_all.take(np.arange(scored, n)))
    half = data["t"] >= s.duration_s / 2
    p_true, y = data["p"][half], data["label"][half]
    return {
        "policy": policy if fnw else f"window {window_s:g}s",
        "window_s": "" if fnw else window_s,
        "seed": seed,
        "calibration": float(pred[half].mean() / p_true.mean()),
        "mean_pred": float(pred[half].mean()),
        "mean_true": float(p_true.mean()),
        "auc": auc(y, pred[half]),
        "logloss": logloss(y, pred[half]),
        "freshness_s": float(np.mean(lag)),
        "samples": len(lag),
    }


def _half(x: np.ndarray) -> float:
    from scipy import stats

    return (
        float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--windows", default="5,30,120,600", help="seconds, for the window policy")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    s = Setup()
    policies = [("fnw", 0.0), ("fnw-unweighted", 0.0)] + [
        ("window", float(w)) for w in args.windows.split(",")
    ]
    rows = []
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        data = simulate(seed, s)
        for policy, w in policies:
            rows.append(run(data, policy, w, seed, s))
            print(rows[-1], file=sys.stderr)
    wall = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    names = list(dict.fromkeys(r["policy"] for r in rows))
    fnw = {r["seed"]: r for r in rows if r["policy"] == "fnw"}
    lines = [
        "# Delayed feedback in the simulated world: the plain window vs FNW",
        "",
        f"Command: `.venv/bin/python -m reloop.bench.delayed_feedback {shlex.join(argv)}`",
        "",
        f"- {args.seeds} seeds (world and model), {wall:.0f} s wall, 1 torch thread, shared 2-core machine "
        f"(load average {os.getloadavg()[0]:.1f} at the end)",
        f"- world: {s.duration_s:g} s, {s.requests_per_s:g} requests/s x {s.shown} random candidates shown, "
        f"tastes drift over {s.drift_period_s:g} s; click delay lognormal (median {s.delay_median_s:g} s, "
        f"sigma {s.delay_sigma:g}); a click counts within {s.attribution_s:g} s",
        f"- model: DeepFM (MLP 32,32, embedding dim 8), CE, learner defaults, batch {s.batch}; joiner: "
        "allowed lateness 0, late clicks corrected",
        "- metrics on the second half of the run (impressions scored by the model of their time); "
        "calibration = mean prediction / mean true CTR; freshness = mean seconds from an impression to the "
        "step that trained its sample (both samples of a clicked FNW impression count)",
        "",
        "| policy | calibration | mean pred / true CTR | AUC | LogLoss | freshness (s) | samples per run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        rs = [r for r in rows if r["policy"] == name]
        c = np.array([r["calibration"] for r in rs])
        a = np.array([r["auc"] for r in rs])
        ll = np.array([r["logloss"] for r in rs])
        fr = np.mean([r["freshness_s"] for r in rs])
        lines.append(
            f"| {name} | {c.mean():.3f} ± {_half(c):.3f} | {np.mean([r['mean_pred'] for r in rs]):.4f} / "
            f"{np.mean([r['mean_true'] for r in rs]):.4f} | {a.mean():.4f} ± {_half(a):.4f} | "
            f"{ll.mean():.4f} ± {_half(ll):.4f} | {fr:.1f} | {np.mean([r['samples'] for r in rs]):.0f} |"
        )
    lines += [
        "",
        "Paired against FNW (same world, same seed), other − FNW, mean ± 95% half-width over seeds:",
        "",
        "| policy | Δ abs. calibration error | ΔAUC ×1e3 | ΔLogLoss ×1e3 |",
        "| --- | --- | --- | --- |",
    ]
    for name in names:
        if name == "fnw":
            continue
        rs = [r for r in rows if r["policy"] == name]
        dc = np.array([abs(r["calibration"] - 1) - abs(fnw[r["seed"]]["calibration"] - 1) for r in rs])
        da = 1e3 * np.array([r["auc"] - fnw[r["seed"]]["auc"] for r in rs])
        dl = 1e3 * np.array([r["logloss"] - fnw[r["seed"]]["logloss"] for r in rs])
        lines.append(
            f"| {name} | {dc.mean():+.3f} ± {_half(dc):.3f} | {da.mean():+.2f} ± {_half(da):.2f} | "
            f"{dl.mean():+.2f} ± {_half(dl):.2f} |"
        )
    return publish(lines, args.out / "report.md")


if __name__ == "__main__":
    raise SystemExit(main())
