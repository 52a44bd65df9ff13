from __future__ import annotations

import numpy as np
import pytest
from reloop.engine.checkpoint.registry import ChecksumError, SnapshotRegistry
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.registry import build_learner
from reloop.engine.serve.config import ColdStart
from reloop.engine.serve.loader import cold_start_bundle, load_bundle
from reloop.engine.simulate.spec import world_spec_dict
from reloop.engine.simulate.world import World, WorldConfig


def _rows(n: int = 40):
    world = World(WorldConfig(seed=0))
    req = world.sample_request(0.0)
    ctx = world.context_features(req)
    return [{**ctx, **world.item_features(i)} for i in req.candidates[:n].tolist()], world


def _trained(seed: int = 0):
    spec = FeatureSpec.from_dict(world_spec_dict(id_buckets=256))
    learner = build_learner("fm", spec, "ce", 0.0, seed=seed, embedding_dim=4)
    rows, _ = _rows()
    batch = Featurizer(spec).transform(rows)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        learner.learn(batch, (rng.random(len(rows)) < 0.3).astype(np.float32))
    return learner, spec


def test_bundle_predicts_what_the_trained_learner_predicts(tmp_path):
    learner, spec = _trained()
    reg = SnapshotRegistry(tmp_path)
    version = reg.publish({"learner": learner.state_dict(), "joiner": {"pending": []}}, meta={"period": 1})
    bundle = load_bundle(reg, version)
    rows, _ = _rows()
    expected = learner.predict_proba(Featurizer(spec).transform(rows))
    np.testing.assert_allclose(bundle.score(rows), expected, rtol=1e-6)
    assert bundle.version == version


def test_corrupt_snapshot_is_refused(tmp_path):
    learner, _ = _trained()
    reg = SnapshotRegistry(tmp_path)
    version = reg.publish({"learner": learner.state_dict()})
    part = reg.path(version) / "learner.pt"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        load_bundle(reg, version)


def test_cold_start_is_version_zero_and_deterministic():
    cold = ColdStart(backbone="fm", spec=world_spec_dict(id_buckets=256), seed=3, params={"embedding_dim": 4})
    a, b = cold_start_bundle(cold), cold_start_bundle(cold)
    rows, _ = _rows()
    assert a.version == 0
    np.testing.assert_array_equal(a.score(rows), b.score(rows))
    assert ((a.score(rows) > 0) & (a.score(rows) < 1)).all()


@pytest.mark.parametrize("damage", ["flip-byte", "no-manifest", "resealed-pickle"])
def test_a_fresh_service_falls_back_to_the_newest_snapshot_that_loads(tmp_path, damage):
    import io
    import os

    import torch
    from reloop.engine.metrics.stats import STATS
    from reloop.engine.serve.bundle import ModelHolder
    from reloop.engine.serve.config import ArmConfig
    from reloop.engine.serve.reload import ArmSource, ReloadWatcher
    from reloop.engine.serve.stack import registry_loader_factory

    from ..checkpoint.test_registry import reseal

    learner, _ = _trained()
    reg = SnapshotRegistry(tmp_path)
    for _ in range(3):
        reg.publish({"model": learner.state_dict()})
    newest = reg.path(3)
    if damage == "flip-byte":
        part = newest / "model.pt"
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (newest / "manifest.json").unlink()
    else:

        class Evil:
            def __reduce__(self):
                return (os.system, ("true",))

        buf = io.BytesIO()
        torch.save({"config_json": "{}", "x": Evil()}, buf)
        reseal(reg, 3, "model", buf.getvalue())
    latest, load, versions = registry_loader_factory(ArmConfig(name="fb", registry=tmp_path))
    holder = ModelHolder()
    watcher = ReloadWatcher(sources=[ArmSource("fb", holder, latest, load, versions)])
    watcher.poll_once()
    assert holder.version == 2 and watcher.refused == 1  # ready, on the newest version that loads
    assert STATS.serve_fallback.get("fb") == 1.0
    watcher.poll_once()
    assert watcher.refused == 1  # the refused version is not retried
    reg.publish({"model": learner.state_dict()})
    watcher.poll_once()
    assert holder.version == 4 and STATS.serve_fallback.get("fb") == 0.0


def test_a_model_reading_counter_inputs_the_arm_does_not_fill_is_refused(tmp_path):
    """Trained with model.counters and served by an arm without them (or counting other windows), the
    model scored zeros in their place, silently: such a version is refused, the older one served."""
    from reloop.engine.features.counters import CounterSettings, with_counter_fields
    from reloop.engine.serve.bundle import ModelHolder
    from reloop.engine.serve.config import ArmConfig
    from reloop.engine.serve.reload import ArmSource, ReloadWatcher
    from reloop.engine.serve.stack import registry_loader_factory

    plain, spec = _trained()
    counted = with_counter_fields(spec, CounterSettings(fields=("user_id",), windows_s=(600.0,)))
    reg = SnapshotRegistry(tmp_path)
    reg.publish({"model": plain.state_dict()})
    reg.publish({"model": build_learner("fm", counted, "ce", 0.0, seed=0, embedding_dim=4).state_dict()})

    def served(**arm) -> tuple[int | None, int]:
        latest, load, versions = registry_loader_factory(ArmConfig(name="c", registry=tmp_path, **arm))
        holder = ModelHolder()
        watcher = ReloadWatcher(sources=[ArmSource("c", holder, latest, load, versions)])
        watcher.poll_once()
        return holder.version, watcher.refused

    assert served() == (1, 1)  # no counters: v2 refused, v1 (no counter inputs) served
    lifetime = {"fields": ["user_id"], "samples_topic": "s", "shown_from": "requests"}
    assert served(counters=lifetime) == (1, 1)  # the @600s inputs unfilled
    assert served(counters={**lifetime, "windows_s": [600.0]}) == (2, 0)


