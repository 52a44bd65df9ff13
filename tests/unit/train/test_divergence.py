"""Training that diverges or meets values that are not finite: a model whose weights or optimizer
moments went NaN or inf, or grew too large for any input, stops the trainer with ``TrainingDiverged``
(naming the tensor) instead of dead-lettering every later sample, and is never snapshotted; steps in a
row that learn nothing stop it after ``max_consecutive_skipped``; a value one row cannot take is still
only that row's problem."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer, NumericField
from reloop.engine.models.finite import TrainingDiverged, first_not_finite
from reloop.engine.models.registry import build_learner
from reloop.engine.train.offline import ArrayDataset, OfflineConfig, OfflineTrainer
from reloop.engine.train.stream import StreamTrainer, StreamTrainerConfig

SPEC = FeatureSpec(fields=(CategoricalField(name="user", buckets=50), NumericField(name="x")))
# Adam moves a weight by about its rate per step: 1e37 puts the embeddings at 1e37 after one step, where
# every logit overflows float32 whatever the input (small_steps_below=0: the rates as given).
TOO_HIGH = {"lr": 1e37, "embedding_lr": 1e37, "small_steps_below": 0}


def _trainer(
    model: str = "lr", strategy: str = "kd", optimizer=None, learner_kw=None, **cfg
) -> StreamTrainer:
    learner = build_learner(model, SPEC, strategy, 0.5, seed=0, optimizer=optimizer, **(learner_kw or {}))
    return StreamTrainer(learner=learner, featurizer=Featurizer(SPEC), config=StreamTrainerConfig(**cfg))


def _samples(n: int, start: int = 0, x: float = 0.5) -> list[LabeledSample]:
    rng = np.random.default_rng(start)
    return [
        LabeledSample(
            f"s{start + i}",
            {"user": f"u{rng.integers(20)}", "x": x},
            int(rng.random() < 0.4),
            float(rng.uniform(0.05, 0.95)),
            0,
            1000 + start + i,
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------- snapshots
@pytest.mark.parametrize(
    ("model", "poison", "named"),
    [
        ("lr", lambda lr: lr.model.linear.bias.data.fill_(math.nan), "model.linear.bias"),
        ("dcn", lambda lr: next(iter(lr.model.parameters())).data.view(-1)[3].fill_(math.inf), "model."),
        (
            "lr",
            lambda lr: next(iter(lr.optimizers["dense"].state.values()))["exp_avg_sq"].fill_(math.nan),
            "exp_avg_sq",
        ),
    ],
    ids=["nan-weight", "inf-table-row", "nan-adam-moment"],
)
def test_a_snapshot_of_a_state_that_is_not_finite_is_refused_naming_the_tensor(model, poison, named):
    t = _trainer(model)
    t.train_batch(_samples(16))
    poison(t.learner)
    with pytest.raises(TrainingDiverged, match=f"snapshot refused: the learner's '[^']*{named}"):
        t.state_dict()


def test_a_numpy_learner_state_that_is_not_finite_is_refused_too():
    t = _trainer("river_fm_np")
    t.train_batch(_samples(16))
    t.learner.v[1, 0] = math.nan
    with pytest.raises(TrainingDiverged, match="'v' \\(1 of"):
        t.state_dict()


def test_a_finite_state_is_snapshotted_as_before():
    t = _trainer("dcn")
    t.train_batch(_samples(16))
    state = t.state_dict()
    assert first_not_finite(state) is None and state["counters"]["steps"] == 1


def test_first_not_finite_names_the_first_bad_value_anywhere_in_a_state():
    state = {"a": [torch.zeros(3), {"b": np.array([1.0, np.inf])}], "c": math.nan, "d": torch.tensor([1, 2])}
    assert first_not_finite(state) == "'a.1.b' (1 of 2 values NaN or inf)"
    assert first_not_finite({"c": math.nan}) == "'c' (nan)"
    assert (
        first_not_finite({"ok": [1.0, torch.ones(2, dtype=torch.float16), torch.empty(0), "x", None]}) is None
    )


# ---------------------------------------------------------------------------- while training
@pytest.mark.parametrize("model", ["lr", "dcn", "fm"])
def test_a_learning_rate_far_too_high_stops_training_instead_of_dead_lettering_the_stream(model):
    """Today's guard leaves out rows whose logits are not finite; once the weights are what overflows,
    every later row was left out and dead-lettered, and the broken model snapshotted."""
    rates = TOO_HIGH if model != "lr" else {**TOO_HIGH, "lr": 1e38}  # LR's three 1e37 terms still fit
    t = _trainer(model, optimizer=rates)
    t.train_batch(_samples(32))  # finite gradients, one Adam step of 1e37 (1e38: then NaN)
    counters = t.counters.as_dict()
    with pytest.raises(TrainingDiverged, match="logits are not finite for 32 samples even with their dense"):
        t.train_batch(_samples(32, start=32))
    assert t.counters.as_dict() == counters  # the failed step counts nothing
    with pytest.raises(TrainingDiverged, match="snapshot refused: training diverged"):
        t.state_dict()  # not published either, NaN or merely too large (as DCN's and FM's are here)


def test_a_value_one_row_cannot_take_is_still_only_that_rows_problem():
    t = _trainer("dcn")
    batch = _samples(16)
    batch[3] = replace(batch[3], features={"user": "u1", "x": 1e30})  # finite, but the logit is not
    result = t.train_batch(batch)
    assert result.unlearnt is not None and np.flatnonzero(result.unlearnt).tolist() == [3]
    assert t.skipped_in_a_row == 0 and first_not_finite(t.state_dict()) is None


def test_steps_in_a_row_that_learn_nothing_stop_after_max_consecutive_skipped():
    t = _trainer("dcn", max_consecutive_skipped=3)
    t.train_batch(_samples(8, x=1e30))
    t.train_batch(_samples(8, start=8, x=1e30))
    assert t.skipped_in_a_row == 2
    t.train_batch(_samples(8, start=16))  # a step that learns resets the streak
    assert t.skipped_in_a_row == 0
    for i in range(2):
        t.train_batch(_samples(8, start=24 + 8 * i, x=1e30))
    with pytest.raises(TrainingDiverged, match="3 steps in a row learnt nothing"):
        t.train_batch(_samples(8, start=40, x=1e30))
    never = _trainer("dcn", max_consecutive_skipped=0)
    for i in range(5):
        never.train_batch(_samples(8, start=8 * i, x=1e30))
    assert never.skipped_in_a_row == 5


def test_max_consecutive_skipped_is_validated():
    with pytest.raises(ValueError, match="max_consecutive_skipped"):
        StreamTrainerConfig(max_consecutive_skipped=-1)
    assert StreamTrainerConfig().max_consecutive_skipped == 100


def test_a_numpy_fm_overflowed_by_a_valid_value_stops_instead_of_scoring_nan():
    """3e38 fits float32 (the featurizer passes it under the identity transform); the numpy FM's update
    turns its weights NaN, and every later sample was scored NaN and dead-lettered."""
    t = _trainer("river_fm_np")
    t.train_batch(_samples(8, x=3e38))
    with pytest.raises(TrainingDiverged, match="the learner's 'w0' \\(nan\\)"):
        t.train_batch(_samples(8, start=8))


# ---------------------------------------------------------------------------- offline
def _dataset(n: int, x: np.ndarray | float = 0.5) -> ArrayDataset:
    xs = np.broadcast_to(np.asarray(x, dtype=float), (n,))
    rows = [{"user": f"u{i % 7}", "x": float(xs[i])} for i in range(n)]
    return ArrayDataset(
        Featurizer(SPEC).transform(rows), np.array([i % 3 == 0 for i in range(n)], np.float32)
    )


def test_offline_fit_stops_at_an_epoch_that_diverged():
    learner = build_learner("lr", SPEC, "ce", 0.0, seed=0, optimizer={"lr": 1e38, "small_steps_below": 0})
    with pytest.raises(TrainingDiverged, match="'model.linear.bias' \\(1 of 1 values NaN or inf\\)"):
        OfflineTrainer(OfflineConfig(epochs=3, batch_size=16, shuffle=False)).fit(learner, _dataset(64))
    numpy_fm = build_learner("river_fm_np", SPEC, "ce", 0.0, seed=0)  # no check of its own in a step
    with pytest.raises(TrainingDiverged, match="in epoch 1: the learner's 'w0' \\(nan\\)"):
        OfflineTrainer(OfflineConfig(epochs=3, batch_size=16, shuffle=False)).fit(
            numpy_fm, _dataset(64, 3e38)
        )


def test_offline_train_loss_leaves_out_a_step_that_learnt_nothing():
    x = np.where(np.arange(64) < 16, 1e30, 0.5)  # the first batch is all rows the model cannot take
    learner = build_learner("dcn", SPEC, "ce", 0.0, seed=0)
    result = OfflineTrainer(OfflineConfig(epochs=1, batch_size=16, shuffle=False)).fit(
        learner, _dataset(64, x)
    )
    assert math.isfinite(result.epochs[0].train_loss) and learner.skipped_samples == 16


def test_offline_fit_stops_at_an_epoch_that_learnt_nothing():
    learner = build_learner("dcn", SPEC, "ce", 0.0, seed=0)
    with pytest.raises(TrainingDiverged, match="learnt none of its 32 samples"):
        OfflineTrainer(OfflineConfig(epochs=2, batch_size=16)).fit(learner, _dataset(32, 1e30))
