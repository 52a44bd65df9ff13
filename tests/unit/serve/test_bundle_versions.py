"""A serving fleet older than its trainer (a rolling upgrade, a rollback): a bundle of a newer format, or
holding what this reader does not know, is refused naming the file, and the version is served from its
training snapshot; a learner config with a model option this reloop does not know is refused clearly,
and the version before stays served."""

from __future__ import annotations

import json

import numpy as np
import pytest
from reloop.engine.checkpoint.registry import SnapshotError, SnapshotRegistry
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.serve import bundle_format
from reloop.engine.serve.bundle_format import (
    learner_from_bundle,
    publish_serving_bundle,
    read_bundle,
    serving_dir,
)
from reloop.engine.serve.config import ArmConfig
from reloop.engine.serve.loader import bundle_or_snapshot_loader, load_bundle
from reloop.engine.serve.stack import registry_loader_factory

from .test_bundle_format import SPEC, _rows, _trained


def _newer_bundle(monkeypatch, tensors=None, meta=None):
    """Bundles published from now on carry ``tensors`` and ``meta`` beyond what this format has."""
    real = bundle_format.serving_tensors

    def writer(learner):
        found, found_meta = real(learner)
        return {**found, **(tensors or {})}, {**found_meta, **(meta or {})}

    monkeypatch.setattr(bundle_format, "serving_tensors", writer)


def _served_from_the_snapshot(reg, learner, version):
    rows = _rows(10)
    served = bundle_or_snapshot_loader(reg)(version).score(rows)
    np.testing.assert_allclose(served, learner.predict_proba(Featurizer(SPEC).transform(rows)))


def test_a_bundle_of_a_newer_format_is_refused_naming_its_file_and_the_snapshot_serves(tmp_path):
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    publish_serving_bundle(reg, learner)
    reg.publish({"model": learner.state_dict()})
    manifest = serving_dir(tmp_path) / "v000000000001.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 2}))
    with pytest.raises(SnapshotError, match="format 2, written by a newer reloop") as caught:
        read_bundle(serving_dir(tmp_path), 1)
    assert str(manifest) in str(caught.value) and "reads format 1" in str(caught.value)
    _served_from_the_snapshot(reg, learner, 1)


def test_a_bundle_holding_a_tensor_this_reader_does_not_know_is_refused(tmp_path, monkeypatch):
    # A newer trainer adds, say, a calibration of the scores without changing the format: this reader
    # served the model without it, i.e. other scores than the trainer's, silently.
    import torch

    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    _newer_bundle(monkeypatch, tensors={"calibration.scale": torch.tensor([2.0])})
    publish_serving_bundle(reg, learner)
    with pytest.raises(SnapshotError, match="calibration.scale"):
        learner_from_bundle(*read_bundle(serving_dir(tmp_path), 1))
    reg.publish({"model": learner.state_dict()})
    _served_from_the_snapshot(reg, learner, 1)


def test_a_bundle_holding_a_metadata_key_this_reader_does_not_know_is_refused(tmp_path, monkeypatch):
    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    _newer_bundle(monkeypatch, meta={"score_transform": "platt"})
    publish_serving_bundle(reg, learner)
    with pytest.raises(SnapshotError, match="score_transform"):
        learner_from_bundle(*read_bundle(serving_dir(tmp_path), 1))


def test_a_bundle_with_a_wide_part_its_learner_config_does_not_have_is_refused(tmp_path, monkeypatch):
    import torch

    learner = _trained("fm", embedding_dim=4, optimizer={"wide": "off", "embedding_optimizer": "adam"})
    assert learner.wide is None
    _newer_bundle(monkeypatch, tensors={"wide.mean": torch.zeros(3), "wide.var": torch.ones(3)})
    publish_serving_bundle(SnapshotRegistry(tmp_path), learner)
    with pytest.raises(SnapshotError, match="wide part"):
        learner_from_bundle(*read_bundle(serving_dir(tmp_path), 1))


def _with_new_option(config_json: str) -> str:
    data = json.loads(config_json)
    data["model"]["gated_cross"] = True  # a model option of a newer reloop
    return json.dumps(data)


def test_a_model_option_this_reloop_does_not_know_is_refused_naming_the_bundle_and_the_snapshot(
    tmp_path, monkeypatch
):
    # It was a bare ValueError ("learner config: gated_cross: Extra inputs are not permitted") that
    # skipped the loader's fallback to the snapshot and named neither the version nor the file.
    from reloop.engine.serve.bundle import ModelHolder
    from reloop.engine.serve.reload import ArmSource, ReloadWatcher

    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    publish_serving_bundle(reg, learner)
    reg.publish({"model": learner.state_dict()})  # v1: this reloop's
    latest, load, versions = registry_loader_factory(ArmConfig(name="A", registry=tmp_path))
    holder = ModelHolder()
    watcher = ReloadWatcher(sources=[ArmSource("A", holder, latest, load, versions)])
    assert watcher.poll_once() == 1 and holder.version == 1

    real = bundle_format.serving_tensors

    def newer(learner):
        tensors, meta = real(learner)
        return tensors, {**meta, "config_json": _with_new_option(meta["config_json"])}

    monkeypatch.setattr(bundle_format, "serving_tensors", newer)
    publish_serving_bundle(reg, learner)
    state = learner.state_dict()
    reg.publish({"model": {**state, "config_json": _with_new_option(state["config_json"])}})  # v2

    with pytest.raises(SnapshotError, match="gated_cross") as caught:
        load_bundle(reg, 2)
    assert f"snapshot 2 under {tmp_path}" in str(caught.value)
    bundle_file = serving_dir(tmp_path) / "v000000000002.safetensors"
    with pytest.raises(SnapshotError, match="gated_cross") as caught:
        learner_from_bundle(*read_bundle(serving_dir(tmp_path), 2), name=f"serving bundle {bundle_file}")
    assert str(bundle_file) in str(caught.value) and "newer reloop" in str(caught.value)
    with pytest.raises(SnapshotError, match="snapshot 2 under .*gated_cross"):
        bundle_or_snapshot_loader(reg)(2)
    assert watcher.poll_once() == 0 and holder.version == 1 and watcher.refused == 1


def test_a_snapshot_whose_learner_state_is_of_a_newer_format_is_refused_naming_it(tmp_path):
    # The learner's NewerFormat (a stage stops on it) is, for serving, a version refused like any other
    # unusable snapshot, naming the snapshot.
    from reloop.engine.checkpoint.registry import NewerFormat
    from reloop.engine.models.learner import STATE_FORMAT

    learner = _trained("dcn", embedding_dim=4, hidden_units=[16])
    reg = SnapshotRegistry(tmp_path)
    version = reg.publish({"model": {**learner.state_dict(), "format": STATE_FORMAT + 1}})
    with pytest.raises(NewerFormat) as caught:
        load_bundle(reg, version)
    assert isinstance(caught.value, SnapshotError)
    assert str(caught.value).startswith(f"snapshot {version} under {tmp_path}: learner state format ")
