from __future__ import annotations

import pytest
from reloop.engine.runtime.config import ConfigError, load_config, load_feature_spec

BASE = """
model:
  backbone: dcn
  strategy: reloop
  alpha: 0.3
  spec:
    fields:
      - {kind: categorical, name: user, buckets: 100}
train:
  batch_size: 256
period:
  every_samples: 1000
"""


def _write(tmp_path, text: str, name: str = "cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_loads_with_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), env={})
    assert cfg.train.batch_size == 256 and cfg.model.alpha == 0.3
    assert cfg.join.late_click_policy == "correct"
    assert load_feature_spec(cfg.model).field_names == ("user",)


def test_env_overrides_nested_keys_and_types(tmp_path):
    env = {"RELOOP__TRAIN__BATCH_SIZE": "512", "reloop__join__late_click_policy": "drop",
           "RELOOP__KAFKA__SECURITY_PROTOCOL": "SSL", "RELOOP__CONSUMER__GROUP_ID": "null",
           "RELOOP__KAFKA__CLIENT_CONFIG__REQUEST_TIMEOUT_MS": "5000", "OTHER": "x"}
    cfg = load_config(_write(tmp_path, BASE), env=env)
    assert cfg.train.batch_size == 512
    assert cfg.join.late_click_policy == "drop"
    assert cfg.kafka.security_protocol == "SSL" and cfg.consumer.group_id is None
    assert cfg.kafka.client_config == {"request_timeout_ms": 5000}


def test_toml_equivalent(tmp_path):
    text = """
[model]
backbone = "lr"
spec = { fields = [ { kind = "categorical", name = "user", buckets = 100 } ] }
[period]
every_wall_s = 60
"""
    cfg = load_config(_write(tmp_path, text, "cfg.toml"), env={})
    assert cfg.model.backbone == "lr" and cfg.period.every_wall_s == 60


@pytest.mark.parametrize("env,needle", [
    ({"RELOOP__TRAIN__BATCH_SIZE": "0"}, "train.batch_size"),
    ({"RELOOP__TRAIN__BACTH_SIZE": "5"}, "train.bacth_size: unknown key"),
    ({"RELOOP__JOIN__LATE_CLICK_POLICY": "weight"}, "join.late_click_policy"),
    ({"RELOOP__MODEL__ALPHA": "1.5"}, "model.alpha"),
    ({"RELOOP__PERIOD__EVERY_WALL_S": "5"}, "every_samples, every_event_ms, every_wall_s"),
    ({"RELOOP__TRAIN__BATCH_SIZE__X": "5"}, "train.batch_size: Input should be a valid integer"),
    ({"RELOOP__TRAINN__BATCH_SIZE": "5"}, "RELOOP__TRAINN__BATCH_SIZE: unknown section 'trainn'"),
    ({"RELOOP__TRAIN__": "5"}, "RELOOP__TRAIN__: an empty name between or after '__'"),  # was key "train."
    ({"RELOOP__TRAIN____BATCH_SIZE": "5"}, "RELOOP__TRAIN____BATCH_SIZE: an empty name"),
    ({"RELOOP__METRICS__PROMETHEUS_PORT": "65535"}, "set join_prometheus_port"),  # the join's is port + 1
    # JSON that does not parse: it named the section and pydantic-settings' source class, not the variable
    ({"RELOOP__TRAIN": "{batch_size: 5}"}, "environment variable RELOOP__TRAIN: not valid JSON"),
    ({"RELOOP__KAFKA__CLIENT_CONFIG": "{x", "RELOOP__KAFKA__BOOTSTRAP": "k:1"},
     "environment variable RELOOP__KAFKA__CLIENT_CONFIG: not valid JSON"),
])
def test_bad_values_name_the_key(tmp_path, env, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config(_write(tmp_path, BASE), env=env)


def test_a_bad_value_from_the_environment_names_its_variable(tmp_path):
    # It named the key alone, and the reader looked for it in a file that does not hold it.
    with pytest.raises(ConfigError) as err:
        text = BASE.replace("  batch_size: 256\n", "  batch_size: 256\n  threads: x\n")
        load_config(_write(tmp_path, text), env={"RELOOP__TRAIN__BATCH_SIZE": "0"})
    batch, threads = sorted(str(err.value).removeprefix("invalid config: ").split("; "))
    assert batch.startswith("train.batch_size:")
    assert batch.endswith("(environment variable RELOOP__TRAIN__BATCH_SIZE)")
    assert threads.startswith("train.threads:") and "environment" not in threads  # the file's own value


def test_a_bad_value_inside_a_json_variable_names_that_variable(tmp_path):
    # It named RELOOP__TRAIN__BATCH_SIZE, a variable nobody set.
    with pytest.raises(ConfigError, match=r"batch_size: .*\(environment variable RELOOP__TRAIN\)$"):
        load_config(_write(tmp_path, BASE), env={"RELOOP__TRAIN": '{"batch_size": 0}'})
    needle = r"^invalid config: period: .*\(environment variable RELOOP__PERIOD\)$"
    with pytest.raises(ConfigError, match=needle):
        load_config(_write(tmp_path, BASE), env={"reloop__period": '{"every_samples": null}'})


def test_missing_model_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(_write(tmp_path, "train: {batch_size: 4}\n"), env={})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1,\n"), env={})


def test_fingerprint_changes_with_training_settings_only(tmp_path):
    a = load_config(_write(tmp_path, BASE), env={})
    b = load_config(_write(tmp_path, BASE), env={"RELOOP__LOG__LEVEL": "DEBUG"})
    c = load_config(_write(tmp_path, BASE), env={"RELOOP__MODEL__ALPHA": "0.4"})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_shipped_example_config_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    cfg = load_config(root / "deploy/config/reloop.example.yaml", env={})
    assert len(load_feature_spec(cfg.model).fields) == 39
    assert cfg.period.every_event_ms == 3_600_000


def test_a_samples_topic_in_the_sink_section_is_refused_naming_where_it_goes(tmp_path):
    # Read by nothing since the two stages: the example config named "samples" there while the join
    # stage wrote stages.samples_topic (reloop.samples); null (disabled) stays accepted.
    with pytest.raises(ConfigError, match=r"sink\.samples_topic: .*stages\.samples_topic"):
        load_config(_write(tmp_path, BASE + "sink: {samples_topic: samples}\n"), env={})
    disabled = load_config(_write(tmp_path, BASE + "sink: {samples_topic: null}\n"), env={})
    assert disabled.sink.samples_topic is None


def test_a_seed_past_what_torch_takes_names_model_seed(tmp_path):
    # It failed later as "model: backbone 'dcn' cannot be built: Overflow when unpacking long long".
    with pytest.raises(ConfigError, match=r"model\.seed: .*less than or equal to 18446744073709551615"):
        load_config(_write(tmp_path, BASE), env={"RELOOP__MODEL__SEED": str(2**64)})
