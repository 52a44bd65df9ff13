"""bench/learner_ablation.py: the delayed-feedback replays (what each learner is fed), the harness's
optimizers and the embedding-rate table."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
from reloop.bench import learner_ablation as la
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.replay.backtest import period_bounds_by_count, prepare


def _data(n: int = 300):
    rng = np.random.default_rng(1)
    spec = FeatureSpec(fields=tuple(CategoricalField(name=f, buckets=20) for f in ("u", "i")))
    samples = [
        LabeledSample(f"s{k}", {"u": str(rng.integers(8)), "i": str(rng.integers(8))},
                      int(rng.random() < 0.3), served_prediction=0.5, served_version=0,
                      event_time_ms=10_000 * k)
        for k in range(n)
    ]  # fmt: skip
    return prepare(samples, spec, lambda t: period_bounds_by_count(len(t), 3))


def test_fnw_feeds_every_impression_at_once_as_a_negative_and_each_click_later_as_a_positive(monkeypatch):
    from river import linear_model

    data = _data()
    seen: list[tuple[bool, float]] = []
    learn_one = linear_model.LogisticRegression.learn_one

    def spy(self, x, y, w=1.0):
        seen.append((bool(y), float(w)))
        return learn_one(self, x, y, w)

    monkeypatch.setattr(linear_model.LogisticRegression, "learn_one", spy)
    rows = la.run_delayed_river(data, seed=0, mode="fnw", window_s=60.0)
    clicks = int(data.labels.sum())
    labels = [y for y, _ in seen]
    # What arrived before the last impression was served: the negative of every impression but the last
    # (an impression is served before its own negative is learned), the clicks but the last few seconds'.
    assert labels.count(False) == len(data.labels) - 1 and 0 < labels.count(True) <= clicks
    assert all(0.0 < w <= 1.0 for y, w in seen if not y) and all(1.0 <= w <= 2.0 for y, w in seen if y)
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)


def test_fnw_trains_the_deep_learner_with_the_fnw_loss_on_impressions_plus_clicks(monkeypatch):
    from reloop.engine.loss.delayed import FakeNegativeWeighted
    from reloop.engine.models import registry

    data = _data()
    fed: list[np.ndarray] = []
    learners = []
    build = registry.build_learner

    def spy_build(*args, **kwargs):
        learner = build(*args, **kwargs)
        learners.append(learner)
        scored = learner.learn_scored

        def learn_scored(batch, labels, *a, **k):
            fed.append(np.asarray(labels))
            return scored(batch, labels, *a, **k)

        learner.learn_scored = learn_scored
        return learner

    monkeypatch.setattr(registry, "build_learner", spy_build)
    s = {**la.BASE, **la.NEW, "batch": 64, "hidden": (8,), "dim": 4}
    served, progressive = la.run_delayed(data, s, seed=0, mode="fnw", window_s=60.0)
    labels = np.concatenate(fed)
    assert isinstance(learners[0].loss, FakeNegativeWeighted)
    assert len(labels) == len(data.labels) + int(data.labels.sum())
    assert (labels == 0).sum() == len(data.labels)
    assert all(np.isfinite(r["auc"]) for r in served + progressive)


def test_window_close_emission_trains_each_impression_once_with_plain_ce(monkeypatch):
    from reloop.engine.loss.delayed import FakeNegativeWeighted
    from reloop.engine.models import registry

    data = _data()
    learners = []
    build = registry.build_learner
    monkeypatch.setattr(
        registry, "build_learner", lambda *a, **k: learners.append(build(*a, **k)) or learners[-1]
    )
    s = {**la.BASE, **la.NEW, "batch": 64, "hidden": (8,), "dim": 4}
    la.run_delayed(data, s, seed=0, mode="asym", window_s=900.0)
    assert not isinstance(learners[0].loss, FakeNegativeWeighted)


@pytest.mark.parametrize("mode", ["asym", "neutral", "fnw"])
def test_the_delay_draws_depend_on_the_seed_only(mode):
    data = _data()
    a = la._arrivals(data, 3, mode, 900.0, 60.0)
    b = la._arrivals(data, 3, mode, 900.0, 60.0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    t, y, arrival = a
    assert (arrival >= t).all()


def test_under_delayed_feedback_counters_serve_each_impression_the_clicks_arrived_by_its_time(monkeypatch):
    from reloop.engine.features.counters import SEEN_SCALE
    from reloop.engine.models import registry

    data = _data()
    data = replace(
        data, spec=FeatureSpec(fields=tuple(CategoricalField(name=n, buckets=20) for n in ("user_id", "i")))
    )
    s = {**la.BASE, **la.DELAYED_COUNTERS["counters5_w600"], "batch": 32, "hidden": (8,), "dim": 4}
    t, y, arrival = la._arrivals(data, 0, "asym", 900.0, 60.0)
    counted = la.counted(data, s, arrival * 1000.0)
    # the user's lifetime and 600-s counts: four more dense inputs
    assert counted.batch.num.shape == (300, 4) and counted.spec.dense_fields[0].name == "user_id#ctr"
    # an impression's user counts every earlier impression of that user, and only clicks that had arrived
    users = data.batch.cat[:, 0]
    k = 250
    shown = np.sum((users[:k] == users[k]) & (t[:k] < t[k]))
    assert np.expm1(counted.batch.num[k, 1] / SEEN_SCALE) == pytest.approx(shown, rel=1e-5)
    clicks = np.sum((users == users[k]) & (y > 0.5) & (arrival < t[k]))
    total_clicks = np.sum((y > 0.5) & (arrival < t[k]))
    prior = (total_clicks + 1) / (k + 2)
    rate = (clicks + 5 * prior) / (shown + 5)
    assert counted.batch.num[k, 0] == pytest.approx(np.log(rate / (1 - rate)), rel=1e-4)
    # and the learner is fed them: the delayed replay builds it on the counted spec
    specs = []
    build = registry.build_learner
    monkeypatch.setattr(registry, "build_learner", lambda *a, **k: specs.append(a[1]) or build(*a, **k))
    served, _ = la.run_delayed(data, s, seed=0, mode="asym", window_s=900.0)
    assert [f.name for f in specs[0].dense_fields][:2] == ["user_id#ctr", "user_id#seen"] and served
    with pytest.raises(ValueError, match="none of the user and item fields"):
        la.counted(_data(), s)


def test_kd_and_reloop_learn_against_the_period_snapshot_and_period_0_has_none(monkeypatch):
    from reloop.engine.models import registry

    data = _data()
    got: list[np.ndarray] = []
    build = registry.build_learner

    def spy_build(*args, **kwargs):
        learner = build(*args, **kwargs)
        assert args[2] == "reloop" and args[3] == 0.5
        scored = learner.learn_scored

        def learn_scored(batch, labels, y_last=None, *a, **k):
            got.append(np.asarray(y_last))
            return scored(batch, labels, y_last, *a, **k)

        learner.learn_scored = learn_scored
        return learner

    monkeypatch.setattr(registry, "build_learner", spy_build)
    s = {**la.BASE, **la.DELAYED_STRATEGIES["reloop0.5"], "batch": 32, "hidden": (8,), "dim": 4}
    la.run_delayed(data, s, seed=0, mode="fnw", window_s=60.0)
    y_last = np.concatenate(got)
    # 300 impressions in 3 periods: the first period's samples have no production model.
    assert np.isnan(y_last).sum() >= 100 - 1 and np.isfinite(y_last).sum() >= 150
    assert ((y_last[np.isfinite(y_last)] > 0) & (y_last[np.isfinite(y_last)] < 1)).all()


def _learned_when_served(monkeypatch, data, s, publish_s: float) -> np.ndarray:
    """For each impression, how many training samples the deep learner had learned when it scored it."""
    from reloop.engine.models import registry

    learned = [0]
    seen: list[int] = []
    build = registry.build_learner

    def spy_build(*args, **kwargs):
        learner = build(*args, **kwargs)
        scored, predict = learner.learn_scored, learner.predict_proba

        def learn_scored(batch, labels, *a, **k):
            learned[0] += len(labels)
            return scored(batch, labels, *a, **k)

        def predict_proba(batch):
            out = predict(batch)
            seen.extend([learned[0]] * len(out))
            return out

        learner.learn_scored, learner.predict_proba = learn_scored, predict_proba
        return learner

    monkeypatch.setattr(registry, "build_learner", spy_build)
    la.run_delayed(data, s, seed=0, mode="neutral", window_s=60.0, publish_s=publish_s)
    return np.array(seen)


@pytest.mark.parametrize("publish_s", [0.0, 100.0, 1000.0])
def test_a_published_snapshot_serves_what_was_learned_by_its_publish_time(monkeypatch, publish_s):
    data = _data()
    s = {**la.BASE, **la.NEW, "batch": 16, "hidden": (8,), "dim": 4}
    seen = _learned_when_served(monkeypatch, data, s, publish_s)
    t, _, arrival = la._arrivals(data, 0, "neutral", 60.0, 60.0)
    # Batches of 16 in arrival order; a batch is learned once its last sample has arrived.
    done = np.sort(arrival)[15::16]
    served_at = t if publish_s == 0 else np.floor(t / publish_s) * publish_s
    expected = 16 * np.searchsorted(done, served_at, side="right")
    assert np.array_equal(seen, expected)
    if publish_s:  # within one publish interval every impression is served by the same model
        for b in np.unique(served_at):
            assert len(set(seen[served_at == b])) == 1


@pytest.mark.parametrize("publish_s", [0.0, 100.0])
def test_the_river_peer_published_the_same_way_has_learned_every_label_arrived_by_the_publish(
    monkeypatch, publish_s
):
    from river import linear_model

    data = _data()
    learned = [0]
    seen: list[int] = []
    lr = linear_model.LogisticRegression
    learn_one, predict_one = lr.learn_one, lr.predict_proba_one

    def spy_learn(self, x, y, w=1.0):
        learned[0] += 1
        return learn_one(self, x, y, w)

    def spy_predict(self, x):
        seen.append(learned[0])
        return predict_one(self, x)

    monkeypatch.setattr(lr, "learn_one", spy_learn)
    monkeypatch.setattr(lr, "predict_proba_one", spy_predict)
    la.run_delayed_river(data, seed=0, mode="neutral", window_s=60.0, publish_s=publish_s)
    t, _, arrival = la._arrivals(data, 0, "neutral", 60.0, 60.0)
    served_at = t if publish_s == 0 else np.floor(t / publish_s) * publish_s
    assert np.array_equal(seen, np.searchsorted(np.sort(arrival), served_at, side="right"))


@pytest.mark.parametrize(
    ("side", "expected"),
    [
        # "left": a sample arriving at a publish (100, 200) is in the snapshot taken there
        ("left", [[0], [1, 2], [3, 4], [5, 6], [7], [8, 9], [10], [11]]),
        # "right" (FNW): it is learned after that snapshot
        ("right", [[0, 1], [2], [3, 4], [5, 6], [7, 8], [9], [10, 11]]),
    ],
)
def test_flushed_batches_are_cut_at_every_publish_and_full_in_between(side, expected):
    arrived = np.array([0.0, 10, 20, 100, 100, 150, 199, 200, 201, 250, 400, 401])
    order = np.arange(len(arrived))
    assert [b.tolist() for b in la._delayed_batches(arrived, order, 2, 100.0, side)] == expected
    assert [b.tolist() for b in la._delayed_batches(arrived, order, 5, 0.0, side)][0] == [0, 1, 2, 3, 4]


def test_the_published_table_pairs_each_row_with_the_peer_best_on_the_selection_periods(tmp_path):
    import csv

    path = tmp_path / "published.csv"
    # selection period 1, later period 2; two seeds; per variant (AUC selection, AUC later)
    aucs = {
        "new@neutral60/pub3600": (0.70, 0.71),
        "small_b8@neutral60/pub3600": (0.72, 0.70),
        "river_lr@neutral60/pub3600": (0.60, 0.61),
        "river_lr0.01@neutral60/pub3600": (0.65, 0.64),  # the better peer on the selection period
        "new@neutral60": (0.75, 0.76),
    }
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=la.COLUMNS)
        w.writeheader()
        for variant, (sel, later) in aucs.items():
            for seed in (0, 1):
                for period, auc in ((1, sel), (2, later)):
                    w.writerow({"dataset": "d", "variant": variant, "seed": seed, "period": period, "n": 10,
                                "auc": auc + 0.001 * seed, "logloss": 0.6, "seconds": 1.0})  # fmt: skip
    rows = {
        line.split("|")[3].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in la.summarise_published(path, first_later_period=2).splitlines()[2:]
        if "every 1 h" in line
    }
    assert set(rows) == {"`new`", "`small_b8`", "`river_lr`", "`river_lr0.01`"}
    # AUC differences ×1e3 against river_lr0.01 (0.65 / 0.64), against new served hourly, against new live
    assert rows["`new`"][5].startswith("+50.00") and rows["`new`"][6].startswith("+70.00")
    assert rows["`small_b8`"][7].startswith("+20.00") and rows["`small_b8`"][8].startswith("-10.00")
    assert rows["`new`"][9].startswith("-50.00")
    assert rows["`river_lr0.01`"][5] == "—"  # the peer itself


def _sparse_table(rows: int = 6, dim: int = 3) -> torch.nn.Embedding:
    torch.manual_seed(0)
    return torch.nn.Embedding(rows, dim, sparse=True)


def _steps(table: torch.nn.Embedding, opt: torch.optim.Optimizer, n: int) -> None:
    ids = torch.tensor([0, 2, 2, 5])
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        table(ids).sum().backward()
        opt.step()


def test_decayed_adagrad_with_decay_1_is_torchs_adagrad():
    a, b = _sparse_table(), _sparse_table()
    _steps(a, la.DecayedAdagrad(a.parameters(), lr=0.1, decay=1.0), 5)
    _steps(b, torch.optim.Adagrad(b.parameters(), lr=0.1), 5)
    assert torch.allclose(a.weight, b.weight, atol=1e-6)
    assert not torch.equal(a.weight, _sparse_table().weight)  # it did learn


def test_decayed_adagrad_keeps_a_frequent_rows_step_from_vanishing():
    """The same gradient every step: Adagrad's step shrinks as 1/sqrt(n), the forgetting one's stops
    shrinking near lr * sqrt(1 - decay)."""
    moved = {}
    for decay in (1.0, 0.9):
        t = _sparse_table()
        opt = la.DecayedAdagrad(t.parameters(), lr=0.1, decay=decay)
        _steps(t, opt, 200)
        before = t.weight[0].detach().clone()
        _steps(t, opt, 1)
        moved[decay] = float((before - t.weight[0].detach()).abs().max())
    assert moved[1.0] == pytest.approx(0.1 / 201**0.5, rel=1e-3)
    assert moved[0.9] == pytest.approx(0.1 * (1 - 0.9) ** 0.5, rel=1e-2)


def test_the_harness_gives_first_order_tables_their_own_adagrad_rate():
    data = _data()
    s = {**la.BASE, **la.VARIANTS["new_deepfm_linear0.1"]}
    learner = la.ExperimentLearner(s, data.spec, seed=0)
    rates = {
        tuple(p.shape[1:]): group["lr"] for group in learner.opts[1].param_groups for p in group["params"]
    }
    assert rates == {(1,): 0.1, (s["dim"],): 0.03}


def _write_cells(path, cells) -> None:
    """The harness's CSV of (dataset, variant, seed, period, auc) cells, LogLoss 1 - AUC."""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=la.COLUMNS)
        w.writeheader()
        for dataset, variant, seed, period, auc in cells:
            w.writerow({"dataset": dataset, "variant": variant, "seed": seed, "period": period, "n": 10,
                        "auc": auc, "logloss": 1 - auc, "seconds": 0.0})  # fmt: skip


