"""Backbones by name, each with a typed config, and the one way to build a learner.

>>> from reloop.engine.features.spec import CategoricalField, FeatureSpec
>>> spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=9), CategoricalField(name="i", buckets=9)))
>>> learner = build_learner("dcn", spec, strategy="reloop", alpha=0.2, seed=1, hidden_units=(32, 32))
>>> learner.config.model.cross_layers, learner.config.model.hidden_units
(3, (32, 32))
>>> build_learner("dcn", spec, strategy="ce", alpha=0.0, seed=1, cross_layer=2)
Traceback (most recent call last):
...
ValueError: backbone 'dcn': bad config: cross_layer: Extra inputs are not permitted

Other modules add backbones with ``register_backbone`` (river backbones live in
``engine/models/river_*.py``, imported on first use of the registry).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from reloop.engine.config_common import ConfigError
from reloop.engine.features.counters import CounterSettings
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.loss.losses import STRATEGIES, VARIANTS
from reloop.engine.models import backbones as bb
from reloop.engine.models.config import BackboneConfig, LearnerConfig, OptimizerConfig
from reloop.engine.models.ftrl import FTRLConfig, FTRLLearner
from reloop.engine.models.learner import Learner, TorchLearner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    config_cls: type[BackboneConfig]
    make: Callable[[LearnerConfig], Learner]
    description: str
    kind: str = "torch"


_REGISTRY: dict[str, BackboneEntry] = {}
_plugins_loaded = False
# While an entry point loads: its name and value (``dot = dotplug:register``), which its backbones
# record as their origin. Names two plugins register are used by neither (``_CONFLICTS``): which one
# won would depend on the order entry points are found, and the other's snapshots would be served by
# a model that is not theirs. Plugins that did not load are named when a backbone is not found.
_loading_plugin: str | None = None
_ORIGIN: dict[str, str] = {}
_CONFLICTS: dict[str, list[str]] = {}
_FAILED_PLUGINS: dict[str, str] = {}
# reloop's own backbones (registered by this module and engine/models/river_learners.py): never replaced.
BUILT_IN: set[str] = set()
_built_ins_registered = False  # this module's own registrations done


class UnknownBackbone(ValueError):
    """A backbone name nothing registered here (a plugin not installed, or one of a newer reloop), or
    one that more than one plugin registers (``conflict``: neither is used)."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


class BackboneContractError(ConfigError):
    """A backbone whose forward breaks the output contract (``check_forward``): a configuration error
    (a stage exits 2; retrying builds the same model), not a failure a rebuild could fix."""


def register_backbone(
    name: str,
    config_cls: type[BackboneConfig],
    make: Callable[[LearnerConfig], Learner],
    description: str,
    kind: str = "torch",
    *,
    replace: bool = False,
) -> None:
    """Add a backbone; ``make`` builds a Learner from a validated LearnerConfig (seed it from config.seed).
    ``replace``: a name registered before gets this backbone (a notebook cell defining it run again; not
    for plugins, whose clashes are refused)."""
    if name in _CONFLICTS and _loading_plugin is not None:
        _CONFLICTS[name].append(_loading_plugin)
        raise ValueError(f"backbone {name!r} is registered by more than one plugin")
    if _built_ins_registered and _loading_plugin is None and not _plugins_loaded:
        # Registered by a user's own code: the river backbones (built in, imported on first use) and the
        # plugins first, so that a name of theirs is refused here; registered before them, it took the
        # river module's place and every later lookup raised "already registered".
        _load_plugins()
    if replace and _loading_plugin is None and name in _REGISTRY:
        if name in BUILT_IN:
            raise ValueError(f"backbone {name!r} is built in: give yours another name")
        del _REGISTRY[name]
    if name in _REGISTRY and _REGISTRY[name].make is not make:
        first = _ORIGIN.get(name)
        if first is not None and _loading_plugin is not None and first != _loading_plugin:
            del _REGISTRY[name]
            _CONFLICTS[name] = [first, _loading_plugin]
            log.warning(
                "backbone %r is registered by two plugins (%s; %s): neither is used",
                name,
                first,
                _loading_plugin,
            )
            raise ValueError(f"backbone {name!r} is registered by more than one plugin")
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = BackboneEntry(name, config_cls, make, description, kind)
    if _loading_plugin is not None:
        _ORIGIN[name] = _loading_plugin


