"""A model section no learner can be built from fails at start with exit 2, naming the key, instead of
inside the supervised stage, which retried it as a failure until recovery.give_up_after_s."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml
from reloop.engine.runtime.build import check_model
from reloop.engine.runtime.config import ConfigError, load_config_dict

_SPEC = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}


def _cfg(**model: object):
    return load_config_dict({"model": {"backbone": "dcn", "spec": _SPEC, **model}}, env={})


def test_a_buildable_model_passes() -> None:
    check_model(_cfg(params={"embedding_dim": 4, "hidden_units": [8]}, optimizer={"wide": "bayes"}))
    check_model(load_config_dict({"model": {"backbone": "afn", "spec": _SPEC}}, env={}))


@pytest.mark.parametrize(
    ("model", "key", "needle"),
    [
        ({"params": {"embeding_dim": 8}}, "model.params", "embeding_dim"),
        ({"params": {"hidden_units": "wide"}}, "model.params", "hidden_units"),
        ({"backbone": "nope"}, "model.backbone", "nope"),
        ({"optimizer": {"lrr": 0.1}}, "model.optimizer", "lrr"),
        ({"optimizer": {"lr": -1}}, "model.optimizer", "lr"),
        ({"optimizer": {"wide": "bayesian"}}, "model.optimizer", "wide"),
    ],
)
def test_a_bad_model_section_names_its_key(model: dict, key: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=key) as err:
        check_model(_cfg(**model))
    assert needle in str(err.value)


def test_tables_larger_than_the_machine_fail_naming_the_buckets() -> None:
    # The allocation failed inside the stage ("DefaultCPUAllocator: can't allocate memory"), retried
    # by the supervisor for recovery.give_up_after_s as if the broker were down.
    huge = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10**12}]}
    with pytest.raises(ConfigError, match=r"model: backbone 'dcn' needs [\d,.]+ GiB .* lower the buckets"):
        check_model(load_config_dict({"model": {"backbone": "dcn", "spec": huge}}, env={}))
    check_model(
        load_config_dict(
            {"model": {"backbone": "dcn", "spec": {"fields": [{**huge["fields"][0], "buckets": 10**5}]}}},
            env={},
        )
    )


def test_a_join_stage_does_not_judge_the_tables_by_its_own_machine() -> None:
    # A joiner may run on a smaller machine than the trainer: the fit is the train stage's to check.
    huge = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10**12}]}
    check_model(load_config_dict({"model": {"backbone": "dcn", "spec": huge}}, env={}), trains_here=False)


@pytest.mark.parametrize("backbone", ["ftrl", "river_lr", "river_fm_np"])
def test_optimizer_settings_for_a_backbone_without_one_fail_naming_its_own(backbone) -> None:
    # They were ignored without a word: a run config's learning rate that changed nothing.
    check_model(_cfg(backbone=backbone))
    with pytest.raises(ConfigError, match="model.optimizer") as err:
        check_model(_cfg(backbone=backbone, optimizer={"lr": 0.1}))
    assert "model.params" in str(err.value) and backbone in str(err.value)


def test_a_missing_or_unparsable_spec_file_names_the_key_and_the_path(tmp_path) -> None:
    missing = tmp_path / "nope.yaml"
    cfg = load_config_dict({"model": {"backbone": "lr", "spec_file": str(missing)}}, env={})
    with pytest.raises(ConfigError, match="model.spec_file") as err:
        check_model(cfg)
    assert str(missing) in str(err.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cfg = load_config_dict({"model": {"backbone": "lr", "spec_file": str(bad)}}, env={})
    with pytest.raises(ConfigError, match="model.spec_file"):
        check_model(cfg)
    # A YAML spec as the run config is read: one line, a key given twice refused, no fields named.
    for text, why in (
        ("fields: [\n  {kind: categorical", "does not parse"),
        ("fields: []\nfields: []\n", "found key 'fields' twice"),
        ("", "holds NoneType, not a mapping"),
        ("- a\n- b\n", "holds list, not a mapping"),
    ):
        spec = tmp_path / "spec.yaml"
        spec.write_text(text)
        cfg = load_config_dict({"model": {"backbone": "lr", "spec_file": str(spec)}}, env={})
        with pytest.raises(ConfigError, match=f"model.spec_file: {spec}.*{why}") as err:
            check_model(cfg)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["train", "run", "join"])
def test_the_commands_exit_2_at_once_naming_the_key(tmp_path, command: str) -> None:
    # No broker is running for this test: the check must come before any connection is tried.
    model = {"backbone": "dcn", "spec": _SPEC, "params": {"embeding_dim": 8}}
    if command == "join":  # the join stage reads the spec only
        model = {"backbone": "dcn", "spec_file": str(tmp_path / "missing.yaml")}
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": model,
                "kafka": {"bootstrap": "127.0.0.1:1"},
                "checkpoint": {"dir": str(tmp_path / "ckpt")},
            }
        )
    )
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    key = "model.spec_file" if command == "join" else "model.params"
    assert key in out.stderr
    assert time.monotonic() - start < 25  # `run` took 33 s: its join sat in a 30 s bootstrap after SIGTERM


def test_the_trainers_model_records_its_click_counters() -> None:
    # serve checks its arm's prior strength against this record (the inputs' names omit it)
    from reloop.engine.features.counters import CounterSettings
    from reloop.engine.runtime.build import build_trainer

    spec = {"fields": [{"kind": "categorical", "name": "user_id", "buckets": 64}]}
    counters = {"fields": ["user_id"], "prior_strength": 3.0, "windows_s": [60.0]}
    model = {"backbone": "lr", "strategy": "ce", "alpha": 0.0, "spec": spec}
    with_counters = build_trainer(load_config_dict({"model": {**model, "counters": counters}}))
    assert with_counters.learner.config.counters == CounterSettings(**counters)
    assert build_trainer(load_config_dict({"model": model})).learner.config.counters is None


def test_a_bad_backbone_setting_from_the_environment_names_the_variable(monkeypatch) -> None:
    # "A bad value set by a variable names the variable too" held for every section but the backbone's
    # params, checked by its registry after loading: the error sent the reader to a file without it.
    env = {"RELOOP__MODEL__PARAMS__EMBEDDING_DIM": "abc"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = load_config_dict({"model": {"backbone": "dcn", "spec": _SPEC}}, env=env)
    with pytest.raises(ConfigError, match=r"embedding_dim: .* \(environment variable "
                                          r"RELOOP__MODEL__PARAMS__EMBEDDING_DIM\)$"):  # fmt: skip
        check_model(cfg)
    monkeypatch.delenv("RELOOP__MODEL__PARAMS__EMBEDDING_DIM")
    with pytest.raises(ConfigError) as from_file:  # the same value from the file names no variable
        check_model(_cfg(params={"embedding_dim": "abc"}))
    assert "environment variable" not in str(from_file.value)