def test_the_rates_table_pairs_each_backbone_with_itself_at_the_base_rate(tmp_path):
    path = tmp_path / "rates.csv"
    rows = []
    for seed in range(3):
        for period in (1, 2):
            base = 0.70 + 0.01 * seed + 0.001 * period  # seeds differ a lot; the pairing removes it
            aucs = {
                "rate0.03_dcn": base,
                "rate0.1_dcn": base + 0.002 + 1e-4 * seed,
                "rate0.03_fm": base - 0.05,
                "rate0.1_fm": base - 0.05 - 0.001,
            }
            rows += [("d", variant, seed, period, auc) for variant, auc in aucs.items()]
    _write_cells(path, rows)
    table = la.summarise_rates([path]).splitlines()
    dcn = next(line for line in table if line.startswith("| dcn | 0.1 |"))
    fm = next(line for line in table if line.startswith("| fm | 0.1 |"))
    assert "**+2.10 ± 0.25**" in dcn and "**-2.10 ± 0.25**" in dcn  # better AUC and LogLoss: bold
    assert "-1.00 ± 0.00" in fm and "**" not in fm  # worse: never bold
    assert not any(line.startswith("| dcn | 0.03 |") for line in table)
    # Against another base (--rates-base 0.1): the same pairs seen from the other side.
    against = la.summarise_rates([path], base=0.1).splitlines()
    assert "-2.10 ± 0.25" in next(line for line in against if line.startswith("| dcn | 0.03 |"))
    assert not any(line.startswith("| dcn | 0.1 |") for line in against)


