"""An unknown config key names the nearest key the section has, in every config the commands read."""

from __future__ import annotations

import pytest
from reloop.engine.runtime.config import ConfigError, load_config_dict, load_feature_spec
from reloop.engine.serve.config import ConfigError as ServeConfigError
from reloop.engine.serve.config import serve_config_from_dict

SPEC = {"fields": [{"kind": "categorical", "name": "item", "buckets": 8}]}


def _run(**sections) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config_dict({"model": {"backbone": "lr", "spec": SPEC}, **sections}, env={})
    return str(caught.value)


def test_a_near_miss_names_the_key_it_likely_meant():
    assert "train.batch_sise: unknown key (did you mean batch_size?)" in _run(train={"batch_sise": 512})
    assert "join.windw_ms: unknown key (did you mean window_ms?)" in _run(join={"windw_ms": 1000})


def test_a_key_like_none_is_only_unknown():
    said = _run(train={"colour": "blue"})
    assert "train.colour: unknown key" in said and "did you mean" not in said


def test_an_environment_variable_is_named_with_the_suggestion():
    with pytest.raises(ConfigError) as caught:
        load_config_dict({"model": {"backbone": "lr", "spec": SPEC}}, env={"RELOOP__TRAIN__BATCH_SISE": "5"})
    assert "(did you mean batch_size?) (environment variable RELOOP__TRAIN__BATCH_SISE)" in str(caught.value)


def test_serve_says_unknown_key_with_its_section_and_the_suggestion():
    # It said pydantic's "Extra inputs are not permitted", unlike every other config.
    with pytest.raises(ServeConfigError) as caught:
        serve_config_from_dict({"serve": {"reload_intervl_s": 3}, "arms": [{"name": "A", "registry": "r"}]})
    assert "serve.reload_intervl_s: unknown key (did you mean reload_interval_s?)" in str(caught.value)


def test_every_error_of_the_feature_spec_names_its_place_in_the_document():
    # The second error of a spec lacked "model.spec." (only the message's first was prefixed).
    bad = {"fields": [{"kind": "categorical", "nme": "item", "buckets": 8}]}
    with pytest.raises(ConfigError) as caught:
        load_feature_spec(load_config_dict({"model": {"backbone": "lr", "spec": bad}}, env={}).model)
    parts = str(caught.value).removeprefix("invalid config: ").split("; ")
    assert len(parts) == 2 and all(p.startswith("model.spec.fields.0.") for p in parts), parts
