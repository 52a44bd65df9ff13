"""A version whose weights are not all finite is never served: it would score NaN for every request.
Trainers refuse to publish such a state now; snapshots of older ones (or a serving bundle of one) could
hold one. The load refuses it naming the tensor, and the version before stays served."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reloop.engine.checkpoint.registry import SnapshotRegistry
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.serve.bundle_format import publish_serving_bundle
from reloop.engine.serve.loader import NotFinite, bundle_or_snapshot_loader, load_bundle

from .test_bundle_format import SPEC, _rows, _serving_v1, _trained


def _poisoned(learner, value: float = math.nan):
    """The learner with one value of its first 2-D weight set to ``value``, and that weight's name."""
    name, weight = next((n, p) for n, p in learner.model.named_parameters() if p.dim() == 2)
    with torch.no_grad():
        weight.view(-1)[3] = value
    return learner, name


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_snapshot_whose_weights_are_not_finite_is_refused_naming_the_tensor(tmp_path, value):
    learner, name = _poisoned(_trained("dcn", embedding_dim=4, hidden_units=[16]), value)
    reg = SnapshotRegistry(tmp_path)
    version = reg.publish({"model": learner.state_dict()})
    with pytest.raises(
        NotFinite, match=rf"snapshot 1 under .*'model\.{name}' \(1 of \d+ values NaN or inf\)"
    ):
        load_bundle(reg, version)


def test_a_serving_bundle_whose_weights_are_not_finite_is_refused_without_reading_the_snapshot(
    tmp_path, monkeypatch
):
    learner, name = _poisoned(_trained("dcn", embedding_dim=4, hidden_units=[16]))
    reg = SnapshotRegistry(tmp_path)
    publish_serving_bundle(reg, learner)
    reg.publish({"model": learner.state_dict()})

    def no_snapshot(*a, **kw):
        raise AssertionError("the training snapshot was read: it holds the same weights")

    monkeypatch.setattr(SnapshotRegistry, "load", no_snapshot)
    with pytest.raises(NotFinite, match=rf"serving bundle .*v000000000001\.safetensors: .*'model\.{name}'"):
        bundle_or_snapshot_loader(reg)(1)


def test_an_ftrl_snapshot_whose_weights_are_not_finite_is_refused(tmp_path):
    learner = _trained("ftrl")
    learner.z[5] = math.nan
    reg = SnapshotRegistry(tmp_path)
    version = reg.publish({"model": learner.state_dict()})
    with pytest.raises(NotFinite, match=r"'z' \(1 of"):
        load_bundle(reg, version)


def test_the_version_before_stays_served_and_the_refusal_is_counted(tmp_path, caplog):
    good = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg, holder, watcher = _serving_v1(tmp_path, good)

    bad, name = _poisoned(_trained("dcn", embedding_dim=4, hidden_units=[16]))
    publish_serving_bundle(reg, bad)  # v2: its bundle, then its snapshot
    reg.publish({"model": bad.state_dict()})
    with caplog.at_level("ERROR"):
        for _ in range(3):
            assert watcher.poll_once() == 0
    assert holder.version == 1 and watcher.refused == 1  # refused once, not every poll
    (refused,) = [r for r in caplog.records if "v2 refused" in r.getMessage()]
    assert name in refused.getMessage() and "not all finite" in refused.getMessage()
    rows = _rows(10, seed=3)
    served = holder.current.score(rows)
    assert np.isfinite(served).all()
    np.testing.assert_allclose(served, good.predict_proba(Featurizer(SPEC).transform(rows)))
