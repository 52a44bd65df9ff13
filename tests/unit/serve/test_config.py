from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.serve.config import ConfigError, load_serve_config, read_yaml, serve_config_from_dict
from reloop.engine.serve.loader import cold_start_problem

ROOT = Path(__file__).resolve().parents[3]


def _doc(**over):
    doc = {"arms": [{"name": "A", "registry": "/tmp/reg-a"}], "serve": {"top_k": 5}}
    doc.update(over)
    return doc


def test_defaults_bind_loopback():
    cfg = serve_config_from_dict(_doc())
    assert cfg.host == "127.0.0.1" and cfg.top_k == 5 and cfg.arms[0].impressions_topic == "impressions"


def test_bad_key_fails_naming_it():
    with pytest.raises(ConfigError, match=r"top_kk"):
        serve_config_from_dict(_doc(serve={"top_kk": 3}))
    with pytest.raises(ConfigError, match=r"arms.0.weight"):
        serve_config_from_dict(_doc(arms=[{"name": "A", "registry": "/r", "weight": -1}]))
    with pytest.raises(ConfigError, match="impressions_topic"):
        serve_config_from_dict(_doc(arms=[{"name": "A", "registry": "/r"}, {"name": "B", "registry": "/s"}]))


@pytest.mark.parametrize("section", [5, "port: 8000", [1, 2], True])
def test_a_serve_section_that_is_not_a_mapping_is_a_config_error(section):
    # dict() of it raised a TypeError / ValueError: a traceback from `reloop serve`, not exit 2.
    with pytest.raises(ConfigError, match="serve: a mapping"):
        serve_config_from_dict(_doc(serve=section), env={})


def test_env_overrides_bootstrap(monkeypatch):
    monkeypatch.setenv("RELOOP__KAFKA__BOOTSTRAP", "10.0.0.1:9093")
    cfg = serve_config_from_dict(_doc(kafka={"bootstrap": "x:1", "security_protocol": "SSL"}))
    assert cfg.kafka.bootstrap == "10.0.0.1:9093" and cfg.kafka.security_protocol == "SSL"
    assert cfg.kafka.client == "confluent"  # the service's default client


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_serve_config(tmp_path / "nope.yaml")


def test_reloop_serve_exits_2_on_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "arms" in proc.stderr


def test_kafka_python_settings_reach_the_confluent_logger_or_are_refused():
    import pytest
    from reloop.connectors.confluent.settings import to_librdkafka
    from reloop.engine.serve.config import ServeConfig
    from reloop.engine.serve.stack import confluent_logger

    assert to_librdkafka({"sasl_plain_password": "x", "ssl_check_hostname": False}) == {
        "sasl.password": "x",
        "ssl.endpoint.identification.algorithm": "none",
    }
    base = {"arms": [{"name": "A", "registry": "/nonexistent"}]}
    # kafka.client: kafka-python with kafka-python settings: translated for the confluent logger.
    kp = {"bootstrap": "127.0.0.1:1", "client": "kafka-python"}
    bad = ServeConfig.model_validate({**base, "kafka": {**kp, "client_config": {"api_version": [2]}}})
    with pytest.raises(ValueError, match="api_version"):
        confluent_logger(bad, bad.arms[0])
    ok = ServeConfig.model_validate({**base, "kafka": {**kp, "client_config": {"client_id": "s"}}})
    confluent_logger(ok, ok.arms[0]).close(timeout_s=0.1)


def test_an_empty_auth_token_is_refused_not_taken_as_no_token():
    """An empty RELOOP__SERVE__AUTH_TOKEN (an empty Secret key) turned authentication off in silence."""
    for empty in ("", "  "):
        with pytest.raises(ConfigError, match=r"serve\.auth_token: .*empty.*RELOOP__SERVE__AUTH_TOKEN"):
            serve_config_from_dict(_doc(), env={"RELOOP__SERVE__AUTH_TOKEN": empty})
    assert serve_config_from_dict(_doc(), env={"RELOOP__SERVE__AUTH_TOKEN": "null"}).auth_token is None
    token = serve_config_from_dict(_doc(), env={"RELOOP__SERVE__AUTH_TOKEN": "t0k"}).auth_token
    assert token is not None and token.get_secret_value() == "t0k"


def _cold(**cold):
    return _doc(arms=[{"name": "A", "registry": "/r", "cold_start": {"backbone": "lr", **cold}}])


