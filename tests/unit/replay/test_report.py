from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
from reloop.engine.replay.report import (
    Comparison,
    against_kd,
    against_river,
    compare,
    markdown_tables,
    plot,
    read_csv,
    t_interval,
    write_csv,
)


def _rows(shift_auc: dict[int, float], strategy: str = "reloop@0.5") -> list[dict]:
    rows = []
    for seed in range(3):
        for period in (1, 2, 3):
            base = 0.70 + 0.01 * period + 0.001 * seed
            for s, d in (("ce", 0.0), (strategy, shift_auc[seed])):
                rows.append(
                    {
                        "dataset": "d",
                        "protocol": "periodic",
                        "backbone": "dcn",
                        "strategy": s,
                        "loss": s.split("@")[0],
                        "alpha": 0.5,
                        "seed": seed,
                        "period": period,
                        "n": 10,
                        "ctr": 0.5,
                        "auc": base + d,
                        "logloss": 0.5 - d,
                        "sc_active": 0.1,
                    }
                )
    return rows


def test_paired_differences_and_verdicts() -> None:
    wins = compare(_rows({0: 0.010, 1: 0.011, 2: 0.012}))
    auc = next(c for c in wins if c.metric == "auc")
    ll = next(c for c in wins if c.metric == "logloss")
    assert auc.diff_seeds[0] == pytest.approx(0.011) and auc.verdict == "wins" and auc.seed_wins == 3
    assert ll.diff_seeds[0] == pytest.approx(-0.011) and ll.verdict == "wins"
    assert auc.n_seeds == 3 and auc.n_periods == 3
    loses = compare(_rows({0: -0.010, 1: -0.011, 2: -0.012}))
    assert {c.verdict for c in loses} == {"loses"}
    ties = compare(_rows({0: -0.010, 1: 0.011, 2: 0.001}))
    assert {c.verdict for c in ties} == {"ties"}


def test_a_period_with_one_class_is_left_out_of_the_auc_comparison_quietly() -> None:
    rows = _rows({0: 0.010, 1: 0.011, 2: 0.012})
    for r in rows:
        if r["period"] == 2:  # one class in period 2: no AUC for any learner
            r["auc"] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it printed "Mean of empty slice"
        comps = compare(rows)
    auc = next(c for c in comps if c.metric == "auc")
    ll = next(c for c in comps if c.metric == "logloss")
    assert auc.n_periods == 2 and ll.n_periods == 3  # was 3: an empty period counted as evidence
    assert auc.diff_seeds[0] == pytest.approx(0.011) and auc.verdict == "wins"
    assert "nan" not in markdown_tables(rows, peer=None).lower()


def _comparison(metric: str, seeds: tuple[float, float], periods: tuple[float, float], n_seeds: int = 5):
    return Comparison(
        dataset="d", protocol="streaming", backbone="dcn", strategy="reloop@0.5", metric=metric, mean=0.7,
        ce_mean=0.7, diff_seeds=seeds, diff_periods=periods, n_seeds=n_seeds, n_periods=8, seed_wins=n_seeds,
    )  # fmt: skip


def test_a_win_needs_both_intervals_and_three_seeds() -> None:
    # Training randomness cannot explain the effect, but it moves across 0 from period to period.
    assert _comparison("auc", (0.0032, 0.0029), (0.0032, 0.0065)).verdict == "ties"
    assert _comparison("auc", (0.0032, 0.0065), (0.0032, 0.0029)).verdict == "ties"
    assert _comparison("auc", (0.0032, 0.0029), (0.0032, 0.0020)).verdict == "wins"
    assert _comparison("auc", (-0.0032, 0.0029), (-0.0032, 0.0020)).verdict == "loses"
    assert _comparison("logloss", (-0.0032, 0.0029), (-0.0032, 0.0020)).verdict == "wins"
    assert _comparison("logloss", (0.0032, 0.0029), (-0.0032, 0.0020)).verdict == "ties"  # sides disagree
    # Two seeds: a t interval with one degree of freedom is no basis for a verdict.
    assert _comparison("auc", (0.0032, 0.0029), (0.0032, 0.0020), n_seeds=2).verdict == "n/a"
    assert _comparison("auc", (0.0032, math.nan), (0.0032, 0.0020)).verdict == "n/a"
    assert _comparison("auc", (0.0032, 0.0029), (0.0032, math.nan)).verdict == "n/a"  # one period


