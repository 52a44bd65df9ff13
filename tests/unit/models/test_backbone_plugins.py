"""A backbone of one's own, installed as a package with a ``reloop.backbones`` entry point: the example
of docs/models.md ("Your own backbone"), run as written, in fresh processes (as every reloop process
finds it)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from reloop.engine.metrics.stats import EngineStats
from reloop.engine.runtime.supervisor import RetryPolicy, Supervisor

DOC = Path(__file__).resolve().parents[3] / "docs" / "models.md"

_USE = """
import numpy as np
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.models.registry import available_backbones, build_learner, learner_from_state

assert "dot" in available_backbones() and "dcn" in available_backbones()
spec = FeatureSpec(fields=(CategoricalField(name="u", buckets=50), CategoricalField(name="i", buckets=50)))
learner = build_learner("dot", spec, strategy="reloop", alpha=0.2, seed=3, embedding_dim=4)
rng = np.random.default_rng(0)
rows = [{"u": str(u), "i": str(i)} for u, i in rng.integers(0, 50, (256, 2))]
batch = Featurizer(spec).transform(rows)
labels = (rng.random(256) < 0.3).astype(np.float32)
before = learner.predict_proba(batch)
for _ in range(20):
    learner.learn(batch, labels, y_last=np.full(256, 0.3, dtype=np.float32))
after = learner.predict_proba(batch)
assert not np.allclose(before, after)
again = learner_from_state(learner.state_dict())  # a snapshot served or resumed
assert np.array_equal(again.predict_proba(batch), after)
print("ok", type(learner).__name__)
"""


def _installed(tmp_path: Path, entry_points: str) -> dict[str, str]:
    """The docs' ``dotplug`` module and a dist-info with ``entry_points`` on a path: an installed package."""
    text = DOC.read_text()
    section = text[text.index("## Your own backbone") :]
    module = re.search(r"```python\n(.*?)```", section, re.S)
    assert module is not None
    (tmp_path / "dotplug.py").write_text(module.group(1))
    info = tmp_path / "dotplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dotplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def test_the_docs_example_trains_resumes_and_is_listed(tmp_path: Path) -> None:
    toml = re.search(r'```toml\n\[project.entry-points."reloop.backbones"\]\n(.*?)```', DOC.read_text(), re.S)
    assert toml is not None  # the docs' entry point, as setuptools writes it into entry_points.txt
    env = _installed(tmp_path, "[reloop.backbones]\n" + toml.group(1).replace('"', ""))
    used = subprocess.run([sys.executable, "-c", _USE], env=env, capture_output=True, text=True, timeout=120)
    assert used.returncode == 0 and "ok TorchLearner" in used.stdout, used.stderr[-3000:]
    listed = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "models"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0 and "pairwise dot products (dotplug)" in listed.stdout, listed.stderr


def test_a_plugin_that_fails_to_load_is_named_and_the_others_stay(tmp_path: Path) -> None:
    env = _installed(tmp_path, "[reloop.backbones]\nbroken = no_such_module\ndot = dotplug:register\n")
    used = subprocess.run([sys.executable, "-c", _USE], env=env, capture_output=True, text=True, timeout=120)
    assert used.returncode == 0, used.stderr[-3000:]
    assert "backbone plugin broken = no_such_module not loaded" in used.stderr


