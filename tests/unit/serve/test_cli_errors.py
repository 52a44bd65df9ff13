"""Start-up failures of ``reloop serve`` and of a stage's /metrics: one line naming what to change and
exit 2, not a traceback (a port in use, a port out of range, an unreadable token file)."""

from __future__ import annotations

import socket

import pytest
import yaml
from reloop.engine.runtime.cli import main


def _serve_config(tmp_path, **serve) -> str:
    path = tmp_path / "serve.yaml"
    arms = [{"name": "A", "registry": str(tmp_path / "r")}]
    doc = {"serve": {"log": {"enabled": False}, **serve}, "arms": arms}
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


@pytest.fixture
def busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path, busy_port, capsys) -> None:
    assert _code(["serve", "--config", _serve_config(tmp_path), "--port", str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{busy_port}" in err and "Traceback" not in err, err


def test_serve_refuses_a_port_out_of_range_and_an_unreadable_token_file(tmp_path, capsys) -> None:
    assert _code(["serve", "--config", _serve_config(tmp_path), "--port", "70000"]) == 2
    assert "0..65535" in capsys.readouterr().err
    assert _code(["serve", "--config", _serve_config(tmp_path), "--port", "abc"]) == 2
    assert (
        "argument --port: expected a port in 0..65535, got 'abc'" in capsys.readouterr().err
    )  # "invalid _port"
    missing = tmp_path / "nope" / "token"
    assert _code(["serve", "--config", _serve_config(tmp_path, auth_token_file=str(missing))]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err, err
    assert "serve.auth_token_file" in err and "cannot be read: No such file or directory" in err, err  # named


def test_a_stage_whose_metrics_port_is_in_use_exits_2_naming_the_setting(tmp_path, busy_port, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    spec = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"backbone": "lr", "spec": spec},
                "kafka": {"bootstrap": "127.0.0.1:1"},  # never reached: the port fails first
                "checkpoint": {"dir": str(tmp_path / "ckpt")},
            }
        )
    )
    assert _code(["train", "--config", str(cfg), "--metrics-port", str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve /metrics on 127.0.0.1:{busy_port}" in err and "metrics.prometheus_port" in err, err


def test_an_arm_whose_registry_does_not_exist_is_named_in_a_warning(tmp_path, caplog) -> None:
    # A mistyped arms[].registry left /readyz at 503 for ever without a word.
    import logging

    from reloop.engine.serve.config import load_serve_config
    from reloop.engine.serve.stack import ServingStack

    (tmp_path / "r").mkdir()
    with caplog.at_level(logging.WARNING, logger="reloop.engine.serve.stack"):
        ServingStack(load_serve_config(_serve_config(tmp_path))).start().close()
        assert not [r for r in caplog.records if "does not exist" in r.getMessage()]
        (tmp_path / "r").rmdir()
        ServingStack(load_serve_config(_serve_config(tmp_path))).start().close()
    assert any(f"{tmp_path / 'r'} does not exist" in r.getMessage() for r in caplog.records)


def test_run_refuses_one_metrics_port_for_both_stage_processes(tmp_path, monkeypatch, capsys) -> None:
    # Both processes started; the join stage connected and checkpointed before the train stage failed to bind.
    from reloop.engine.runtime import run_cmd

    started = []
    monkeypatch.setattr(run_cmd, "_two_processes", lambda args, cfg: started.append(cfg) or 0)
    cfg = tmp_path / "run.yaml"
    spec = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}]}
    doc = {"model": {"backbone": "lr", "spec": spec}, "metrics": {"prometheus_port": 9464}}
    cfg.write_text(
        yaml.safe_dump({**doc, "metrics": {"prometheus_port": 9464, "join_prometheus_port": 9464}})
    )
    assert _code(["run", "--config", str(cfg)]) == 2 and not started
    assert "metrics.join_prometheus_port: 9464" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump(doc))  # the join process takes 9465
    assert _code(["run", "--config", str(cfg)]) == 0 and len(started) == 1


def test_serve_refuses_the_workers_or_the_log_its_arms_counters_cannot_take(tmp_path, capsys) -> None:
    """The file is checked before ``--workers`` and ``--no-log`` apply: the same check runs after them."""

    def config(shown_from: str) -> str:
        path = tmp_path / f"serve-{shown_from}.yaml"
        counters = {"fields": ["user_id"], "samples_topic": "s", "shown_from": shown_from}
        arms = [{"name": "A", "registry": str(tmp_path / "r"), "counters": counters}]
        path.write_text(yaml.safe_dump({"serve": {}, "arms": arms}))
        return str(path)

    assert _code(["serve", "--config", config("requests"), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "serve.workers: arms ['A']" in err and "shown_from: impressions" in err and "Traceback" not in err
    assert _code(["serve", "--config", config("impressions"), "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "serve.log.enabled: arms ['A']" in err and "Traceback" not in err, err
    assert "--no-log" in err  # the flag the user gave, not only the key it set


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ({"registry": "{file}"}, "arms.0.registry: '{file}' is a file, expected a folder"),
        (
            {"memory": {"samples_topic": "s", "state_file": "{tmp}"}},
            "arms.0.memory.state_file: '{tmp}' is a folder, expected a file",
        ),
        (
            {
                "cold_start": {
                    "backbone": "nosuch",
                    "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 9}]},
                }
            },
            "arms.0.cold_start: unknown backbone 'nosuch'",
        ),
        (
            {
                "cold_start": {
                    "backbone": "dcn",
                    "spec": {"fields": [{"kind": "categorical", "name": "u", "buckets": 9}]},
                    "params": {"embedding_dim": -3},
                }
            },
            "arms.0.cold_start: backbone 'dcn': bad config: embedding_dim",
        ),
        ({"cold_start": {"backbone": "dcn", "spec": {"fields": []}}}, "arms.0.cold_start: spec: "),
    ],
)
def test_an_arm_that_could_never_serve_or_save_fails_at_start(tmp_path, capsys, arm, message) -> None:
    # Each was taken: the service listened and refused its own version 0 at every poll, or failed every
    # save of its state, or said a registry that was a file did "not exist (yet)".
    (tmp_path / "afile").write_text("x")
    fill = {"file": str(tmp_path / "afile"), "tmp": str(tmp_path)}
    arm = yaml.safe_load(
        yaml.safe_dump(arm).replace("'{file}'", fill["file"]).replace("'{tmp}'", fill["tmp"])
    )
    path = tmp_path / "serve.yaml"
    doc = {
        "serve": {"log": {"enabled": False}},
        "arms": [{"name": "A", "registry": str(tmp_path / "r"), **arm}],
    }
    path.write_text(yaml.safe_dump(doc))
    assert _code(["serve", "--config", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert message.format(**fill) in err and "Traceback" not in err, err
