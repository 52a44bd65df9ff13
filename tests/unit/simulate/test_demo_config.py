"""The demo's config plumbing (engine/runtime/demo.py): merging, per-arm plans, fail-fast validation."""

from __future__ import annotations

import re

import pytest
from reloop.engine.runtime.demo import DEFAULT_CONFIG, DemoConfig, deep_merge, plan_arms, serve_config_for
from reloop.engine.serve.config import ConfigError, read_yaml
from reloop.engine.simulate.config import simulate_config_from_dict
from reloop.engine.simulate.spec import world_spec_dict


def test_deep_merge_overrides_nested_keys_without_touching_the_base():
    base = {"model": {"backbone": "fm", "params": {"embedding_dim": 8}}, "train": {"batch_size": 64}}
    merged = deep_merge(base, {"model": {"strategy": "reloop", "params": {"embedding_dim": 4}}})
    assert merged == {
        "model": {"backbone": "fm", "strategy": "reloop", "params": {"embedding_dim": 4}},
        "train": {"batch_size": 64},
    }
    assert base["model"]["params"]["embedding_dim"] == 8


def test_shipped_demo_config_plans_valid_arms(tmp_path):
    doc = read_yaml(DEFAULT_CONFIG)
    config = DemoConfig.model_validate(doc)
    sim = simulate_config_from_dict(doc)
    plans = plan_arms(config, workdir=tmp_path, bootstrap="127.0.0.1:1", run_id="abc")
    assert [p.name for p in plans] == ["reloop", "ce", "ce_aa", "ce_memory"]
    assert len({p.impressions_topic for p in plans}) == 4 and len({p.clicks_topic for p in plans}) == 4
    strategies = {p.name: p.run_config["model"]["strategy"] for p in plans}
    assert strategies == {"reloop": "reloop", "ce": "ce", "ce_aa": "ce", "ce_memory": "ce"}
    # The A/A arms differ only in names, topics and folders.
    a, b = (p.run_config for p in plans if p.name in ("ce", "ce_aa"))
    names = ("source", "sink", "checkpoint", "stages")
    assert {k: v for k, v in a.items() if k not in names} | {"consumer": None} == {
        k: v for k, v in b.items() if k not in names
    } | {"consumer": None}
    assert {**a["consumer"], "group_id": None} == {**b["consumer"], "group_id": None}
    # The world's features and the model's spec agree; the attribution windows agree.
    assert plans[0].run_config["model"]["spec"] == world_spec_dict()
    assert plans[0].run_config["join"]["window_ms"] == sim.world_config().attribution_window_s * 1000
    # Versions every 10 s: the trainers step on what a slow arm has after 1 s (not reloop run's default).
    assert {p.run_config["train"]["max_wait_ms"] for p in plans} == {1000}
    serve = serve_config_for(config, plans, "127.0.0.1:1")
    assert serve.host == "127.0.0.1" and serve.kafka.client == "confluent"
    assert plans[0].run_config["kafka"] == {"bootstrap": "127.0.0.1:1"}  # run's default client
    assert all(arm.cold_start is not None and arm.cold_start.backbone == "fm" for arm in serve.arms)
    assert sim.report.aa == ("ce_aa", "ce")
    # The memory arm: served with ReLoop2's error memory fed from its own samples topic.
    memory = {arm.name: arm.memory for arm in serve.arms}
    assert [name for name, m in memory.items() if m is not None] == ["ce_memory"]
    plan = next(p for p in plans if p.name == "ce_memory")
    assert (
        memory["ce_memory"].samples_topic == plan.samples_topic == plan.run_config["stages"]["samples_topic"]
    )
    assert memory["ce_memory"].state_file == tmp_path / "ce_memory" / "memory.npz"


