"""Every torch/numpy backbone learns planted pairwise interactions, round-trips its state exactly and is
reproducible for a seed. (river backbones have their own suite: test_river_learners.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from reloop.engine.features import (
    CategoricalField,
    FeatureSpec,
    Featurizer,
    MultiCategoricalField,
    NumericField,
)
from reloop.engine.models.registry import (
    available_backbones,
    backbone_entry,
    build_learner,
    learner_from_state,
)
from reloop.engine.train.offline import ArrayDataset, OfflineConfig, OfflineTrainer, evaluate

BACKBONES = [n for n in available_backbones() if backbone_entry(n).kind in {"torch", "numpy"}]
CARD = 8
SMALL = {"embedding_dim": 8, "hidden_units": (64, 64)}
CONFIGS: dict[str, dict] = {
    "lr": {},
    "ftrl": {},
    "fm": {"embedding_dim": 8},
    "fmfm": {"embedding_dim": 8},
    "nfm": SMALL,
    "pnn": SMALL,
    "wide_deep": SMALL,
    "deepfm": SMALL,
    "dcn": SMALL,
    "dcnv2": SMALL,
    "xdeepfm": {**SMALL, "cin_hidden_units": (8, 8)},
    "afn": {
        "embedding_dim": 8,
        "logarithmic_neurons": 16,
        "afn_hidden_units": (64, 64),
        "dnn_hidden_units": (64, 64),
    },
}
SPEC = FeatureSpec(fields=tuple(CategoricalField(name=f"f{j}", buckets=64) for j in range(6)))


def _planted(n: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """Label logit = 2 T01[f0, f1] + 2 T23[f2, f3] + 0.5 m[f4]; f5 is noise. T are random +-1 tables, so
    most of the signal is in the two pairwise interactions a linear model cannot represent."""
    tables = np.random.default_rng(99)
    t01, t23 = tables.choice([-1.0, 1.0], (CARD, CARD)), tables.choice([-1.0, 1.0], (CARD, CARD))
    main = tables.normal(size=CARD)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CARD, (n, 6))
    logit = 2.0 * t01[x[:, 0], x[:, 1]] + 2.0 * t23[x[:, 2], x[:, 3]] + 0.5 * main[x[:, 4]]
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return [{f"f{j}": f"v{x[i, j]}" for j in range(6)} for i in range(n)], y


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task() -> tuple[ArrayDataset, ArrayDataset]:
    fz = Featurizer(SPEC)
    (tr, ytr), (te, yte) = _planted(4000, 1), _planted(2000, 2)
    return ArrayDataset(fz.transform(tr), ytr), ArrayDataset(fz.transform(te), yte)


def _fit_auc(name: str, task) -> float:
    train, test = task
    learner = build_learner(name, SPEC, "ce", 0.0, seed=0, optimizer={"lr": 0.01}, **CONFIGS[name])
    with torch.random.fork_rng(devices=[]):
        OfflineTrainer(OfflineConfig(epochs=10, batch_size=256, single_thread=True)).fit(learner, train)
    return evaluate(learner, test).auc


@pytest.fixture(scope="module")
def lr_auc(task) -> float:
    return _fit_auc("lr", task)


def test_every_owned_backbone_has_a_test_config():
    assert set(BACKBONES) == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(set(BACKBONES) - {"lr", "ftrl"}))
def test_interaction_backbones_beat_logistic_regression_on_planted_interactions(name, task, lr_auc):
    auc = _fit_auc(name, task)
    assert lr_auc > 0.65  # LR finds the main effect and the tables' marginals...
    assert auc > lr_auc + 0.04, f"{name}: AUC {auc:.4f} vs LR {lr_auc:.4f}"  # ...but not the interactions


def test_ftrl_learns_the_linear_part_well_above_chance(task):
    # FTRL is linear, so it cannot beat LR on interactions; it must still learn the linear signal.
    assert _fit_auc("ftrl", task) > 0.65


MIXED_SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="u", buckets=30),
        NumericField(name="x", transform="minmax", min=0.0, max=1.0),
        NumericField(name="n", transform="log_bucket", buckets=20),
        MultiCategoricalField(name="tags", buckets=25, max_len=3),
    )
)


def _mixed_batch(n: int, seed: int) -> tuple[ArrayDataset, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [
        {
            "u": str(rng.integers(12)),
            "x": float(rng.random()),
            "n": float(rng.integers(0, 50)),
            "tags": [str(t) for t in rng.integers(0, 6, size=rng.integers(0, 4))],
        }
        for _ in range(n)
    ]
    y = rng.integers(0, 2, n).astype(np.float32)
    y_last = rng.random(n).astype(np.float32)
    return ArrayDataset(Featurizer(MIXED_SPEC).transform(rows), y, y_last), y_last


def _tiny(name: str) -> dict:
    cfg = dict(CONFIGS[name])
    if name not in {"lr", "ftrl"}:
        cfg["embedding_dim"] = 4
    if "hidden_units" in cfg:
        cfg["hidden_units"] = (16,)
        cfg["dropout"] = 0.2  # exercises the learner-owned dropout generator
    return cfg


def _steps(learner, data: ArrayDataset, k: int, batch: int = 64) -> None:
    for i in range(k):
        part = data.take(slice(i * batch, (i + 1) * batch))
        learner.learn(part.batch, part.labels, part.y_last)


@pytest.mark.parametrize("name", BACKBONES)
def test_state_round_trip_through_weights_only_load_reproduces_predictions_and_training(name):
    data, _ = _mixed_batch(512, 0)
    learner = build_learner(name, MIXED_SPEC, "reloop", 0.3, seed=5, **_tiny(name))
    _steps(learner, data, 3)
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    buf.seek(0)
    restored = learner_from_state(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(restored.predict_proba(data.batch), learner.predict_proba(data.batch))
    # Continuing from the restored state equals continuing uninterrupted (optimizer + dropout RNG restored).
    rest = data.take(slice(192, 512))
    _steps(learner, rest, 4)
    _steps(restored, rest, 4)
    np.testing.assert_array_equal(restored.predict_proba(data.batch), learner.predict_proba(data.batch))


@pytest.mark.parametrize("name", BACKBONES)
def test_same_seed_same_model_different_seed_different_model(name):
    data, _ = _mixed_batch(256, 1)

    def run(seed: int) -> np.ndarray:
        learner = build_learner(name, MIXED_SPEC, "kd", 0.5, seed=seed, **_tiny(name))
        _steps(learner, data, 4)
        return learner.predict_proba(data.batch)

    a, b = run(7), run(7)
    np.testing.assert_array_equal(a, b)
    if name != "ftrl":  # FTRL starts from zeros: no random initialisation to differ
        assert not np.array_equal(a, run(8))


@pytest.mark.parametrize("name", BACKBONES)
def test_clone_frozen_is_independent_and_predict_only(name):
    data, _ = _mixed_batch(256, 2)
    learner = build_learner(name, MIXED_SPEC, "ce", 0.0, seed=1, **_tiny(name))
    _steps(learner, data, 2)
    frozen = learner.clone_frozen()
    before = learner.predict_proba(data.batch)
    np.testing.assert_array_equal(frozen.predict_proba(data.batch), before)
    _steps(learner, data, 2)
    assert not np.array_equal(learner.predict_proba(data.batch), before)
    np.testing.assert_array_equal(frozen.predict_proba(data.batch), before)
    with pytest.raises(RuntimeError, match="only predicts"):
        frozen.learn(data.batch, data.labels)


@pytest.mark.parametrize("name", BACKBONES)
def test_predictions_are_probabilities_and_prediction_has_no_side_effects(name):
    data, _ = _mixed_batch(128, 3)
    learner = build_learner(name, MIXED_SPEC, "reloop", 0.5, seed=0, **_tiny(name))
    p1 = learner.predict_proba(data.batch)
    p2 = learner.predict_proba(data.batch)
    assert p1.shape == (128,) and p1.dtype == np.float64
    assert np.all((p1 > 0) & (p1 < 1))
    np.testing.assert_array_equal(p1, p2)
    stats = learner.learn(data.batch, data.labels, data.y_last)
    assert stats.strategy == "reloop" and stats.n == 128 and 0.0 <= stats.sc_active_fraction <= 1.0


RAW_SPEC = FeatureSpec(fields=(CategoricalField(name="u", buckets=30), NumericField(name="x")))


@pytest.mark.parametrize("name", BACKBONES)
def test_values_a_model_cannot_take_never_reach_its_weights(name, one_torch_thread):
    """Dense inputs the model cannot take: an infinite one (the featurizer refuses 1e39, which float32
    makes inf, but a FeatureBatch can be built without it) leaves its row out of the step and the rest
    is learnt; so does 1e30 (passes every check: finite in float32, too large for most backbones) where
    it makes the row's logit NaN: the step stops before it learns anything and goes on without that
    row, batch norm included. Later predictions stay numbers (before, they all turned NaN)."""
    rng = np.random.default_rng(0)
    rows = [{"u": str(rng.integers(12)), "x": float(rng.random())} for _ in range(64)]
    featurizer = Featurizer(RAW_SPEC)
    good = featurizer.transform(rows)
    labels = rng.integers(0, 2, 64).astype(np.float32)
    extra = {"batch_norm": True} if "hidden_units" in CONFIGS[name] else {}
    learner = build_learner(name, RAW_SPEC, "reloop", 0.3, seed=0, **{**_tiny(name), **extra})
    learner.learn(good, labels, np.full(64, 0.5))

    def step_with(value: float) -> tuple[np.ndarray, np.ndarray]:
        before = learner.predict_proba(good)
        bad = featurizer.transform([*rows[:5], {"u": "1", "x": min(value, 1.0)}, *rows[6:]])
        bad.num[5, 0] = value  # past the featurizer's check (it refuses what float32 makes inf)
        learner.learn(bad, labels, np.full(64, 0.5))
        after = learner.predict_proba(good)
        assert np.isfinite(after).all()
        return before, after

    before, after = step_with(np.inf)
    assert learner.skipped_samples == 1 and not np.array_equal(before, after)  # the other 63 learnt
    before, after = step_with(1e30)
    assert getattr(learner, "skipped_steps", 0) == 0  # no step lost: at most the one row
    assert not np.array_equal(before, after) and learner.skipped_samples in (1, 2)
    if backbone_entry(name).kind == "torch":
        # Left out when its logit is NaN (most backbones) or its gradient so large (LR: about 1e28)
        # that Adam's or Adagrad's squared state would overflow and freeze a parameter for ever; learnt
        # when batch norm tames it. Either way no optimizer state is infinite.
        assert _optimizer_state_finite(learner)
        if name in ("lr", "dcn"):
            assert learner.skipped_samples == 2


@pytest.mark.parametrize("name", [n for n in BACKBONES if backbone_entry(n).kind == "torch"])
def test_a_step_whose_gradients_are_not_finite_is_skipped_and_the_model_kept(name, one_torch_thread):
    # Finite logits, gradients not finite (here an infinite sample weight) on a path that does not look
    # for the rows to blame (``learn_tensors``, as a replayed step or the per-event wide part): the guard
    # of last resort skips the step, batch-norm statistics and optimizer state included.
    learner, good, labels = _poisonable(name)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    weights = np.ones(64, dtype=np.float32)
    weights[5] = np.inf
    tensors = [torch.from_numpy(a) for a in (labels, np.full(64, 0.5, dtype=np.float32), weights)]
    learner.learn_tensors(good.to_torch(), *tensors)
    assert (learner.skipped_steps, learner.skipped_samples) == (1, 64)
    for k, v in learner.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    learner.learn(good, labels, np.full(64, 0.5))  # the next good batch trains
    assert learner.skipped_steps == 1
    assert any(not torch.equal(v, before[k]) for k, v in learner.model.state_dict().items())


@pytest.mark.parametrize("name", [n for n in BACKBONES if backbone_entry(n).kind == "torch"])
def test_rows_whose_gradients_are_not_sound_are_found_and_the_step_learns_the_others(name, one_torch_thread):
    """An infinite sample weight (finite logits, gradients that are not) on a normal step: the rows to
    blame are found by halving the batch and the step goes on without them, exactly as if they had not
    been in it (before: the whole step was skipped, and the other 63 samples lost)."""
    learner, good, labels = _poisonable(name)
    twin_learner, _, _ = _poisonable(name)  # the same learner: same seed, same first step
    weights = np.ones(64, dtype=np.float32)
    weights[5] = np.inf
    learner.learn(good, labels, np.full(64, 0.5), weights)
    assert (learner.skipped_steps, learner.skipped_samples) == (0, 1)
    keep = np.flatnonzero(np.arange(64) != 5)
    twin_learner.learn(good.take(keep), labels[keep], np.full(63, 0.5), weights[keep])
    for k, v in twin_learner.model.state_dict().items():
        assert torch.equal(learner.model.state_dict()[k], v), k  # dropout masks and BN statistics too
    assert _optimizer_state_finite(learner) and np.isfinite(learner.predict_proba(good)).all()


@pytest.mark.parametrize("name", [n for n in BACKBONES if "hidden_units" in CONFIGS[n]])
def test_batch_norm_learns_a_step_of_one_row(name, one_torch_thread):
    """A step of one row (train.batch_size: 1, a partial step, a step whose other rows were left out)
    has no batch statistics: it raised "Expected more than 1 value per channel" and stopped the train
    stage at every restart. Now the running statistics stand in for the row's and stay as they were."""
    learner, good, labels = _poisonable(name)
    norms = {k: v.clone() for k, v in learner.model.state_dict().items() if "running" in k}
    assert norms  # the backbone has batch norm
    weights = {k: v.clone() for k, v in learner.model.state_dict().items() if "running" not in k}
    one = good.take(slice(0, 1))
    probs, _ = learner.learn_scored(one, labels[:1], np.full(1, 0.5))
    assert np.isfinite(probs).all() and learner.skipped_samples == 0
    state = learner.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in norms.items())
    assert any(not torch.equal(state[k], v) for k, v in weights.items())  # the row was learnt
    learner.learn(good, labels, np.full(64, 0.5))  # a full batch still updates the statistics
    assert any(not torch.equal(learner.model.state_dict()[k], v) for k, v in norms.items())


def _poisonable(name):
    """A small learner (with batch norm where the backbone has an MLP) after one good step, its batch."""
    rng = np.random.default_rng(0)
    rows = [{"u": str(rng.integers(12)), "x": float(rng.random())} for _ in range(64)]
    good = Featurizer(RAW_SPEC).transform(rows)
    labels = rng.integers(0, 2, 64).astype(np.float32)
    extra = {"batch_norm": True} if "hidden_units" in CONFIGS[name] else {}
    learner = build_learner(name, RAW_SPEC, "reloop", 0.3, seed=0, **{**_tiny(name), **extra})
    learner.learn(good, labels, np.full(64, 0.5))
    return learner, good, labels


def _optimizer_state_finite(learner) -> bool:
    states = [v for o in learner.optimizers.values() for st in o.state.values() for v in st.values()]
    tensors = [
        v.to_dense() if v.is_sparse else v for v in states if torch.is_tensor(v) and v.is_floating_point()
    ]
    return all(bool(torch.isfinite(t).all()) for t in tensors)
