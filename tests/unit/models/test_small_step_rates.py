"""While steps average fewer than ``small_steps_below`` samples a learner learns at the small-step rates,
otherwise at the configured ones: the rule reaches the optimizers (the same weights as a learner given
those rates throughout), the odd partial batch among full ones keeps the batch rates, the average is
state (exact resume), and a data-parallel step is sized over all ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reloop.engine.features import CategoricalField, FeatureSpec, Featurizer
from reloop.engine.models.config import OptimizerConfig
from reloop.engine.models.registry import build_learner

SPEC = FeatureSpec(fields=(CategoricalField(name="u", buckets=40), CategoricalField(name="i", buckets=40)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = [{"u": f"u{rng.integers(30)}", "i": f"i{rng.integers(30)}"} for _ in range(n)]
    return Featurizer(SPEC).transform(rows), (rng.random(n) < 0.4).astype(np.float32)


def _weights_after(sizes: list[int], optimizer: dict, backbone: str = "deepfm") -> dict[str, torch.Tensor]:
    learner = build_learner(backbone, SPEC, "ce", 0.0, seed=3, optimizer=optimizer, hidden_units=(8,))
    for k, n in enumerate(sizes):
        learner.learn(*_batch(n, k))
    return learner.model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_rates_follow_the_steps_size() -> None:
    opt = OptimizerConfig()
    assert opt.small_steps_below == 256
    assert opt.rates(255, "deepfm") == (3e-4, 0.1) and opt.rates(256, "deepfm") == (4e-3, 0.03)
    assert opt.rates(255, "dcn") == (3e-4, 0.1) and opt.rates(256, "dcn") == (2e-3, 0.1)
    assert OptimizerConfig(small_steps_below=0).rates(1, "deepfm") == (4e-3, 0.03)
    assert OptimizerConfig(small_step_lr=1e-4, small_step_embedding_lr=0.2).rates(8) == (1e-4, 0.2)
    # SparseAdam tables follow the dense rate in both, unless embedding_lr says otherwise.
    assert OptimizerConfig(embedding_optimizer="adam").rates(8) == (3e-4, 3e-4)
    assert OptimizerConfig(embedding_optimizer="adam", embedding_lr=5e-3).rates(8) == (3e-4, 5e-3)
    assert OptimizerConfig.previous_defaults().small_steps_below == 0


def test_small_steps_learn_at_the_small_step_rates_and_large_ones_at_the_configured_rates() -> None:
    small, large = [8, 8, 30], [300, 260]
    spelled_small = {"small_steps_below": 0, "lr": 3e-4, "embedding_lr": 0.1}
    assert _same(_weights_after(small, {}), _weights_after(small, spelled_small))
    assert not _same(_weights_after(small, {}), _weights_after(small, {"small_steps_below": 0}))
    assert _same(_weights_after(large, {}), _weights_after(large, {"small_steps_below": 0}))
    # A partial batch after full ones keeps the batch rates; a run of small steps switches.
    partial = [300, 300, 40]
    assert _same(_weights_after(partial, {}), _weights_after(partial, {"small_steps_below": 0}))
    learner = build_learner("deepfm", SPEC, "ce", 0.0, seed=0, hidden_units=(8,))  # tables: 0.03, then 0.1
    seen = []
    for k, n in enumerate([512, 512, 40, *[8] * 20]):
        learner.learn(*_batch(n, k))
        seen.append(learner.optimizers["embedding"].param_groups[0]["lr"])
    switch = seen.index(0.1)
    assert seen[:switch] == [0.03] * switch and set(seen[switch:]) == {0.1}
    assert 4 < switch < 15  # the partial batch and the first small steps kept the batch rates


def test_the_average_is_state_and_a_resumed_learner_continues_exactly() -> None:
    sizes = [300, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]
    whole = build_learner("fm", SPEC, "ce", 0.0, seed=1)
    first = build_learner("fm", SPEC, "ce", 0.0, seed=1)
    for k, n in enumerate(sizes):
        whole.learn(*_batch(n, k))
        if k < 6:
            first.learn(*_batch(n, k))
    resumed = build_learner("fm", SPEC, "ce", 0.0, seed=1)
    state = first.state_dict()
    assert state["step_size_average"] == first.step_size_average > 8
    resumed.load_state_dict(state)
    for k, n in enumerate(sizes[6:], start=6):
        resumed.learn(*_batch(n, k))
    assert _same(whole.model.state_dict(), resumed.model.state_dict())
    # A state saved before the average existed starts it afresh.
    del state["step_size_average"]
    resumed.load_state_dict(state)
    assert resumed.step_size_average is None


def test_a_data_parallel_step_is_sized_over_all_ranks() -> None:
    learner = build_learner("deepfm", SPEC, "ce", 0.0, seed=0, hidden_units=(8,))
    totals: list[int] = []

    def sync(n: int) -> int:  # stands in for GradientSync: this rank holds 100 of a 300-sample step
        totals.append(n)
        return 300

    learner.grad_sync = sync
    learner.learn(*_batch(100, 0))
    assert totals == [100] and learner.step_size_average == 300
    assert learner.optimizers["dense"].param_groups[0]["lr"] == 4e-3  # DeepFM's batch rates
    assert learner.optimizers["embedding"].param_groups[0]["lr"] == 0.03
    alone = build_learner("deepfm", SPEC, "ce", 0.0, seed=0, hidden_units=(8,))
    alone.learn(*_batch(100, 0))
    assert alone.step_size_average == 100
    assert alone.optimizers["embedding"].param_groups[0]["lr"] == 0.1
    assert alone.optimizers["dense"].param_groups[0]["lr"] == 3e-4