def test_an_arm_trained_with_counters_is_served_with_the_same_counters(tmp_path):
    doc = read_yaml(DEFAULT_CONFIG)
    counters = {"fields": ["user_id", "item_id"], "prior_strength": 2.0, "windows_s": [60]}
    doc["arms"][1]["train"] = {**doc["arms"][1]["train"], "model": {"strategy": "ce", "counters": counters}}
    config = DemoConfig.model_validate(doc)
    plans = plan_arms(config, workdir=tmp_path, bootstrap="127.0.0.1:1", run_id="abc")
    serve = serve_config_for(config, plans, "127.0.0.1:1")
    served = {arm.name: arm.counters for arm in serve.arms}
    assert [name for name, c in served.items() if c is not None] == ["ce"]
    c, plan = served["ce"], plans[1]
    assert (c.fields, c.prior_strength, c.windows_s) == (("user_id", "item_id"), 2.0, (60.0,))
    assert c.samples_topic == plan.samples_topic and c.state_file == tmp_path / "ce" / "counters.npz"
    # The cold-start model v0 reads the counter inputs, as the trainer's initial model does.
    from reloop.engine.runtime.config import load_config_dict, load_feature_spec
    from reloop.engine.serve.loader import cold_start_bundle

    trained = load_feature_spec(load_config_dict(plan.run_config, env={}).model)
    assert cold_start_bundle(serve.arms[1].cold_start, c).featurizer.spec == trained
    assert "user_id#ctr@60s" in [f.name for f in trained.fields]
    doc["arms"][1]["train"]["model"]["counters"] = {"fields": ["nope"]}
    with pytest.raises(ConfigError, match="arm ce: bad run config: .*model.counters: .*'nope'"):
        plan_arms(DemoConfig.model_validate(doc), workdir=tmp_path, bootstrap="b:1", run_id="x")


def test_bad_memory_key_fails_naming_the_arm(tmp_path):
    doc = read_yaml(DEFAULT_CONFIG)
    doc["arms"][3]["memory"] = {"n_bitz": 8}
    with pytest.raises(ConfigError, match="(?s)arm ce_memory: bad memory section.*n_bitz"):
        plan_arms(DemoConfig.model_validate(doc), workdir=tmp_path, bootstrap="b:1", run_id="x")


def test_bad_trainer_key_fails_before_anything_starts(tmp_path):
    doc = read_yaml(DEFAULT_CONFIG)
    doc["arms"][0]["train"] = {"train": {"batch_sizee": 3}}
    with pytest.raises(ConfigError, match="batch_sizee"):
        plan_arms(DemoConfig.model_validate(doc), workdir=tmp_path, bootstrap="b:1", run_id="x")


def test_bad_world_key_fails():
    with pytest.raises(ConfigError, match="unknown keys"):
        simulate_config_from_dict({"simulate": {"world": {"n_userz": 3}}})


@pytest.mark.parametrize(
    ("world", "needle"),
    [
        ({"n_users": 2.5}, "world.n_users must be an integer"),
        ({"n_users": "abc"}, "world.n_users must be an integer"),
        ({"seed": -1}, "world.seed must be >= 0"),
        ({"attribution_window_s": -1}, "world.attribution_window_s must be > 0"),
        ({"delay_median_s": float("inf")}, "world.delay_median_s must be a finite number"),
        ({"delay_sigma": float("nan")}, "world.delay_sigma must be a finite number"),
        ({"drift_period_s": float("nan")}, "world.drift_period_s must be a finite number"),
    ],
)
def test_world_values_that_would_fail_later_or_silently_are_refused_naming_the_key(world, needle):
    # They passed, then crashed in numpy after the wait for the service, or made every probability NaN.
    with pytest.raises(ConfigError, match=needle):
        simulate_config_from_dict({"simulate": {"world": world}})


def _demo_main(tmp_path, doc: dict) -> int:
    """``reloop demo --config <doc> --workdir tmp_path/w``'s exit code."""
    import argparse

    import yaml
    from reloop.engine.runtime import demo

    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(doc))
    parser = argparse.ArgumentParser()
    demo.configure(parser)
    return demo.main(parser.parse_args(["--config", str(path), "--workdir", str(tmp_path / "w")]))


