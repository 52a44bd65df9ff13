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
