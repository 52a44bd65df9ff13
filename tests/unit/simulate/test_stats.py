"""The simulator's per-arm stats: bounded memory however long the world runs, AUCs as exact as said."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
from reloop.engine.metrics.online import ExactAUC
from reloop.engine.simulate.stats import EXACT_VERSIONS, ArmStats, BinnedAUC


def _exact(y: np.ndarray, p: np.ndarray) -> float:
    return ExactAUC.from_samples(y, p).get()


def test_binned_auc_is_within_its_tie_bound_of_the_exact_auc() -> None:
    rng = np.random.default_rng(3)
    for ctr, spread in ((0.03, 0.5), (0.3, 2.0), (0.5, 0.01)):
        logit = rng.normal(math.log(ctr / (1 - ctr)), spread, 20_000)
        p = 1 / (1 + np.exp(-logit))
        y = (rng.random(p.size) < p).astype(int)
        auc = BinnedAUC()
        auc.update_many(y[:7000], p[:7000])
        auc.update_many(y[7000:], p[7000:])
        exact = _exact(y, p)
        assert abs(auc.get() - exact) <= auc.tie_bound() + 1e-12, (auc.get(), exact, auc.tie_bound())
        assert (auc.n_pos, auc.n_neg) == (int(y.sum()), int((1 - y).sum()))
    one_class = BinnedAUC()
    one_class.update_many(np.ones(5, dtype=int), np.full(5, 0.2))
    assert math.isnan(one_class.get())


def test_an_arm_that_runs_for_long_keeps_its_memory_bounded_and_its_version_aucs() -> None:
    # The whole-run AUCs kept every score in sorted lists, and every version its own: ~130 MB an hour.
    rng = np.random.default_rng(5)
    arm = ArmStats("a", window=500)

    def requests(versions: range, n: int) -> dict[int, float]:
        exact: dict[int, float] = {}
        for version in versions:
            ys, ps = [], []
            for _ in range(n):
                p = rng.random(10)
                y = (rng.random(10) < p).astype(int)
                arm.record(version, p, p, y)
                ys.append(y)
                ps.append(p)
            exact[version] = _exact(np.concatenate(ys), np.concatenate(ps))
        return exact

    first = requests(range(1, 5), 300)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    later = requests(range(5, 25), 300)
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # 60,000 more scores: kept, three lists of floats would be several MB.
    assert grown < 1_500_000, grown
    kept = [v for v, s in arm.by_version.items() if s.auc is not None]
    assert kept == list(range(25 - EXACT_VERSIONS, 25))
    versions = arm.summary()["versions"]
    for version, exact in {**first, **later}.items():
        assert versions[version]["auc"] == exact  # a dropped version keeps its exact value


def test_the_versions_table_marks_the_versions_it_leaves_out_and_progress_counts_what_was_sent():
    # 40 versions went from the table without a mark; a 20-minute run printed nothing until it stopped.
    from reloop.engine.simulate.report import progress_line, versions_table
    from reloop.engine.simulate.stats import SimStats
    from rich.console import Console

    stats = SimStats()
    p = np.full(4, 0.5)
    for version in range(15):
        stats.arm("A").record(version, p, p, np.array([1, 0, 0, 0]))
    stats.arm("B").record(14, p, p, np.zeros(4, dtype=int))
    stats.clicks_sent = 15
    console = Console(width=120, record=True)
    console.print(versions_table(stats, "A", max_rows=12))
    rows = [ln.split("│")[1].strip() for ln in console.export_text().splitlines() if ln.count("│") == 5]
    assert rows == ["0", "1", "... 3 more", *map(str, range(5, 15))]
    line = progress_line(stats, 61.2)
    assert line == (
        "reloop simulate: 61 s: requests answered A 15, B 1; impressions 64; clicks sent 15; "
        "not-ready answers 0, errors 0"
    )