def test_a_bad_demo_config_is_one_line_without_its_values(tmp_path, capsys):
    """pydantic's own text spanned lines and showed each bad input: a kafka section's sasl_password."""
    doc = read_yaml(DEFAULT_CONFIG)
    doc["kafka"] = {"sasl_password": "s3cr3t", "client_config": {"x": 1}}
    assert _demo_main(tmp_path, doc) == 2
    err = capsys.readouterr().err
    assert "s3cr3t" not in err and err.count("\n") == 1 and "kafka: " in err
    doc["arms"][3]["memory"] = {"n_bitz": 8}
    del doc["kafka"]
    with pytest.raises(ConfigError) as bad:
        plan_arms(DemoConfig.model_validate(doc), workdir=tmp_path, bootstrap="b:1", run_id="x")
    assert "\n" not in str(bad.value) and "memory section: n_bitz: unknown key" in str(bad.value)


def test_librdkafka_settings_the_demos_own_clients_cannot_take_fail_at_load():
    # The demo's topic, click and read-back clients are kafka-python's: it failed (exit 1) after starting.
    doc = read_yaml(DEFAULT_CONFIG)
    doc["kafka"] = {"client": "confluent", "client_config": {"client.id": "x"}}
    with pytest.raises(Exception, match="kafka.client_config holds librdkafka settings"):
        DemoConfig.model_validate(doc)
    doc["kafka"] = {"client": "confluent", "sasl_username": "u"}
    assert DemoConfig.model_validate(doc).kafka_settings() == {"sasl_plain_username": "u"}


@pytest.mark.parametrize(
    ("report", "needle"),
    [
        ({"treatment": "relooop", "control": "ce"}, r"\['relooop'\] not among the arms"),
        ({"treatment": "reloop", "control": "ce", "aa": ["ce_aa", "cee"]}, r"\['cee'\] not among"),
        ({"treatment": "reloop"}, "give treatment and control together"),
        ({"aa": ["ce_aa", "ce"]}, "give treatment and control together"),
    ],
)
def test_a_report_that_names_no_arm_is_refused_before_anything_starts(
    tmp_path, capsys, monkeypatch, report, needle
):
    """A typo in simulate.report (or half a pair) left the A/B readout out of the summary, silently."""
    import argparse

    import reloop.connectors.kafka.admin as admin
    import yaml
    from reloop.engine.runtime import demo

    def no_broker(*a, **kw):
        raise AssertionError("the demo got past its config")

    monkeypatch.setattr(admin, "create_topics", no_broker)
    doc = read_yaml(DEFAULT_CONFIG)
    doc["simulate"]["report"] = report
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(doc))
    parser = argparse.ArgumentParser()
    demo.configure(parser)
    args = parser.parse_args(
        ["--config", str(path), "--workdir", str(tmp_path / "w"), "--bootstrap", "127.0.0.1:1"]
    )
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert re.search(needle, err) and err.count("\n") == 1
    with pytest.raises(ConfigError, match=needle):
        simulate_config_from_dict(doc)


def test_the_shipped_report_names_its_arms():
    report = simulate_config_from_dict(read_yaml(DEFAULT_CONFIG)).report
    assert (report.treatment, report.control, report.aa) == ("reloop", "ce", ("ce_aa", "ce"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["arms"].append(dict(d["arms"][0])),
            "arm names must differ; given more than once: reloop",
        ),
        (
            lambda d: d["run"]["model"].update(backbone="nosuch"),
            "bad run config: invalid config: model.backbone",
        ),
        (
            lambda d: d["run"]["model"].setdefault("params", {}).update(embedding_dim=-3),
            "bad run config: invalid config: model.params",
        ),
    ],
)
def test_an_arm_that_cannot_train_fails_before_the_broker_starts(
    tmp_path, capsys, monkeypatch, change, message
):
    # They waited 30 s on Kafka (a broker started, trainers failed) and ended as "reloop demo failed:
    # KafkaTimeoutError(...)", exit 1.
    from reloop.engine.runtime import demo

    def no_broker(*_: object, **__: object) -> None:
        raise AssertionError("the broker was started")

    monkeypatch.setattr(demo, "start_broker", no_broker)
    doc = read_yaml(DEFAULT_CONFIG)
    change(doc)
    assert _demo_main(tmp_path, doc) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()  # nothing made for a run that never started


