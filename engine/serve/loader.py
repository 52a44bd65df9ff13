"""Turn a registry snapshot into a serving bundle: learner (predict-only) + its featurizer.

A trainer snapshot stores the learner's ``state_dict()`` as one part; that state carries the learner
config (backbone, feature spec, ...) as JSON, so the service rebuilds exactly what was trained without
any config of its own. Only the learner part is read (the joiner state and source positions in the
same snapshot are the trainer's business), checksummed, with ``torch.load(weights_only=True)``.

A version whose weights (parameters, buffers, the wide part) are not all finite is refused
(``NotFinite``, naming the tensor): it would score NaN. Trainers refuse to publish such a state
(engine/models/finite.py), but snapshots of older ones, or of another writer, may hold one. Checked once
per load (one ``aminmax`` pass per tensor, no copy: a few ms for an 80 MB DCN, see ``served_not_finite``);
the reload watcher then keeps the version it serves (engine/serve/reload.py). The bundle of such a version
is not followed by its training snapshot: both hold the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
import torch
from pydantic import ValidationError
from reloop.engine.checkpoint.registry import NewerFormat, SnapshotError, SnapshotRegistry
from reloop.engine.config_common import describe_errors
from reloop.engine.features.counters import CounterSettings, with_counter_fields
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.models.config import LearnerConfig
from reloop.engine.models.finite import first_not_finite, learner_not_finite
from reloop.engine.models.registry import (
    UnknownBackbone,
    config_from_dict,
    learner_from_config,
    learner_from_state,
    make_config,
    not_registered_here,
)
from reloop.engine.serve.bundle import ModelBundle
from reloop.engine.serve.config import ColdStart

log = logging.getLogger(__name__)


class SnapshotPending(SnapshotError):
    """A version whose serving bundle was refused while its training snapshot is not there yet (the
    trainer writes the bundle first): ``ready()`` says when the snapshot is, and the version is worth
    loading again (reloop.engine.serve.reload); until then it is as refused."""

    def __init__(self, message: str, ready: Callable[[], bool]) -> None:
        super().__init__(message)
        self.ready = ready


class NotFinite(SnapshotError):
    """A version whose weights are not all finite: refused, never served."""


def served_not_finite(learner: Any) -> str | None:
    """Where the weights a learner scores with first hold a value that is not finite (``'model.w' (k of
    n values NaN or inf)``), None when all are finite. A torch learner: its model's parameters and
    buffers and its wide part, read in place (for a bundle, the mapped file); the optimizer state, which
    serving never reads, is left out. Another learner: its ``state_dict()``."""
    model = getattr(learner, "model", None)
    if not isinstance(model, torch.nn.Module):
        return learner_not_finite(learner)
    wide = getattr(learner, "wide", None)
    state: dict[str, Any] = {"model": model.state_dict()}
    if wide is not None:
        state["wide"] = {"mean": wide.mean, "var": wide.var}
    return first_not_finite(state)


def _finite(bundle: ModelBundle, name: str) -> ModelBundle:
    where = served_not_finite(bundle.learner)
    if where is not None:
        raise NotFinite(
            f"{name}: its weights are not all finite ({where}), it would score NaN: not served (written by "
            "a trainer from before snapshots of a diverged model were refused?)"
        )
    return bundle


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
    state = _learner_state(registry, version)
    try:
        bundle = bundle_from_state(version, state)
    except NewerFormat as exc:
        raise NewerFormat(f"snapshot {version} under {registry.root}: {exc}") from exc
    except UnknownBackbone as exc:
        raise SnapshotError(f"snapshot {version} under {registry.root}: {not_registered_here(exc)}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        # A learner config or state this reloop does not read (a model option or a state format of a
        # newer trainer, in a serving fleet not upgraded yet): refused naming the snapshot, not a
        # bare "Extra inputs are not permitted".
        raise SnapshotError(
            f"snapshot {version} under {registry.root}: its learner does not load in this reloop "
            f"({exc!s:.300}); written by a newer reloop?"
        ) from exc
    return _finite(bundle, f"snapshot {version} under {registry.root}")


def registry_loader(registry: SnapshotRegistry) -> Callable[[int], ModelBundle]:
    return lambda version: load_bundle(registry, version)


def load_serving_bundle(registry: SnapshotRegistry, version: int) -> ModelBundle:
    """A version from its serving bundle (reloop.engine.serve.bundle_format): weights only, no optimizer."""
    from reloop.engine.serve.bundle_format import learner_from_bundle, read_bundle, serving_dir

    root = serving_dir(registry.root)
    name = f"serving bundle {root / f'v{version:012d}.safetensors'}"
    learner = learner_from_bundle(*read_bundle(root, version), name=name)
    bundle = ModelBundle(version=version, learner=learner, featurizer=Featurizer(learner.config.spec))
    return _finite(bundle, name)


def bundle_or_snapshot_loader(registry: SnapshotRegistry) -> Callable[[int], ModelBundle]:
    """Load a version from its serving bundle when there is one, else from the training snapshot; a
    bundle that fails its checksum or does not load falls back to the snapshot of the same version (not
    one whose weights are not finite: ``NotFinite``, the snapshot holds the same)."""
    from reloop.engine.serve.bundle_format import bundle_versions, serving_dir

    def load(version: int) -> ModelBundle:
        if version in bundle_versions(serving_dir(registry.root)):
            try:
                return load_serving_bundle(registry, version)
            except NotFinite:
                raise  # its training snapshot holds the same weights
            except SnapshotError as exc:
                if version not in registry.versions():
                    raise SnapshotPending(
                        f"{exc}; its training snapshot is not there (yet)",
                        ready=lambda: version in registry.versions(),
                    ) from exc
                log.error("serving bundle v%s refused (%s); loading the training snapshot", version, exc)
        return load_bundle(registry, version)

    return load


def cold_start_problem(cold: ColdStart, counters: CounterSettings | None = None) -> str | None:
    """Why ``cold`` cannot be built (its spec, backbone or params), or None: checked as serve starts, on
    the meta device (no tables allocated). Unchecked, the service started, listened, and refused its own
    version 0 at every poll: an arm that could never serve."""
    try:
        _, config = _cold_start_config(cold, counters)
        with torch.device("meta"):
            learner_from_config(config)
    except ValidationError as exc:  # the spec's (make_config words its own errors)
        return f"spec: {describe_errors(exc)}"
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        return " ".join(str(exc).split())
    return None


def cold_start_bundle(cold: ColdStart, counters: CounterSettings | None = None) -> ModelBundle:
    """Version 0: a fresh, untrained learner (the strategy does not matter for predictions). With the
    arm's ``counters``, their inputs are appended to the spec, as ``model.counters`` appends them to the
    trainer's: the same model as the trainer's initial one."""
    spec, config = _cold_start_config(cold, counters)
    learner = learner_from_config(config)
    return ModelBundle(version=0, learner=learner.clone_frozen(), featurizer=Featurizer(spec))


def _cold_start_config(
    cold: ColdStart, counters: CounterSettings | None
) -> tuple[FeatureSpec, LearnerConfig]:
    """The cold-start model's spec (the arm's counter inputs appended) and learner config."""
    if cold.spec is None:  # a ColdStart built in code, not loaded from a config document
        raise ValueError("cold_start.spec_file is read when the config is loaded: give spec")
    spec = FeatureSpec.from_dict(cold.spec)
    if counters is not None:
        spec = with_counter_fields(spec, counters)
    settings = None if counters is None else counters.settings()
    return spec, make_config(cold.backbone, spec, "ce", 0.0, cold.seed, counters=settings, **cold.params)
