"""``~`` in a config's paths is the user's home, as in a shell: it made a folder named "~" in the
working folder (from the file and from RELOOP__CHECKPOINT__DIR alike), which a later ``rm -rf ~`` takes
for the home."""

from __future__ import annotations

from pathlib import Path

from reloop.engine.runtime.config import load_config_dict
from reloop.engine.serve.config import serve_config_from_dict

SPEC = {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}


def test_run_config_paths_expand_the_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "spec.yaml").write_text("fields: [{kind: categorical, name: user, buckets: 10}]\n")
    (tmp_path / "ca.pem").write_text("x")
    doc = {
        "model": {"backbone": "lr", "spec_file": "~/spec.yaml"},
        "checkpoint": {"dir": "~/snaps", "ledger": "~/ledger.txt"},
        "kafka": {"bootstrap": "127.0.0.1:9092", "ssl_cafile": "~/ca.pem"},
    }
    cfg = load_config_dict(doc, env={})
    assert cfg.checkpoint.dir == str(tmp_path / "snaps")
    assert cfg.checkpoint.ledger == str(tmp_path / "ledger.txt")
    assert cfg.model.spec_file == str(tmp_path / "spec.yaml")
    assert cfg.kafka.ssl_cafile == str(tmp_path / "ca.pem")
    over = load_config_dict(
        {"model": {"backbone": "lr", "spec": SPEC}}, env={"RELOOP__CHECKPOINT__DIR": "~/v"}
    )
    assert over.checkpoint.dir == str(tmp_path / "v")


def test_serve_config_paths_expand_the_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "token").write_text("t0ken-t0ken-t0ken\n")
    doc = {
        "serve": {"auth_token_file": "~/token"},
        "arms": [
            {"name": "a", "registry": "~/reg", "memory": {"samples_topic": "s", "state_file": "~/m.npz"}},
        ],
    }
    config = serve_config_from_dict(doc, env={}, base_dir=Path("/elsewhere"))
    assert config.auth_token_file == tmp_path / "token"
    assert config.arms[0].registry == tmp_path / "reg"
    assert config.arms[0].memory.state_file == tmp_path / "m.npz"
