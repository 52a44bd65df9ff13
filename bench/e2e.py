"""End to end from Kafka for DCN at batch 1024, against the same model's bare training loop.

    .venv/bin/python -m reloop.bench.e2e                 # 40,960 samples per pass, 3 rounds
    .venv/bin/python -m reloop.bench.e2e --n 16384 --rounds 2

Engine pass: a local broker (started here), Criteo-shaped impressions + clicks in two topics, the
single-process ``Pipeline`` (the one ``reloop replay`` runs; ``reloop run`` runs the join and train stages
apart, figure 9 of ``reloop bench``: KafkaSource -> merge -> decode -> joiner -> predict-then-learn
StreamTrainer, ReLoop with the logged y_last), snapshots off; samples/s = samples trained / wall time
from opening the source. Baseline: the same backbone config and seed trained by a bare torch loop on
tensors built beforehand. The two alternate round by round in this process; ratio = median of per-round
ratios. Data, engine pass and bare loop come from ``reloop.bench.suite_e2e`` (figure 1 of ``reloop bench``),
so this script and the suite measure the same thing.

A stage breakdown follows: the same samples through each stage alone (decode, join, build samples,
featurize, score, learn), per sample, to show where the engine's time goes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def breakdown(imps, clicks, spec, batch: int) -> dict[str, float]:
    """Microseconds per sample of each stage, run alone on the same events."""
    from reloop.bench.suite_e2e import make_learner
    from reloop.engine.events.codec import decode_clicks, decode_impressions, encode
    from reloop.engine.features.featurizer import Featurizer
    from reloop.engine.join.joiner import Joiner, JoinerConfig
    from reloop.engine.metrics.online import OnlineMetricsBook
    from reloop.engine.runtime.pipeline import sample_from_joined

    imp_bytes = [encode(e) for e in imps[:-1]]
    clk_bytes = [encode(c) for c in clicks]
    n = len(imp_bytes)
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    dec, _ = decode_impressions(imp_bytes)
    decode_clicks(clk_bytes)
    out["decode impressions+clicks"] = time.perf_counter() - t0
    j = Joiner(JoinerConfig(window_ms=2_000, allowed_lateness_ms=0), clock=lambda: 0)
    events = sorted(
        [(e.event_time_ms, 0, e.impression_id, b) for e, b in zip(dec, imp_bytes, strict=True)]
        + [(c.event_time_ms, 1, c.impression_id, b"") for c in clicks]
    )
    t0 = time.perf_counter()
    joined = []
    for t, kind, iid, b in events:
        joined += j.on_impression(iid, t, b) if kind == 0 else j.on_click(iid, t)
    joined += j.flush()
    out["join"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = [sample_from_joined(x) for x in joined]
    out["build samples (parse payload)"] = time.perf_counter() - t0
    book = OnlineMetricsBook()
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch):
        book.update_many(samples[i : i + batch])
    out["served-prediction metrics"] = time.perf_counter() - t0
    fz = Featurizer(spec)
    learner = make_learner("dcn", spec)
    m = (len(samples) // batch) * batch
    t0 = time.perf_counter()
    batches = [fz.transform([s.features for s in samples[i : i + batch]]) for i in range(0, m, batch)]
    out["featurize"] = time.perf_counter() - t0
    labels = [
        np.array([s.label for s in samples[i : i + batch]], dtype=np.float32) for i in range(0, m, batch)
    ]
    ylast = [
        np.array([s.served_prediction for s in samples[i : i + batch]], dtype=np.float32)
        for i in range(0, m, batch)
    ]
    t0 = time.perf_counter()
    for b in batches:
        learner.predict_proba(b)
    out["score (predict before learn)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b, y, yl in zip(batches, labels, ylast, strict=True):
        learner.learn(b, y, yl)
    out["learn (Learner.learn, ReLoop loss)"] = time.perf_counter() - t0
    per = {k: v / max(1, n if k.startswith(("decode", "join")) else m) * 1e6 for k, v in out.items()}
    per["total"] = sum(per.values())
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40_960, help="impressions (samples) per engine pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024)
    args = ap.parse_args()

    from reloop.bench.suite import alternate
    from reloop.bench.suite_broker import local_broker
    from reloop.bench.suite_e2e import BareLoop, click_labels, engine_pass, fill_topics, make_events
    from reloop.engine.features.spec import criteo_spec

    spec = criteo_spec()
    imps, clicks = make_events(args.n)
    labels = click_labels(imps, clicks, args.n)
    target = (args.n // args.batch) * args.batch
    with tempfile.TemporaryDirectory(prefix="reloop-e2e-") as tmp, local_broker() as bootstrap:
        topics = fill_topics(bootstrap, imps, clicks)
        bare = BareLoop("dcn", spec, imps[: args.n], labels, args.batch)
        eng, base, ratio = alternate(
            lambda: engine_pass(bootstrap, topics, "dcn", spec, args.batch, target, Path(tmp)),
            bare.run,
            args.rounds,
        )
    print(f"DCN batch {args.batch}, {target:,} samples per pass, {args.rounds} rounds, alternating")
    for name, vals in (("engine from Kafka", eng), ("bare torch loop", base)):
        rates = ", ".join(f"{x:,.0f}" for x in vals)
        print(f"  {name:18s}: {rates} samples/s (median {statistics.median(vals):,.0f})")
    print(f"  ratio engine/bare : {ratio:.3f} (median of per-round ratios)")
    print("stage breakdown, microseconds per sample (each stage alone, same events):")
    for stage, us in breakdown(imps, clicks, spec, args.batch).items():
        print(f"  {stage:38s} {us:8.2f}")


if __name__ == "__main__":
    main()
