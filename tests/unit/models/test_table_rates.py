"""The embedding tables' Adagrad rate and the dense parameters' Adam rate are the backbone's own unless
``embedding_lr`` / ``lr`` is set: the rates chosen per backbone on the backtests' selection periods
(docs/backtest/ablation.md) reach the optimizers, in batch steps and after a resume; with the per-event
part, the rates it was chosen with; small steps keep the small-step rates for every backbone."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer
from reloop.engine.models.config import (
    ADAGRAD_EMBEDDING_LR,
    ADAM_LR,
    PER_EVENT_RATES,
    OptimizerConfig,
    adagrad_embedding_lr,
    adam_lr,
)
from reloop.engine.models.registry import available_backbones, backbone_entry, build_learner

SPEC = FeatureSpec(fields=(CategoricalField(name="u", buckets=40), CategoricalField(name="i", buckets=40)))
TORCH = [name for name in available_backbones() if backbone_entry(name).kind == "torch"]
EXPECTED = {"deepfm": 0.03, "fmfm": 0.055, "lr": 0.17, "pnn": 0.17, "afn": 0.3}
EXPECTED_DENSE = {"dcn": 2e-3, "deepfm": 4e-3, "fmfm": 1.6e-2, "nfm": 2e-3, "pnn": 2e-3, "xdeepfm": 2e-3}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [{"u": f"u{rng.integers(30)}", "i": f"i{rng.integers(30)}"} for _ in range(n)]
    return Featurizer(SPEC).transform(rows), (rng.random(n) < 0.4).astype(np.float32)


def _learner(backbone: str, **optimizer: object):
    options = {"embedding_dim": 1} if backbone == "lr" else {"embedding_dim": 4}
    return build_learner(backbone, SPEC, "ce", 0.0, seed=0, optimizer=optimizer, **options)


def _table_rate(learner) -> float:
    return learner.optimizers["embedding"].param_groups[0]["lr"]


def _dense_rate(learner) -> float:
    (rate,) = {group["lr"] for group in learner.optimizers["dense"].param_groups}
    return rate


def test_every_torch_backbone_has_a_rate_and_the_listed_ones_theirs() -> None:
    assert len(TORCH) == 11
    assert {b: adagrad_embedding_lr(b) for b in TORCH} == {b: EXPECTED.get(b, 0.1) for b in TORCH}
    assert (
        adagrad_embedding_lr("a_plugin_backbone") == adagrad_embedding_lr(None) == ADAGRAD_EMBEDDING_LR == 0.1
    )


def test_every_torch_backbone_has_a_dense_rate_and_the_listed_ones_theirs() -> None:
    assert {b: adam_lr(b) for b in TORCH} == {b: EXPECTED_DENSE.get(b, 1e-3) for b in TORCH}
    assert adam_lr("a_plugin_backbone") == adam_lr(None) == ADAM_LR == 1e-3


@pytest.mark.parametrize("backbone", TORCH)
def test_batch_steps_learn_at_the_backbones_dense_rate_and_small_steps_at_the_small_step_rate(
    backbone: str,
) -> None:
    learner = _learner(backbone)
    assert _dense_rate(learner) == EXPECTED_DENSE.get(backbone, 1e-3)  # as built
    learner.learn(*_batch(300))
    assert _dense_rate(learner) == EXPECTED_DENSE.get(backbone, 1e-3)
    small = _learner(backbone)
    small.learn(*_batch(8))
    assert _dense_rate(small) == OptimizerConfig().small_step_lr == 3e-4
    mine = _learner(backbone, lr=5e-4)  # an explicit rate wins
    mine.learn(*_batch(300))
    assert _dense_rate(mine) == 5e-4


@pytest.mark.parametrize("backbone", TORCH)
def test_batch_steps_learn_at_the_backbones_rate_and_small_steps_at_the_small_step_rate(
    backbone: str,
) -> None:
    learner = _learner(backbone)
    assert _table_rate(learner) == EXPECTED.get(backbone, 0.1)  # as built
    learner.learn(*_batch(300))
    assert _table_rate(learner) == EXPECTED.get(backbone, 0.1)
    small = _learner(backbone)
    small.learn(*_batch(8))
    assert _table_rate(small) == OptimizerConfig().effective_small_step_embedding_lr == 0.1


@pytest.mark.parametrize("backbone", ["dcn", "deepfm"])
def test_an_explicit_rate_wins_and_sparse_adam_keeps_the_dense_rate(backbone: str) -> None:
    mine = _learner(backbone, embedding_lr=0.2)
    mine.learn(*_batch(300))
    assert _table_rate(mine) == 0.2
    adam = _learner(backbone, embedding_optimizer="adam")
    adam.learn(*_batch(300))
    assert _table_rate(adam) == EXPECTED_DENSE[backbone]  # SparseAdam at the backbone's dense rate


@pytest.mark.parametrize("backbone", TORCH)
def test_with_the_per_event_part_unset_rates_are_the_ones_the_part_was_chosen_with(backbone: str) -> None:
    # No backbone keeps its own rates with the part (the selection periods: ablation.md).
    learner = _learner(backbone, wide="bayes")
    learner.learn(*_batch(300))
    assert (_dense_rate(learner), _table_rate(learner)) == PER_EVENT_RATES == (1e-3, 0.03)
    plugin = OptimizerConfig(wide="bayes")
    assert (plugin.effective_lr("a_plugin_backbone"), plugin.effective_embedding_lr("a_plugin_backbone")) == (
        1e-3,
        0.03,
    )
    mine = _learner(backbone, wide="bayes", lr=5e-4, embedding_lr=0.2)  # explicit rates win
    mine.learn(*_batch(300))
    assert (_dense_rate(mine), _table_rate(mine)) == (5e-4, 0.2)
    small = _learner(backbone, wide="bayes")  # small steps keep the small-step rates
    small.learn(*_batch(8))
    assert (_dense_rate(small), _table_rate(small)) == (3e-4, 0.1)


def test_a_resumed_learner_keeps_its_backbones_rate() -> None:
    first = _learner("deepfm")
    first.learn(*_batch(300))
    resumed = _learner("deepfm")
    resumed.load_state_dict(first.state_dict())
    resumed.learn(*_batch(300, seed=1))
    assert _table_rate(resumed) == 0.03 and _dense_rate(resumed) == 4e-3


def test_a_resume_at_another_rate_than_the_snapshots_is_logged_and_the_same_rate_is_not(caplog) -> None:
    # A snapshot of DCN written when the tables' default was 0.03, resumed under today's default (0.1).
    before = _learner("dcn", embedding_lr=0.03)
    before.learn(*_batch(300))
    state = before.state_dict()
    # Only the learner's own records: a Kafka client an earlier test left running may log meanwhile.
    with caplog.at_level("WARNING", logger="reloop.learner"):
        _learner("dcn", embedding_lr=0.03).load_state_dict(state)
        assert not _records(caplog, "reloop.learner")  # the same rates: nothing to say
        _learner("dcn").load_state_dict(state)
    (record,) = _records(caplog, "reloop.learner")
    assert record.fields == {
        "optimizer": "embedding",
        "snapshot_lr": 0.03,
        "lr": 0.1,
        "key": "model.optimizer.embedding_lr",
    }


def test_a_resume_in_small_steps_names_the_small_step_key(caplog) -> None:
    before = _learner("dcn")
    before.learn(*_batch(8))
    with caplog.at_level("WARNING", logger="reloop.learner"):
        _learner("dcn", small_step_lr=1e-4).load_state_dict(before.state_dict())
    assert [(r.fields["optimizer"], r.fields["key"]) for r in caplog.records] == [
        ("dense", "model.optimizer.small_step_lr")
    ]


def test_learning_rates_name_each_optimizers_rate_of_the_last_step() -> None:
    learner = _learner("dcn")
    learner.learn(*_batch(300))
    assert learner.learning_rates() == {"dense": 2e-3, "embedding": 0.1}
    learner = _learner("dcn")
    learner.learn(*_batch(8))
    assert learner.learning_rates() == {"dense": 3e-4, "embedding": 0.1}


def _records(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def test_a_snapshot_saved_before_step_sizes_were_recorded_is_compared_at_the_first_step(caplog) -> None:
    # Such a snapshot (an upgrade's) was never compared: the check needed the step size average.
    before = _learner("dcn", embedding_lr=0.03)
    before.learn(*_batch(300))
    state = {k: v for k, v in before.state_dict().items() if k != "step_size_average"}
    with caplog.at_level("WARNING", logger="reloop.learner"):
        resumed = _learner("dcn")
        resumed.load_state_dict(state)
        assert not _records(caplog, "reloop.learner")  # the rates are known at the first step
        resumed.learn(*_batch(300, seed=1))
        resumed.learn(*_batch(300, seed=2))
    (record,) = _records(caplog, "reloop.learner")  # once, at the first step
    assert record.fields["optimizer"] == "embedding" and record.fields["snapshot_lr"] == 0.03
    assert record.fields["lr"] == 0.1