def test_a_cold_start_spec_file_is_read_from_the_config_files_folder(tmp_path, monkeypatch):
    spec = {"fields": [{"kind": "categorical", "name": "user", "buckets": 16}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(_cold(spec_file="spec.yaml")))
    monkeypatch.chdir(tmp_path.parent)  # not the config's folder
    cfg = load_serve_config(tmp_path / "serve.yaml")
    assert cfg.arms[0].cold_start.spec == spec
    assert cold_start_problem(cfg.arms[0].cold_start) is None


@pytest.mark.parametrize(
    ("cold", "match"),
    [
        ({}, r"arms\.0\.cold_start: .*exactly one of spec and spec_file"),
        ({"spec": {"fields": []}, "spec_file": "s.yaml"}, "exactly one of spec and spec_file"),
        ({"spec_file": "missing.yaml"}, r"arms\.0\.cold_start\.spec_file: cannot read .*missing\.yaml"),
    ],
)
def test_a_cold_start_without_one_spec_or_with_an_unreadable_file_names_the_key(tmp_path, cold, match):
    with pytest.raises(ConfigError, match=match):
        serve_config_from_dict(_cold(**cold), env={}, spec_dir=tmp_path)


def _compose_configs() -> tuple[dict, dict]:
    configs = read_yaml(ROOT / "deploy/compose.yaml")["configs"]
    run, serve = (yaml.safe_load(configs[name]["content"]) for name in ("run-config", "serve-config"))
    return run, serve


PAIRS = {
    "examples": lambda: (
        read_yaml(ROOT / "deploy/config/reloop.example.yaml"),
        read_yaml(ROOT / "deploy/config/serve.example.yaml"),
    ),
    "compose": _compose_configs,
    "k8s": lambda: (
        read_yaml(ROOT / "deploy/k8s/base/config/run.yaml"),
        read_yaml(ROOT / "deploy/k8s/base/config/serve.yaml"),
    ),
}


@pytest.mark.parametrize("pair", list(PAIRS))
def test_each_shipped_serve_config_serves_what_its_run_config_trains(monkeypatch, tmp_path, pair):
    """The service beside the processor (deploy/config's examples, compose's and Kubernetes' configs): the
    registry run writes, the topics run joins, the same broker, and a version 0 that is the trainer's
    initial model (same spec, backbone, seed and architecture). Compose's and Kubernetes' had no
    ``cold_start``: /readyz and every /score answered 503 for ever, so no impression was logged and the
    processor never had a sample to train its first snapshot on."""
    from reloop.engine.runtime.config import load_config_dict, load_feature_spec

    monkeypatch.chdir(tmp_path)  # relative paths: both from the working folder, wherever the files are
    run_doc, serve_doc = PAIRS[pair]()
    run = load_config_dict(run_doc, env={}, base_dir=ROOT / "deploy/config")
    serve = serve_config_from_dict(serve_doc, env={}, spec_dir=ROOT / "deploy/config")
    (arm,) = serve.arms
    assert arm.registry == Path(run.checkpoint.dir)
    assert (arm.impressions_topic, arm.clicks_topic) == (
        run.source.impressions_topic,
        run.source.clicks_topic,
    )
    assert serve.kafka.bootstrap == run.kafka.bootstrap
    assert serve.host == ("127.0.0.1" if pair == "examples" else "0.0.0.0")  # in a container: its network
    cold = arm.cold_start
    assert cold is not None
    assert FeatureSpec.from_dict(cold.spec) == load_feature_spec(run.model)
    assert (cold.backbone, cold.seed, cold.params) == (run.model.backbone, run.model.seed, run.model.params)
    assert cold_start_problem(cold) is None


def test_impressions_the_trainer_would_refuse_as_oversized_are_not_logged():
    # The loggers took events up to 900 KiB; the join stage dead-letters those over
    # validation.max_event_bytes (512 KiB): a request answered 200 whose impressions never trained.
    from reloop.engine.runtime.config import ValidationSection, default_of
    from reloop.engine.serve.config import ServeConfig
    from reloop.engine.serve.stack import confluent_logger

    config = ServeConfig.model_validate(
        {"arms": [{"name": "A", "registry": "/nonexistent"}], "kafka": {"bootstrap": "127.0.0.1:1"}}
    )
    assert config.log.max_record_bytes == default_of(ValidationSection, "max_event_bytes")
    logger = confluent_logger(config, config.arms[0])
    assert logger.max_record_bytes == config.log.max_record_bytes
    logger.close(timeout_s=0.1)


@pytest.mark.parametrize(
    ("second", "refused"),
    [
        ({"registry": "/reg/a/../a", "impressions_topic": "imp_b"}, "each arm needs its own registry"),
        ({"registry": "/reg/b", "impressions_topic": "imp_a"}, "each arm needs its own impressions_topic"),
    ],
)
def test_two_arms_sharing_a_registry_or_an_impressions_topic_are_refused(second, refused):
    # A shared registry was accepted: both arms served arm A's trainer's model, and B's trainer (one
    # writer per registry) could not run beside it.
    arms = [{"name": "A", "registry": "/reg/a", "impressions_topic": "imp_a"}, {"name": "B", **second}]
    with pytest.raises(ConfigError, match=refused):
        serve_config_from_dict({"arms": arms})
    ok = [arms[0], {"name": "B", "registry": "/reg/b", "impressions_topic": "imp_b"}]
    assert [a.name for a in serve_config_from_dict({"arms": ok}).arms] == ["A", "B"]