def test_an_environment_override_a_trainer_would_refuse_fails_before_anything_starts(
    tmp_path, capsys, monkeypatch
):
    # The check read the arms' run configs without the environment the trainers inherit: all of them
    # started, then exited 2 on the variable.
    from reloop.engine.runtime import demo

    def no_broker(*_: object, **__: object) -> None:
        raise AssertionError("the broker was started")

    monkeypatch.setattr(demo, "start_broker", no_broker)
    monkeypatch.setenv("RELOOP__TRAIN__BATCH_SISE", "512")
    assert _demo_main(tmp_path, read_yaml(DEFAULT_CONFIG)) == 2
    assert "train.batch_sise" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, key",
    [
        ("RELOOP__CHECKPOINT__DIR", "checkpoint.dir"),
        ("RELOOP__STAGES__SAMPLES_TOPIC", "stages.samples_topic"),
        ("reloop__source__clicks_topic", "source.clicks_topic"),
    ],
)
def test_an_environment_override_of_what_the_demo_sets_per_arm_fails_before_anything_starts(
    tmp_path, capsys, monkeypatch, name, key
):
    # It reached every arm's trainer over the demo's own value: two trainers on one folder (one exited 2
    # "in use by another train stage") or one samples topic, the service on a registry nobody wrote.
    from reloop.engine.runtime import demo

    def no_broker(*_: object, **__: object) -> None:
        raise AssertionError("the broker was started")

    monkeypatch.setattr(demo, "start_broker", no_broker)
    monkeypatch.setenv(name, str(tmp_path / "shared"))
    assert _demo_main(tmp_path, read_yaml(DEFAULT_CONFIG)) == 2
    err = capsys.readouterr().err
    assert f"sets {key}, which the demo sets for each arm" in err and err.count("\n") == 1, err
    assert err.startswith("reloop demo: environment variable"), err  # not "bad config demo.yaml"


def test_arms_that_would_share_a_metrics_port_are_refused(tmp_path, monkeypatch):
    # The second trainer exited at its start ("Address already in use") and the demo went on without it.
    doc = read_yaml(DEFAULT_CONFIG)
    doc["run"]["metrics"] = {"prometheus_port": 19451}
    with pytest.raises(
        ConfigError, match=r"arms reloop, ce, ce_aa, ce_memory would all serve /metrics on port 19451"
    ):
        plan_arms(DemoConfig.model_validate(doc), workdir=tmp_path, bootstrap="127.0.0.1:1", run_id="a")
    # One port each, or a free one each: planned.
    for i, arm in enumerate(doc["arms"]):
        arm.setdefault("train", {})["metrics"] = {"prometheus_port": 19451 + i}
    plan_arms(DemoConfig.model_validate(doc), workdir=tmp_path, bootstrap="127.0.0.1:1", run_id="a")
    monkeypatch.setenv("RELOOP__METRICS__PROMETHEUS_PORT", "19460")  # over every arm's again
    with pytest.raises(ConfigError, match="on port 19460"):
        plan_arms(DemoConfig.model_validate(doc), workdir=tmp_path, bootstrap="127.0.0.1:1", run_id="a")
    monkeypatch.setenv("RELOOP__METRICS__PROMETHEUS_PORT", "0")
    plan_arms(DemoConfig.model_validate(doc), workdir=tmp_path, bootstrap="127.0.0.1:1", run_id="a")


def test_the_serve_sections_port_is_the_demo_services_port(tmp_path):
    # It was replaced by a free port without a word.
    doc = read_yaml(DEFAULT_CONFIG)
    config = DemoConfig.model_validate(doc)
    plans = plan_arms(config, workdir=tmp_path, bootstrap="127.0.0.1:1", run_id="a")
    assert serve_config_for(config, plans, "127.0.0.1:1").port == 0  # none given: a free one
    doc["serve"]["port"] = 19450
    config = DemoConfig.model_validate(doc)
    assert serve_config_for(config, plans, "127.0.0.1:1").port == 19450