def test_the_per_event_rates_table_keeps_a_backbones_own_rates_only_where_nowhere_worse(tmp_path):
    path = tmp_path / "pe.csv"
    own = {b: f"pe_dense{la.adam_lr(b):g}_tables{la.adagrad_embedding_lr(b):g}_{b}" for b in ("dcn", "fm")}
    rows = []
    for dataset, gain in (("a", {"dcn": 0.002, "fm": 0.002}), ("b", {"dcn": 0.0, "fm": -0.003})):
        for seed in range(3):
            for period in (1, 2):
                base = 0.70 + 0.01 * seed + 0.001 * period
                for b in ("dcn", "fm"):
                    for variant, auc in ((f"pe_dense0.001_tables0.03_{b}", base), (own[b], base + gain[b])):
                        rows.append((dataset, variant, seed, period, auc + 1e-4 * seed * (variant == own[b])))
    _write_cells(path, rows)
    table = la.summarise_per_event_rates([path]).splitlines()
    dcn = next(line for line in table if line.startswith("| dcn |"))
    fm = next(line for line in table if line.startswith("| fm |"))
    # DCN: better on a, a tie on b: its own rates; FM: better on a, worse on b: the study's.
    assert dcn.endswith("| own rates |") and "**+2.10 ± 0.25**" in dcn
    assert fm.endswith("| the study's |") and "-2.90 ± 0.25" in fm


