"""Turn a registry snapshot into a serving bundle: learner (predict-only) + its featurizer.

A trainer snapshot stores the learner's ``state_dict()`` as one part; that state carries the learner
config (backbone, feature spec, ...) as JSON, so the service rebuilds exactly what was trained without
any config of its own. Only the learner part is read (the joiner state and source positions in the
same snapshot are the trainer's business), checksummed, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from engine.checkpoint.registry import SnapshotError, SnapshotRegistry
from engine.features.featurizer import Featurizer
from engine.features.spec import FeatureSpec
from engine.models.registry import build_learner, config_from_dict, learner_from_state
from engine.serve.bundle import ModelBundle
from engine.serve.config import ColdStart

# Part names a trainer may use for the learner state, most likely first.
LEARNER_PARTS = ("learner", "model")


def _learner_state(registry: SnapshotRegistry, version: int) -> dict[str, Any]:
    parts = registry.manifest(version)["parts"]
    for name in LEARNER_PARTS:
        if name in parts:
            state = registry.load(version, parts=[name]).state[name]
            if isinstance(state, dict) and "config_json" in state:
                return state
    # Unknown layout: read every part and take the one that looks like a learner state.
    for state in registry.load(version).state.values():
        if isinstance(state, dict) and "config_json" in state:
            return state
    raise SnapshotError(f"snapshot {version} under {registry.root} holds no learner state")


def bundle_from_state(version: int, state: dict[str, Any]) -> ModelBundle:
    learner = learner_from_state(state)
    spec = config_from_dict(orjson.loads(state["config_json"])).spec
    return ModelBundle(version=version, learner=learner.clone_frozen(), featurizer=Featurizer(spec))


def load_bundle(registry: SnapshotRegistry, version: int) -> ModelBundle:
    return bundle_from_state(version, _learner_state(registry, version))


def registry_loader(registry: SnapshotRegistry) -> Callable[[int], ModelBundle]:
    return lambda version: load_bundle(registry, version)


def cold_start_bundle(cold: ColdStart) -> ModelBundle:
    """Version 0: a fresh, untrained learner (the strategy does not matter for predictions)."""
    spec = FeatureSpec.from_dict(cold.spec)
    learner = build_learner(cold.backbone, spec, "ce", 0.0, seed=cold.seed, **cold.params)
    return ModelBundle(version=0, learner=learner.clone_frozen(), featurizer=Featurizer(spec))
