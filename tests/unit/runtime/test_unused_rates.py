"""A rate ``model.optimizer`` pins that no step uses is warned about, naming the key: the demo's config
pinned lr 0.02 for batches of 64, which always learn at the small-step rates (its dense part at 3e-4)."""

from __future__ import annotations

import pytest
from reloop.engine.runtime.build import unused_rates
from reloop.engine.runtime.config import load_config_dict

MODEL = {"backbone": "dcn", "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}


def _cfg(optimizer: dict, batch_size: int):
    return load_config_dict({"model": {**MODEL, "optimizer": optimizer}, "train": {"batch_size": batch_size}})


@pytest.mark.parametrize(
    ("optimizer", "batch_size", "unused"),
    [
        ({"lr": 0.02}, 64, ["lr"]),
        ({"lr": 0.02, "embedding_lr": 0.05}, 64, ["lr", "embedding_lr"]),
        ({"lr": 0.02}, 512, []),  # batch-sized steps learn at lr
        ({"lr": 0.02, "small_step_lr": 0.01}, 64, []),  # small steps pinned too
        ({"lr": 0.02}, 8, ["lr"]),
        ({"lr": 0.02, "small_steps_below": 0}, 64, []),  # no small-step rates at all
        ({"embedding_lr": 0.05, "embedding_optimizer": "adam"}, 64, []),  # SparseAdam's small steps take it
        ({}, 64, []),
    ],
)
def test_pinned_rates_that_no_step_uses_are_named(optimizer, batch_size, unused) -> None:
    assert unused_rates(_cfg(optimizer, batch_size)) == unused


def test_build_trainer_warns_naming_the_key(caplog) -> None:
    from reloop.engine.runtime.build import build_trainer

    with caplog.at_level("WARNING", logger="reloop.run"):
        build_trainer(_cfg({"lr": 0.02}, 64))
    (record,) = [r for r in caplog.records if r.name == "reloop.run"]
    assert record.fields == {"key": "model.optimizer.lr"} and "small_step_lr" in record.getMessage()


def test_a_stage_rebuilt_from_its_config_warns_once(caplog) -> None:
    # The supervisor rebuilds a stage at every retry (each rank waiting for the samples topic): the warning
    # came again at each, 8 copies in 18 s. Another config says it again.
    from reloop.engine.runtime.build import build_trainer

    cfg = _cfg({"lr": 0.02}, 64)
    with caplog.at_level("WARNING", logger="reloop.run"):
        for _ in range(3):
            build_trainer(cfg)
        build_trainer(_cfg({"lr": 0.02}, 64))
    assert len([r for r in caplog.records if r.name == "reloop.run"]) == 2


def test_the_shipped_configs_pin_no_rate_they_do_not_use() -> None:
    from pathlib import Path

    import yaml
    from reloop.engine.runtime.config import load_config

    root = Path(__file__).resolve().parents[3]
    demo = yaml.safe_load((root / "deploy/config/demo.yaml").read_text())
    assert unused_rates(load_config_dict(demo["run"], env={})) == []
    assert unused_rates(load_config(root / "deploy/config/reloop.example.yaml", env={})) == []