def test_t_interval() -> None:
    m, h = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert math.isnan(t_interval([1.0])[1])


def test_csv_round_trip_tables_and_plots(tmp_path: Path) -> None:
    rows = _rows({0: 0.019, 1: 0.02, 2: 0.021})
    path = tmp_path / "r.csv"
    write_csv(rows[:5], path)
    write_csv(rows[5:], path, append=True)
    back = read_csv(path)
    assert len(back) == len(rows) and back[3]["auc"] == pytest.approx(rows[3]["auc"])
    md = markdown_tables(back)
    assert "| reloop@0.5 |" in md and "+20.00 ±" in md and "wins / wins" in md
    pngs = plot(back, tmp_path / "plots")
    assert {p.name for p in pngs} == {"d_periodic_dcn.png", "differences.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_reloop_is_also_paired_against_kd_at_the_same_alpha() -> None:
    rows = _rows({0: 0.010, 1: 0.011, 2: 0.012}, strategy="reloop@0.5")
    kd = [
        dict(r, strategy="kd@0.5")
        for r in _rows({0: 0.004, 1: 0.005, 2: 0.006}, strategy="x")
        if r["strategy"] == "x"
    ]
    comps = compare(rows + kd, against_kd)
    auc = next(c for c in comps if c.metric == "auc")
    assert (
        auc.strategy == "reloop@0.5" and auc.diff_seeds[0] == pytest.approx(0.006) and auc.verdict == "wins"
    )
    assert "reloop@0.5 vs kd" in markdown_tables(rows + kd)
    # The variants are paired with KD too; KD and CE are not.
    assert against_kd("reloop_kl@0.2") == "kd@0.2"
    assert against_kd("kd@0.2") is None and against_kd("ce") is None


def test_every_learner_is_paired_with_the_river_peer_period_by_period() -> None:
    rows = [{**r, "protocol": "streaming"} for r in _rows({0: 0.010, 1: 0.011, 2: 0.012})]
    # The peer: one run (seed 0); period 3 lacks it, so only periods 1 and 2 pair. Its AUC per period is
    # 0.02 below CE seed 0's there.
    river = [
        {
            **r,
            "backbone": "river_lr",
            "strategy": "ce",
            "auc": r["auc"] - 0.02,
            "logloss": r["logloss"] + 0.03,
        }
        for r in rows
        if r["seed"] == 0 and r["strategy"] == "ce" and r["period"] < 3
    ]
    comps = {(c.strategy, c.metric): c for c in against_river(rows + river)}
    assert set(comps) == {(s, m) for s in ("ce", "reloop@0.5") for m in ("auc", "logloss")}
    ce_auc = comps[("ce", "auc")]
    # CE seed s sits 0.001 * s above seed 0, so the mean gap is 0.02 + 0.001 (seeds 0, 1, 2).
    assert ce_auc.diff_seeds[0] == pytest.approx(0.021) and ce_auc.n_periods == 2 and ce_auc.verdict == "wins"
    assert comps[("reloop@0.5", "auc")].diff_seeds[0] == pytest.approx(0.021 + 0.011)
    assert (
        comps[("ce", "logloss")].diff_seeds[0] == pytest.approx(-0.03)
        and comps[("ce", "logloss")].verdict == "wins"
    )
    assert all(c.seed_wins == 3 for c in comps.values())
    table = markdown_tables(rows + river)
    assert "the river per-event LR peer" in table and "| d · streaming · dcn | ce vs river | +21.00" in table
    assert against_river(rows) == [] and "vs river" not in markdown_tables(rows)  # no peer, no table


def test_error_memory_rows_of_kd_and_reloop_sort_after_their_base_strategy(tmp_path: Path) -> None:
    # Before: "kd@0.5+mem4x6@0.3" was split at its first "@" and float("0.5+mem4x6@0.3") failed.
    names = ("ce", "reloop@0.5+mem4x6@0.3", "kd@0.5+mem4x6@0.3", "reloop@0.5", "kd@0.5", "ce+mem4x6@0.3")
    rows = [
        dict(r, strategy=s) for s in names for r in _rows({0: 0.0, 1: 0.0, 2: 0.0}) if r["strategy"] == "ce"
    ]
    md = markdown_tables(rows)
    order = [line.split(" | ")[0][2:] for line in md.splitlines() if line.startswith("| ") and "@" in line]
    assert order[:5] == [
        "ce+mem4x6@0.3",
        "kd@0.5",
        "kd@0.5+mem4x6@0.3",
        "reloop@0.5",
        "reloop@0.5+mem4x6@0.3",
    ]
    # A memory row of ReLoop is paired with KD's row with the same memory.
    assert against_kd("reloop@0.5+mem4x6@0.3") == "kd@0.5+mem4x6@0.3"
    assert "reloop@0.5+mem4x6@0.3 vs kd" in md
    assert {p.name for p in plot(rows, tmp_path)} == {"d_periodic_dcn.png", "differences.png"}


def test_ce_alone_plots_without_an_empty_legend(tmp_path: Path) -> None:
    # Before: matplotlib warned "No artists with labels found to put in legend" for the difference panel.
    rows = [r for r in _rows({0: 0.0, 1: 0.0, 2: 0.0}) if r["strategy"] == "ce"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.name for p in plot(rows, tmp_path)] == ["d_periodic_dcn.png"]


def test_a_river_lr_learner_is_no_peer_when_told_so() -> None:
    rows = [{**r, "protocol": "streaming"} for r in _rows({0: 0.010, 1: 0.011, 2: 0.012})]
    learner = [{**r, "backbone": "river_lr"} for r in rows]
    assert against_river(rows + learner)  # by default river_lr rows are the peer's (the CSVs of before)
    assert against_river(rows + learner, peer=None) == []
    md = markdown_tables(rows + learner, peer=None)
    assert "vs river" not in md and "#### d · streaming · river_lr" in md


def test_a_seed_with_fewer_periods_is_compared_over_the_periods_every_seed_has() -> None:
    # Seed 2's run stopped after period 1: its mean difference was over period 1 alone, the others'
    # over periods 1..3 (periods differ in level: base AUC 0.71, 0.72, 0.73).
    rows = [r for r in _rows({0: 0.010, 1: 0.010, 2: 0.010}) if r["seed"] != 2 or r["period"] == 1]
    rows = [{**r, "auc": r["auc"] + (0.02 * r["period"] if r["strategy"] != "ce" else 0)} for r in rows]
    auc = next(c for c in compare(rows) if c.metric == "auc")
    assert auc.n_periods == 1 and auc.n_seeds == 3
    assert auc.diff_seeds[0] == pytest.approx(0.030)  # period 1 only: 0.010 + 0.02
    assert auc.ce_mean == pytest.approx(0.711)  # 0.71 + seeds' 0.000, 0.001, 0.002


def test_a_pair_without_a_finite_metric_leaves_both_sides_means() -> None:
    # A strategy's NaN period (a diverged model) left its own mean but stayed in its baseline's: the two
    # absolute means were over different periods.
    rows = _rows({0: 0.010, 1: 0.010, 2: 0.010})
    for r in rows:
        if r["strategy"] != "ce" and r["period"] == 3:
            r["auc"] = math.nan
    auc = next(c for c in compare(rows) if c.metric == "auc")
    assert auc.mean - auc.ce_mean == pytest.approx(0.010)
    assert auc.ce_mean == pytest.approx(0.716)  # periods 1 and 2 (0.71, 0.72) and seeds' mean 0.001
    assert auc.n_periods == 2


def test_a_period_whose_auc_is_undefined_everywhere_is_nan_without_a_numpy_warning() -> None:
    # A period with one class left AUC nan in every run: numpy's "Mean of empty slice" reached the terminal.
    from reloop.engine.replay.report import _nanmean

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(_nanmean([math.nan, math.nan]))
        assert _nanmean([1.0, math.nan, 3.0]) == 2.0
