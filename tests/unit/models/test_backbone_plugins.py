"""A backbone of one's own, installed as a package with a ``reloop.backbones`` entry point: the example
of docs/models.md ("Your own backbone"), run as written, in fresh processes (as every reloop process
finds it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