# --- in one process: entry points stubbed, the registry restored after each test ----------------------


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as before any plugin loaded (built-ins and river kept), plugins found anew."""
    from reloop.engine.models import registry

    registry.available_backbones()  # the river modules registered, as any process has them
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for name in ("_ORIGIN", "_CONFLICTS", "_FAILED_PLUGINS"):
        monkeypatch.setattr(registry, name, {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    return registry


def _plugins(monkeypatch, registry, modules: dict[str, Callable[[], None]]) -> None:
    """Entry points ``name = module:register``, one per module, in the order given."""
    points = []
    for name, register in modules.items():
        module = types.ModuleType(name)
        module.register = register
        monkeypatch.setitem(sys.modules, name, module)
        points.append(importlib.metadata.EntryPoint("dot", f"{name}:register", registry.PLUGIN_GROUP))
    real = importlib.metadata.entry_points

    def entry_points(**select):  # others (torch's triton backends) look up their own groups
        return points if select.get("group") == registry.PLUGIN_GROUP else real(**select)

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", entry_points)


def _dot(sign: float):
    from reloop.engine.models.blocks import FeatureEmbedding
    from reloop.engine.models.config import BackboneConfig
    from reloop.engine.models.learner import CTRModel
    from reloop.engine.models.registry import register_backbone, torch_backbone

    class Dot(CTRModel):
        def __init__(self, spec, cfg, sparse) -> None:
            super().__init__()
            self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)

        def forward(self, x):
            emb = self.embedding(x)
            pairs = 0.5 * (emb.sum(1).square() - emb.square().sum(1))
            return {"logit": sign * pairs.sum(-1), "hidden": pairs, "embeddings": [emb]}

    return lambda: register_backbone("dot", BackboneConfig, torch_backbone(Dot), f"dot {sign}")


SPEC = {
    "fields": [
        {"name": "u", "kind": "categorical", "buckets": 20},
        {"name": "i", "kind": "categorical", "buckets": 20},
    ]
}


@pytest.mark.parametrize("order", [("plug_a", "plug_b"), ("plug_b", "plug_a")])
def test_two_plugins_with_one_name_leave_it_unused_whichever_is_found_first(
    monkeypatch, fresh_registry, order
):
    # The second one found replaced nothing but was refused, the first kept: which model served a
    # snapshot of "dot" depended on the order the entry points were found.
    makers = {"plug_a": _dot(1.0), "plug_b": _dot(-1.0)}
    _plugins(monkeypatch, fresh_registry, {name: makers[name] for name in order})
    assert "dot" not in fresh_registry.available_backbones() and "dcn" in fresh_registry.available_backbones()
    with pytest.raises(fresh_registry.UnknownBackbone) as refused:
        fresh_registry.backbone_entry("dot")
    message = str(refused.value)
    assert "more than one installed plugin" in message
    assert "dot = plug_a:register" in message and "dot = plug_b:register" in message


def test_a_backbone_not_found_names_the_plugins_that_did_not_load(monkeypatch, fresh_registry):
    def boom() -> None:
        raise RuntimeError("needs CUDA 13")

    _plugins(monkeypatch, fresh_registry, {"plug_boom": boom})
    with pytest.raises(
        fresh_registry.UnknownBackbone,
        match=r"unknown backbone 'dot'.*did not load: dot = plug_boom:register: "
        r"RuntimeError\('needs CUDA 13'\)",
    ):
        fresh_registry.backbone_entry("dot")


@pytest.mark.parametrize("logit", ["[B, 1]", "[B, 2]", "none"])
def test_a_forward_that_breaks_the_contract_is_refused_when_the_learner_is_built(fresh_registry, logit):
    import torch
    from reloop.engine.features.spec import FeatureSpec
    from reloop.engine.models.blocks import FeatureEmbedding
    from reloop.engine.models.config import BackboneConfig
    from reloop.engine.models.learner import CTRModel

    class Wrong(CTRModel):
        def __init__(self, spec, cfg, sparse) -> None:
            super().__init__()
            self.embedding = FeatureEmbedding(spec, cfg.embedding_dim, sparse)

        def forward(self, x):
            emb = self.embedding(x)
            hidden = emb.flatten(1)
            out = {"hidden": hidden, "embeddings": [emb]}
            if logit != "none":
                out["logit"] = hidden[:, :1] if logit == "[B, 1]" else torch.cat([hidden[:, 0], hidden[:, 1]])
            return out

    fresh_registry.register_backbone("wrong", BackboneConfig, fresh_registry.torch_backbone(Wrong), "wrong")
    with pytest.raises(
        ValueError, match=r"backbone 'wrong': its forward must return .*for a batch of 2 it returned"
    ):
        fresh_registry.build_learner("wrong", FeatureSpec.from_dict(SPEC), "reloop", 0.2)

    # A stage that builds it stops at once (exit 2), not rebuilt until recovery.give_up_after_s.
    builds = []

    def build():
        builds.append(1)
        return fresh_registry.build_learner("wrong", FeatureSpec.from_dict(SPEC), "reloop", 0.2)

    policy = RetryPolicy(backoff_initial_s=0.001)
    supervisor = Supervisor(build, stop=threading.Event(), policy=policy, stats=EngineStats())
    with pytest.raises(fresh_registry.BackboneContractError):
        supervisor.run()
    assert builds == [1] and supervisor.restarts == 0


def test_serving_a_snapshot_whose_plugin_is_not_installed_says_so(tmp_path, monkeypatch, fresh_registry):
    from reloop.engine.checkpoint.registry import SnapshotError, SnapshotRegistry
    from reloop.engine.features.spec import FeatureSpec
    from reloop.engine.serve.loader import load_bundle

    _plugins(monkeypatch, fresh_registry, {"plug_a": _dot(1.0)})
    learner = fresh_registry.build_learner("dot", FeatureSpec.from_dict(SPEC), "reloop", 0.2, embedding_dim=4)
    reg = SnapshotRegistry(tmp_path)
    version = reg.publish({"model": learner.state_dict()})
    del fresh_registry._REGISTRY["dot"]  # a serving host without the package
    with pytest.raises(SnapshotError, match="install the package that registers it") as refused:
        load_bundle(reg, version)
    assert "newer reloop?" not in str(refused.value)
    fresh_registry._CONFLICTS["dot"] = ["dot = plug_a:register", "dot = plug_b:register"]  # both installed
    with pytest.raises(SnapshotError, match="more than one installed plugin") as refused:
        load_bundle(reg, version)
    assert "install the package" not in str(refused.value)  # advice that contradicted "uninstall"


def test_reloop_run_logs_a_plugin_that_did_not_load_as_json_and_names_it_for_an_unknown_backbone(tmp_path):
    # The warning came out as plain text before the stages' JSON lines; "unknown backbone" did not say
    # that a plugin had failed to load.
    env = _installed(tmp_path, "[reloop.backbones]\nbroken = no_such_module\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        "kafka: {bootstrap: '127.0.0.1:1'}\n"
        "model: {backbone: dot2, spec: {fields: [{name: u, kind: categorical, buckets: 10}]}}\n"
        f"checkpoint: {{dir: '{tmp_path / 'ckpt'}'}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "run", "--config", str(config)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    *logged, last = done.stderr.splitlines()
    assert done.returncode == 2 and logged, done.stderr
    warning = orjson.loads(logged[-1])  # not JSON: raises
    assert warning["msg"].startswith("backbone plugin broken = no_such_module not loaded")
    assert last.startswith("reloop run: invalid config: model.backbone: unknown backbone 'dot2'")
    assert "did not load: broken = no_such_module: ModuleNotFoundError" in last


def test_a_backbone_registered_again_with_replace_takes_the_name(fresh_registry):
    # A notebook cell that defines and registers a backbone, run again, raised "already registered".
    from reloop.engine.features.spec import FeatureSpec
    from reloop.engine.models.config import BackboneConfig

    spec = FeatureSpec.from_dict(SPEC)
    first, second = _dot(1.0), _dot(-1.0)
    first()
    with pytest.raises(ValueError, match="already registered"):
        second()  # without replace: still refused
    entry = fresh_registry.backbone_entry("dot")
    fresh_registry.register_backbone("dot", BackboneConfig, entry.make, "dot again", replace=True)
    assert fresh_registry.backbone_entry("dot").description == "dot again"
    fresh_registry.build_learner("dot", spec, "ce", 0.0)
    with pytest.raises(ValueError, match="built in"):
        fresh_registry.register_backbone("dcn", BackboneConfig, entry.make, "mine", replace=True)
    assert "dcn" in fresh_registry.available_backbones()
    assert fresh_registry.backbone_entry("dcn").description != "mine"


def test_a_river_backbones_name_is_built_in_before_river_is_first_used():
    # In a fresh process the river backbones register on first use of the registry: a user's
    # register_backbone("river_lr", ...) before that took the name, and every later lookup raised
    # "backbone 'river_lr' is already registered" (river_fm and the plugins were never loaded).
    script = (
        "from reloop.engine.models.config import BackboneConfig\n"
        "from reloop.engine.models.registry import available_backbones, backbone_entry, register_backbone\n"
        "for replace in (False, True):\n"
        "    try:\n"
        "        register_backbone('river_lr', BackboneConfig, lambda c: None, 'MINE', replace=replace)\n"
        "    except ValueError as exc:\n"
        "        print('refused:', exc)\n"
        "print('river_fm' in available_backbones(), backbone_entry('river_lr').description != 'MINE')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [
        "refused: backbone 'river_lr' is already registered",
        "refused: backbone 'river_lr' is built in: give yours another name",
        "True True",
    ], out.stdout