def test_the_midpoints_bisect_the_step_each_backbones_climb_failed():
    # 0.03 -> 0.1 failed for DeepFM and FmFM, 0.1 -> 0.3 for the others but AFN+ (at the top of the grid).
    midpoints = la.EMBEDDING_RATE_MIDPOINTS
    mids = {name.split("_", 1)[1]: s["opt"]["embedding_lr"] for name, s in midpoints.items()}
    assert mids == {b: 0.055 if b in ("deepfm", "fmfm") else 0.17 for b in la.TORCH_BACKBONES if b != "afn"}
    for name, s in la.EMBEDDING_RATE_MIDPOINTS.items():  # otherwise the rate group's own settings
        assert {**s, "opt": None} == {**la.EMBEDDING_RATE[f"rate0.03_{name.split('_', 1)[1]}"], "opt": None}


def test_the_cross_learner_counts_the_user_with_the_genres_where_the_data_has_both():
    data = _data()
    n = len(data.labels)
    spec = FeatureSpec.model_validate(
        {
            "fields": [
                {"kind": "categorical", "name": "user_id", "buckets": 20},
                {"kind": "categorical", "name": "i", "buckets": 20},
                {"kind": "multi", "name": "genres", "buckets": 8, "max_len": 2},
            ]
        }
    )
    batch = replace(
        data.batch,
        multi=np.tile(np.array([[[spec.multi_offsets[0] + 1, spec.multi_offsets[0]]]]), (n, 1, 1)),
        multi_mask=np.tile(np.array([[[1.0, 0.0]]], dtype=np.float32), (n, 1, 1)),
    )
    s = {**la.BASE, **la.DELAYED_COUNTERS["counters5_w600_cross"]}
    counted = la.counted(replace(data, spec=spec, batch=batch), s)
    names = [f.name for f in counted.spec.dense_fields]
    assert names == ["user_id#ctr", "user_id#seen", "user_id#ctr@600s", "user_id#seen@600s",
                     "user_id*genres#ctr", "user_id*genres#seen", "user_id*genres#ctr@600s",
                     "user_id*genres#seen@600s"]  # fmt: skip
    # one genre for every row: each user's pair counts exactly what the user's own counts count
    np.testing.assert_allclose(counted.batch.num[:, 5], counted.batch.num[:, 1], rtol=1e-5)
    without = replace(data, spec=FeatureSpec(fields=spec.fields[:2]))
    with pytest.raises(ValueError, match="none of the crosses"):
        la.counted(without, s)