def test_a_model_learnt_with_another_counter_prior_is_refused_and_an_arm_may_count_more(tmp_path):
    """The prior strength is recorded with the model (the inputs' names do not carry it): an arm serving
    the rates with another one is refused; an arm counting more fields and windows than the model reads
    serves it; an older snapshot without the record is checked by the names alone."""
    from reloop.engine.features.counters import CounterSettings, with_counter_fields
    from reloop.engine.serve.bundle import ModelHolder
    from reloop.engine.serve.config import ArmConfig
    from reloop.engine.serve.reload import ArmSource, ReloadWatcher
    from reloop.engine.serve.stack import registry_loader_factory

    _, spec = _trained()
    settings = CounterSettings(fields=("user_id",), prior_strength=2.0)
    counted = with_counter_fields(spec, settings)
    learner = build_learner("fm", counted, "ce", 0.0, seed=0, embedding_dim=4, counters=settings)
    assert learner.config.counters == settings
    reg = SnapshotRegistry(tmp_path)
    reg.publish({"model": learner.state_dict()})
    unrecorded = build_learner("fm", counted, "ce", 0.0, seed=0, embedding_dim=4)  # a trainer from before
    assert "counters" not in unrecorded.config.to_dict()  # its JSON as before: an older reloop reads it

    def served(registry, **counters) -> tuple[int | None, int]:
        arm = {"fields": ["user_id"], "samples_topic": "s", "shown_from": "requests", **counters}
        latest, load, versions = registry_loader_factory(ArmConfig(name="p", registry=registry, counters=arm))
        holder = ModelHolder()
        watcher = ReloadWatcher(sources=[ArmSource("p", holder, latest, load, versions)])
        watcher.poll_once()
        return holder.version, watcher.refused

    assert served(tmp_path) == (None, 1)  # the arm's default prior, 5: refused
    assert served(tmp_path, prior_strength=2.0) == (1, 0)
    assert served(tmp_path, prior_strength=2.0, fields=["user_id", "item_id"], windows_s=[60.0]) == (1, 0)
    older = tmp_path / "older"
    SnapshotRegistry(older).publish({"model": unrecorded.state_dict()})
    assert served(older) == (1, 0)


def test_a_cold_start_model_records_its_arms_counters():
    from reloop.engine.serve.config import ArmCountersConfig

    counters = ArmCountersConfig(fields=("user_id",), prior_strength=3.0, samples_topic="s")
    cold = ColdStart(backbone="fm", spec=world_spec_dict(id_buckets=64), params={"embedding_dim": 4})
    bundle = cold_start_bundle(cold, counters)
    assert bundle.learner.config.counters == counters.settings()
    assert type(bundle.learner.config.counters).__name__ == "CounterSettings"  # not the arm's topic


def test_the_load_refusal_names_every_counter_input_the_arm_does_not_fill(tmp_path):
    """It named the first four only: the user_id's, leaving out the item_id's the arm does not fill."""
    from types import SimpleNamespace

    from reloop.engine.checkpoint.registry import SnapshotError
    from reloop.engine.features.counters import CounterSettings, with_counter_fields
    from reloop.engine.serve.config import ArmConfig
    from reloop.engine.serve.stack import filling_counter_inputs

    _, spec = _trained()

    def refusal(settings: CounterSettings) -> str:
        model = SimpleNamespace(
            featurizer=SimpleNamespace(spec=with_counter_fields(spec, settings)), learner=None
        )
        load = filling_counter_inputs(ArmConfig(name="c", registry=tmp_path), lambda version: model)
        with pytest.raises(SnapshotError) as refused:
            load(3)
        return str(refused.value)

    names = ["user_id#ctr", "user_id#seen", "user_id#ctr@600s", "user_id#seen@600s",
             "item_id#ctr", "item_id#seen", "item_id#ctr@600s", "item_id#seen@600s"]  # fmt: skip
    assert f"version 3's model reads the click-counter inputs {names}, which" in refusal(
        CounterSettings(fields=("user_id", "item_id"), windows_s=(600.0,))
    )
    # More than NAMED_INPUTS: every field, with how many of its inputs the arm does not fill.
    many = refusal(CounterSettings(fields=("user_id", "item_id"), windows_s=(60.0, 600.0, 3600.0)))
    assert "inputs of the fields user_id (8), item_id (8), 16 in all, which" in many
