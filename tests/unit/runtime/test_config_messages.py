"""Small things a user writing a config meets: the log level in any case, a whole-spec error named
without a dangling dot."""

from __future__ import annotations

import pytest
from reloop.engine.runtime.config import ConfigError, load_config_dict, load_feature_spec

MODEL = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}}


@pytest.mark.parametrize("given", ["debug", "Warning", "ERROR"])
def test_the_log_level_is_taken_in_any_case(given: str) -> None:
    # RELOOP__LOG__LEVEL=debug was refused (only DEBUG), while the variables' names take any case.
    assert load_config_dict({"model": MODEL}, env={"RELOOP__LOG__LEVEL": given}).log.level == given.upper()
    assert load_config_dict({"model": MODEL, "log": {"level": given}}, env={}).log.level == given.upper()
    with pytest.raises(ConfigError, match="log.level"):
        load_config_dict({"model": MODEL, "log": {"level": "loud"}}, env={})


def test_an_error_of_the_whole_spec_names_the_spec() -> None:
    # It read "model.spec.: feature spec: fields must not be empty".
    cfg = load_config_dict({"model": {**MODEL, "spec": {"fields": []}}}, env={})
    with pytest.raises(ConfigError) as err:
        load_feature_spec(cfg.model)
    assert "model.spec: feature spec: fields must not be empty" in str(err.value)
