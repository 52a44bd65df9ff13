"""Config files that cannot be read fail with one line naming the file (each was a traceback), and paths in
them of the wrong kind fail naming their key."""

from __future__ import annotations

from pathlib import Path

import pytest
from reloop.engine.runtime.config import ConfigError, load_config, load_config_dict
from reloop.engine.serve.config import ConfigError as ServeConfigError
from reloop.engine.serve.config import read_yaml, serve_config_from_dict

BASE = """model:
  backbone: dcn
  spec:
    fields:
      - {kind: categorical, name: user, buckets: 100}
"""
TOML = """[model]
backbone = "lr"
spec = { fields = [ { kind = "categorical", name = "user", buckets = 100 } ] }
"""


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("latin1.yaml", b"model:\n  backbone: dcn # caf\xe9\n", "is not UTF-8 text"),
        ("deep.yaml", b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        ("folder.yaml", None, "cannot read config"),
        ("broken.yaml", b"a: [1,\n b: 2\n", "is not valid YAML"),
        # The second train block won in silence: batch_size 64 became the default.
        ("twice.yaml", b"train: {batch_size: 64}\nmodel: {}\ntrain: {threads: 1}\n", "'train' twice"),
    ],
)
def test_an_unreadable_config_is_one_config_error(tmp_path: Path, name: str, content, needle: str) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    for read in (lambda p: load_config(p, env={}), read_yaml):
        with pytest.raises(ConfigError, match=needle) as info:
            read(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_model_spec_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    from reloop.engine.runtime.config import load_feature_spec

    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"fields: [] # caf\xe9\n")
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  backbone: dcn\n  spec_file: spec.yaml\n")
    cfg = load_config(config, env={})
    with pytest.raises(ConfigError, match="model.spec_file"):
        load_feature_spec(cfg.model)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {x: 1}\nserve:\n  <<: *b\n  x: 3\n")
    assert read_yaml(path)["serve"] == {"x": 3}


@pytest.mark.parametrize("name", ["bom.toml", "upper.TOML"])
def test_toml_with_a_byte_order_mark_or_an_upper_case_suffix_loads(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(("\ufeff" if name.startswith("bom") else "").encode() + TOML.encode())
    assert load_config(path, env={}).model.backbone == "lr"


def test_stages_processes_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    assert load_config(path, env={"RELOOP__STAGES__PROCESSES": "1"}).stages.processes == 1
    with pytest.raises(ConfigError, match="stages.processes"):
        load_config(path, env={"RELOOP__STAGES__PROCESSES": "3"})


def test_a_section_check_names_the_variables_set_not_one_that_does_not_exist(tmp_path: Path) -> None:
    # It blamed "environment variable RELOOP__RECOVERY", a name nobody set, for a value in the file.
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "recovery: {stop_timeout_s: 5, flush_timeout_s: 10}\n")
    with pytest.raises(ConfigError, match="stop_timeout_s") as refused:
        load_config(path, env={"RELOOP__RECOVERY__BACKOFF_MAX_S": "10"})
    message = str(refused.value)
    assert "environment variable RELOOP__RECOVERY)" not in message
    assert "RELOOP__RECOVERY__BACKOFF_MAX_S" in message


def _load(data: dict):
    model = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}}
    return load_config_dict({"model": model, **data}, env={})


def test_checkpoint_paths_of_the_wrong_kind_fail_the_config_naming_the_key(tmp_path):
    # They failed when the stage was built (FileExistsError, IsADirectoryError), retried by the
    # supervisor for 15 minutes as if the broker were down, in words naming neither key nor path.
    afile = tmp_path / "afile"
    afile.write_text("x")
    for section, why in (
        ({"dir": str(afile)}, r"checkpoint\.dir: .*afile' is a file, expected a folder"),
        ({"dir": str(afile / "snaps")}, r"checkpoint\.dir: .*afile' is a file, so .*snaps' cannot be made"),
        ({"ledger": str(tmp_path)}, r"checkpoint\.ledger: .* is a folder, expected a file"),
    ):
        with pytest.raises(ConfigError, match=why):
            _load({"checkpoint": section})
    ok = _load(
        {"checkpoint": {"dir": str(tmp_path / "new" / "snaps"), "ledger": str(tmp_path / "ledger.jsonl")}}
    )
    assert ok.checkpoint.dir == str(tmp_path / "new" / "snaps")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            {"stages": {"samples_topic": "impressions"}},
            r"stages\.samples_topic is source\.impressions_topic too",
        ),
        (
            {"source": {"clicks_topic": "impressions"}},
            r"source\.clicks_topic is source\.impressions_topic too",
        ),
        (
            {"sink": {"dead_letter_topic": "reloop.samples"}},
            r"sink\.dead_letter_topic is stages\.samples_topic too",
        ),
        (
            {"source": {"impressions_topic": "bad topic!"}},
            r"source\.impressions_topic: .*not a Kafka topic name",
        ),
        ({"stages": {"samples_topic": "s" * 250}}, r"stages\.samples_topic: .*not a Kafka topic name"),
        ({"recovery": {"backoff_initial_s": 100, "backoff_max_s": 1}}, r"recovery: .*backoff_initial_s"),
    ],
)
def test_topics_and_backoffs_that_cannot_work_fail_naming_the_key(data, why):
    # Each was taken: the broker refused a topic name when it was first written; one topic for two roles
    # dead-lettered every click or fed the join stage its own output.
    with pytest.raises(ConfigError, match=why):
        _load(data)


def test_a_serve_arm_with_a_bad_topic_fails_naming_it_and_nothing_else():
    # The arm's error came with "arms: Tuple should have at least 1 item after validation, not 0".
    arm = {"name": "A", "registry": "/tmp/reg-a", "impressions_topic": "bad topic"}
    with pytest.raises(ServeConfigError) as refused:
        serve_config_from_dict({"arms": [arm]}, env={})
    assert str(refused.value).count(";") == 0
    assert "arms.0.impressions_topic: 'bad topic' is not a Kafka topic name" in str(
        refused.value
    )
    with pytest.raises(ServeConfigError, match="arms: Tuple should have at least 1 item"):
        serve_config_from_dict({"arms": []}, env={})