def torch_backbone(model_cls: type[bb.CTRModel]) -> Callable[[LearnerConfig], Learner]:
    """The ``make`` of a torch backbone: ``model_cls(spec, model_config, sparse_embeddings)`` in a
    TorchLearner (its optimizers, losses, snapshots), seeded from the config."""

    def make(config: LearnerConfig) -> Learner:
        import torch

        # The model is initialised from the config's seed without touching the process-wide RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = model_cls(config.spec, config.model, config.optimizer.sparse_embeddings)
            check_forward(model, config)
        return TorchLearner(model=model, config=config)

    return make


def check_forward(model: bb.CTRModel, config: LearnerConfig) -> None:
    """Refuse a model whose forward breaks the contract (``{"logit": [B], "hidden": [B, H], ...}``) on
    two rows of missing values, when it is built: a plugin's [B, 1] logit otherwise failed later, and
    differently in each command (a traceback in a backtest, restarts until the give-up in ``reloop
    run``, a 500 for every request in serving). Skipped for a model built on the meta device (serving
    builds its shells there: what it loads was trained, so checked)."""
    import torch
    from reloop.engine.features.featurizer import Featurizer

    devices = {p.device for p in model.parameters()}
    if any(d.type == "meta" for d in devices):
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(Featurizer(config.spec).transform([{}, {}]).to_torch(next(iter(devices), None)))
    finally:
        model.train(was_training)
    shapes = (
        {k: tuple(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}
        if isinstance(out, dict)
        else {}
    )
    logit, hidden = shapes.get("logit"), shapes.get("hidden")
    if logit != (2,) or hidden is None or len(hidden) != 2 or hidden[0] != 2:
        got = shapes or type(out).__name__
        raise BackboneContractError(
            f"backbone {config.backbone!r}: its forward must return {{'logit': [B], 'hidden': [B, H], "
            f"'embeddings': [...]}}; for a batch of 2 it returned {got}"
        )


for _name, _cfg, _cls, _desc in (
    ("lr", bb.LinearConfig, bb.LR, "logistic regression (first-order weights)"),
    ("fm", bb.FMConfig, bb.FM, "factorization machine"),
    ("nfm", bb.DeepConfig, bb.NFM, "neural FM: bi-interaction pooling into an MLP"),
    ("pnn", bb.DeepConfig, bb.PNN, "product-based NN (inner products, IPNN)"),
    ("wide_deep", bb.DeepConfig, bb.WideDeep, "Wide & Deep"),
    ("deepfm", bb.DeepConfig, bb.DeepFM, "DeepFM: FM + MLP"),
    ("dcn", bb.DCNConfig, bb.DCN, "Deep & Cross network"),
    ("dcnv2", bb.DCNv2Config, bb.DCNv2, "DCN-V2 (matrix cross layers)"),
    ("xdeepfm", bb.XDeepFMConfig, bb.XDeepFM, "xDeepFM: linear + CIN + MLP"),
    ("fmfm", bb.FMConfig, bb.FmFM, "field-matrixed FM"),
    ("afn", bb.AFNConfig, bb.AFN, "adaptive factorization network (AFN+ with ensemble_dnn)"),
):
    register_backbone(_name, _cfg, torch_backbone(_cls), _desc)
register_backbone(
    "ftrl",
    FTRLConfig,
    lambda config: FTRLLearner(config=config),
    "FTRL-Proximal logistic regression",
    "numpy",
)
BUILT_IN.update(_REGISTRY)
_built_ins_registered = True


PLUGIN_GROUP = "reloop.backbones"  # entry points of installed packages that register backbones


def _load_plugins() -> None:
    """Import engine/models/river_*.py once so their register_backbone calls run, then load the
    ``reloop.backbones`` entry points of installed packages: each names a module whose import registers
    its backbones, or a function that does when called (docs/models.md, "Your own backbone"). Every
    process that builds or loads a learner (the trainer, serving, a backtest) finds them the same way."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import reloop.engine.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("river_"):
            try:
                importlib.import_module(f"reloop.engine.models.{info.name}")
            except ImportError as exc:
                log.warning("backbone module reloop.engine.models.%s not loaded: %s", info.name, exc)
    global _loading_plugin
    for point in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        _loading_plugin = f"{point.name} = {point.value}"
        try:
            loaded = point.load()
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not take the built-in backbones
            _FAILED_PLUGINS[_loading_plugin] = f"{exc!r:.200}"
            log.warning("backbone plugin %s not loaded: %r", _loading_plugin, exc)
        finally:
            _loading_plugin = None


def available_backbones() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def backbone_entry(name: str) -> BackboneEntry:
    if name not in _REGISTRY:  # the river_* modules import river (~2 s of start-up): only when asked for
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownBackbone(_not_found(name), conflict=name in _CONFLICTS) from None


def not_registered_here(exc: UnknownBackbone) -> str:
    """What a reader of a snapshot (serving) says of one whose backbone is not registered here."""
    if exc.conflict:
        return f"its backbone is not usable in this process: {exc}"
    return (
        f"its backbone is not registered in this process ({exc}): install the package that registers "
        "it (a backbone plugin: serving needs it as the trainer does), or it was written by a newer reloop"
    )


def _not_found(name: str) -> str:
    if name in _CONFLICTS:
        return (
            f"backbone {name!r} is registered by more than one installed plugin "
            f"({'; '.join(_CONFLICTS[name])}): neither is used; uninstall all but one"
        )
    failed = "; ".join(f"{point}: {error}" for point, error in _FAILED_PLUGINS.items())
    return f"unknown backbone {name!r}; choose one of {sorted(_REGISTRY)}" + (
        f" (backbone plugins that did not load: {failed})" if failed else ""
    )


def available_strategies() -> list[str]:
    """The paper's strategies (ce, kd, reloop), then the ReLoop variants."""
    return [*STRATEGIES, *VARIANTS]


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def model_config_of(backbone: str, **model_config: Any) -> BackboneConfig:
    """``backbone``'s validated model config; an unknown backbone, key or bad value fails here, naming it."""
    entry = backbone_entry(backbone)
    try:
        return entry.config_cls(**model_config)
    except ValidationError as exc:
        raise ValueError(f"backbone {backbone!r}: bad config: {_validation_message(exc)}") from None


def make_config(
    backbone: str,
    spec: FeatureSpec,
    strategy: str,
    alpha: float,
    seed: int = 0,
    optimizer: OptimizerConfig | dict[str, Any] | None = None,
    *,
    counters: CounterSettings | None = None,
    **model_config: Any,
) -> LearnerConfig:
    """A validated LearnerConfig; a bad key or value fails here, naming it. ``counters``: the click
    counters whose inputs ``spec`` ends with (``model.counters``), recorded with the model."""
    if strategy not in available_strategies():
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {available_strategies()}")
    model = model_config_of(backbone, **model_config)
    try:
        opt = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(**(optimizer or {}))
        return LearnerConfig(
            backbone=backbone,
            strategy=strategy,
            alpha=alpha,
            seed=seed,
            spec=spec,
            model=model,
            optimizer=opt,
            counters=counters,
        )
    except ValidationError as exc:
        raise ValueError(f"learner config: {_validation_message(exc)}") from None


def build_learner(
    backbone: str,
    spec: FeatureSpec,
    strategy: str,
    alpha: float,
    seed: int = 0,
    optimizer: OptimizerConfig | dict[str, Any] | None = None,
    *,
    counters: CounterSettings | None = None,
    **model_config: Any,
) -> Learner:
    """A fresh learner: ``build_learner("dcn", spec, "reloop", 0.2, seed=1, hidden_units=(400, 400))``."""
    config = make_config(backbone, spec, strategy, alpha, seed, optimizer, counters=counters, **model_config)
    return learner_from_config(config)


def config_from_dict(data: dict[str, Any]) -> LearnerConfig:
    """Inverse of ``LearnerConfig.to_dict()``: the model section is typed by the backbone's config class."""
    try:
        entry = backbone_entry(data["backbone"])
        model = entry.config_cls.model_validate(data.get("model", {}))
        return LearnerConfig.model_validate({**data, "model": model})
    except KeyError as exc:
        raise ValueError(f"learner config: missing key {exc}") from None
    except ValidationError as exc:
        raise ValueError(f"learner config: {_validation_message(exc)}") from None


def learner_from_config(config: LearnerConfig | dict[str, Any]) -> Learner:
    if isinstance(config, dict):
        config = config_from_dict(config)
    return backbone_entry(config.backbone).make(config)


def learner_from_state(state: dict[str, Any]) -> Learner:
    """Rebuild a learner from ``Learner.state_dict()`` alone (what a snapshot restore needs)."""
    import orjson

    if "config_json" not in state:
        raise ValueError(
            "not a learner's state (no config_json): learner_from_state takes what Learner.state_dict() "
            "returns, not a torch module's state_dict (learner.model.state_dict())"
        )
    learner = learner_from_config(config_from_dict(orjson.loads(state["config_json"])))
    learner.load_state_dict(state)
    return learner
