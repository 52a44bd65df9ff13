"""``reloop join``'s /metrics port: its own (``--metrics-port``, ``metrics.join_prometheus_port``), never the
train stage's; a join stage that serves none while the config names the train stage's port says so."""

from __future__ import annotations

import logging

import pytest
from reloop.engine.runtime.config import load_config_dict
from reloop.engine.runtime.join_cmd import metrics_port

MODEL = {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}}


@pytest.mark.parametrize(
    ("metrics", "given", "port", "warned"),
    [
        ({"prometheus_port": 9464}, None, None, True),  # the shipped configs, a joiner started by hand
        ({"prometheus_port": 9464, "join_prometheus_port": 9466}, None, 9466, False),
        ({"prometheus_port": 9464}, 0, 0, False),
        ({}, None, None, False),  # no metrics asked for at all: nothing to say
    ],
)
def test_a_join_stage_serves_its_own_port_and_says_when_it_serves_none(caplog, metrics, given, port, warned):
    cfg = load_config_dict({"model": MODEL, "metrics": metrics}, env={})
    with caplog.at_level(logging.WARNING, logger="reloop.join"):
        assert metrics_port(given, cfg) == port
    said = [r.getMessage() for r in caplog.records if "serves no /metrics" in r.getMessage()]
    assert bool(said) is warned
    if warned:
        assert "metrics.join_prometheus_port or --metrics-port" in said[0]


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({**MODEL, "backbone": "dcnn"}, "model.backbone: unknown backbone 'dcnn'"),
        ({**MODEL, "backbone": "dcn", "params": {"embeding_dim": 4}}, "model.params"),
        ({**MODEL, "backbone": "dcn", "optimizer": {"lr": -1}}, "model.optimizer"),
    ],
)
def test_a_model_section_no_learner_can_be_built_from_stops_the_join_stage_at_its_start(
    tmp_path, capsys, model, needle
):
    # reloop run and train refused these (exit 2); reloop join ran on, a joiner feeding a samples topic
    # no trainer of that config would train from.
    import argparse

    import yaml
    from reloop.engine.runtime.join_cmd import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": model, "checkpoint": {"dir": str(tmp_path / "c")}}))
    args = argparse.Namespace(config=str(path), log_level=None, metrics_port=None)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("reloop join: ") and needle in err, err
