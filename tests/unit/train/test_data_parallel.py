"""Data-parallel steps on real torch.distributed (gloo, two processes): the ranks end with the same
weights, and those are the weights one process reaches on the union of their samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import build_learner
from reloop.engine.runtime.synthetic import SPEC

from ..procs import rank_context

ROWS = 96
STEPS = 3


def _learner(numeric: bool = False):
    fields = [*SPEC["fields"], {"kind": "numeric", "name": "x"}] if numeric else SPEC["fields"]
    spec = FeatureSpec.from_dict({"fields": fields})
    return build_learner("dcn", spec, "reloop", 0.3, seed=3, hidden_units=(16, 16)), Featurizer(spec)


def _data(step: int):
    rng = np.random.default_rng(step)
    rows = [
        {
            "user": f"u{rng.integers(60)}",
            "item": f"i{rng.integers(90)}",
            "ctx": int(rng.integers(7)),
            "x": 0.5,
        }
        for _ in range(ROWS)
    ]
    labels = (rng.random(ROWS) < 0.3).astype(np.float32)
    y_last = rng.uniform(0.05, 0.6, ROWS).astype(np.float32)
    return rows, labels, y_last


def _rank(
    rank: int, world: int, init: str, out: str, bounds: list[int], mode: str, poison: str | None = None
) -> None:
    from reloop.engine.train.data_parallel import GradientSync, RankGroup, weights_digest

    torch.set_num_threads(1)
    group = RankGroup.start(rank=rank, world_size=world, init_method=init, timeout_s=60)
    learner, featurizer = _learner(numeric=poison is not None)
    sync = GradientSync(group, learner.model, mode)
    learner.grad_sync = sync
    lo, hi = bounds[rank], bounds[rank + 1]
    for step in range(STEPS):
        rows, labels, y_last = _data(step)
        weights = None
        poisoned = poison is not None and rank == 0 and step == 1  # on one rank only
        if poisoned and poison.startswith("inf_weight"):  # finite logits, gradients that are not
            weights = np.ones(hi - lo, dtype=np.float32)
            weights[0] = np.inf
        elif poisoned and poison == "big_input":
            rows[lo]["x"] = 1e30  # fits float32, too large for the model: a NaN logit
        sync.total = bounds[-1] - bounds[0]
        if hi > lo:
            features = featurizer.transform(rows[lo:hi])
            if poisoned and poison == "inf_input":  # past the featurizer (which refuses 1e39)
                features.num[0, 0] = np.inf
            if poisoned and poison == "inf_weight_unsearched":  # a path that does not look for the row
                tensors = [torch.from_numpy(np.asarray(a)) for a in (labels[lo:hi], y_last[lo:hi], weights)]
                learner.learn_tensors(features.to_torch(), *tensors)
            else:
                learner.learn(features, labels[lo:hi], y_last[lo:hi], weights)
        else:
            learner.idle_step()
    torch.save(learner.model.state_dict(), Path(out) / f"rank{rank}.pt")
    (Path(out) / f"rank{rank}.digest").write_text(weights_digest(learner.model))
    (Path(out) / f"rank{rank}.skipped").write_text(f"{learner.skipped_steps} {learner.skipped_samples}")
    group.close()


def _run_ranks(tmp_path: Path, bounds: list[int], mode: str, poison: str | None = None) -> list[dict]:
    ctx = rank_context()
    init = f"file://{tmp_path / 'store'}"
    procs = [
        ctx.Process(target=_rank, args=(r, len(bounds) - 1, init, str(tmp_path), bounds, mode, poison))
        for r in range(len(bounds) - 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(len(procs))]


def _single(lo: int, hi: int) -> dict:
    learner, featurizer = _learner()
    for step in range(STEPS):
        rows, labels, y_last = _data(step)
        learner.learn(featurizer.transform(rows[lo:hi]), labels[lo:hi], y_last[lo:hi])
    return learner.model.state_dict()


@pytest.mark.parametrize(
    ("bounds", "mode"),
    [
        ([0, 40, ROWS], "sparse"),
        ([0, 40, ROWS], "dense"),
        ([0, 0, ROWS], "sparse"),
        ([0, 20, 45, 80, ROWS], "sparse"),
    ],
    ids=["unequal-shares", "dense-table-sync", "one-rank-idle", "four-ranks"],
)
def test_ranks_hold_the_weights_one_process_reaches_on_all_samples(tmp_path, bounds, mode):
    ranks = _run_ranks(tmp_path, bounds, mode)
    digests = {(tmp_path / f"rank{r}.digest").read_text() for r in range(len(ranks))}
    assert len(digests) == 1
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    reference = _single(bounds[0], bounds[-1])
    moved = 0
    for k, v in reference.items():
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=k)
        moved += int(not torch.equal(v, _learner()[0].model.state_dict()[k]))
    assert moved >= len(reference) // 2  # the steps changed the weights (the comparison means something)


@pytest.mark.parametrize(
    ("poison", "skipped"),
    [
        ("inf_weight", ["0 1", "0 0"]),
        ("inf_weight_unsearched", ["1 40", "1 56"]),
        ("inf_input", ["0 1", "0 0"]),
        ("big_input", ["0 1", "0 0"]),
    ],
)
def test_a_value_one_rank_cannot_take_leaves_the_ranks_equal(tmp_path, poison, skipped):
    """An infinite sample weight on rank 0 makes its gradients NaN: rank 0 finds the row before the sync
    and leaves it out, and the step goes on with every other row of both ranks. Where nothing looks for
    the row (``learn_tensors``), every rank sees NaN after the sync and skips the step alike (no rank
    steps, none waits for ever). An infinite dense input and 1e30 (a NaN logit) are left out of rank 0's
    rows and the step goes on with the rest."""
    ranks = _run_ranks(tmp_path, [0, 40, ROWS], "sparse", poison)
    assert len({(tmp_path / f"rank{r}.digest").read_text() for r in range(2)}) == 1
    assert [(tmp_path / f"rank{r}.skipped").read_text() for r in range(2)] == skipped
    assert all(torch.isfinite(v).all() for v in ranks[0].values() if v.is_floating_point())


def test_idle_step_needs_a_group():
    learner, _ = _learner()
    with pytest.raises(RuntimeError, match="data-parallel"):
        learner.idle_step()
