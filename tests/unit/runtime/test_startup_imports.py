"""A train stage's start-up loads the backbone it runs and no other: a torch backbone without river, whose
import costs a stage about a second more before its first step."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
from reloop.engine.runtime.build import build_trainer
from reloop.engine.runtime.config import load_config_dict

model = {"backbone": sys.argv[1], "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}
build_trainer(load_config_dict({"model": model}))
print("river" in sys.modules)
"""


def _river_loaded(backbone: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, backbone], capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.strip().splitlines()[-1] == "True"


def test_a_torch_backbone_does_not_load_river() -> None:
    # (That a river backbone still loads its module is what the registry's tests of river_* check.)
    assert not _river_loaded("dcn")


_STEP = """
import sys
import numpy as np
from reloop.engine.runtime.cli import keep_triton_out
keep_triton_out()
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.runtime.build import build_trainer
from reloop.engine.runtime.config import load_config_dict

model = {"backbone": "dcn", "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}
trainer = build_trainer(load_config_dict({"model": model}, env={}))
batch = Featurizer(trainer.featurizer.spec).transform([{"u": str(i)} for i in range(8)])
trainer.learner.learn(batch, np.arange(8) % 2)
print(sys.modules.get("triton") is not None)
"""


def test_a_reloop_process_leaves_triton_out_of_torch_unless_told(monkeypatch) -> None:
    # torch's first optimizer step imports triton (through torch._dynamo) when installed, and triton's
    # bindings printed ~80 "nanobind: leaked" lines when a train stage exited.
    def triton_loaded(allow: str | None) -> bool:
        env = {k: v for k, v in __import__("os").environ.items() if k != "RELOOP_ALLOW_TRITON"}
        if allow is not None:
            env["RELOOP_ALLOW_TRITON"] = allow
        out = subprocess.run(
            [sys.executable, "-c", _STEP], capture_output=True, text=True, timeout=120, check=True, env=env
        )
        assert "nanobind" not in out.stderr or allow == "1"
        return out.stdout.strip().splitlines()[-1] == "True"

    assert not triton_loaded(None)
    try:
        import triton  # noqa: F401
    except ImportError:
        return  # torch's CPU wheel: nothing to leave out
    assert triton_loaded("1")  # the step really imports it: the check above could fail
