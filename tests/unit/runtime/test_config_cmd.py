"""``reloop config``: check and show a file as the commands read it; the reference page is the models'."""

from __future__ import annotations

from pathlib import Path

import yaml
from reloop.engine.runtime.cli import main

ROOT = Path(__file__).resolve().parents[3]
RUN = ROOT / "deploy" / "config" / "reloop.example.yaml"
SERVE = ROOT / "deploy" / "config" / "serve.example.yaml"


def test_the_reference_page_is_what_the_models_say() -> None:
    from reloop.engine.runtime.config_reference import reference_markdown

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == reference_markdown(), "docs/configuration.md is stale: reloop config reference > it"


def test_the_reference_lists_every_key_of_the_run_config() -> None:
    from reloop.engine.runtime.config import RunConfig

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for section, field in RunConfig.model_fields.items():
        for key in field.annotation.model_fields:
            assert f"| `{section}.{key}" in page, f"{section}.{key}"
    assert "| `model.optimizer.lr` |" in page and "| `serve.limits.max_body_bytes` |" in page
    assert "| `kafka.client` | confluent |" in page  # the service's default, not the run config's


def test_check_refuses_what_the_commands_refuse_naming_the_key(tmp_path: Path, capsys) -> None:
    assert main(["config", "check", "--config", str(RUN), "--kind", "run"]) == 0
    assert main(["config", "check", "--config", str(SERVE)]) == 0
    assert "a valid service config" in capsys.readouterr().out
    doc = yaml.safe_load(RUN.read_text())
    doc["model"]["spec_file"] = str(RUN.parent / doc["model"]["spec_file"])  # relative to the file
    doc["model"]["backbone"] = "dcnn"  # refused by run's model check, not by the file's validation
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["config", "check", "--config", str(bad)]) == 2
    assert "model.backbone: unknown backbone 'dcnn'" in capsys.readouterr().err
    serve = yaml.safe_load(SERVE.read_text())
    cold = serve["arms"][0]["cold_start"]
    cold["spec_file"] = str(SERVE.parent / cold["spec_file"])
    serve["arms"][0]["registry"] = str(tmp_path / "bad.yaml")  # a file: serve refuses it at its start
    bad.write_text(yaml.safe_dump(serve))
    assert main(["config", "check", "--config", str(bad)]) == 2
    assert "arms.0.registry" in capsys.readouterr().err


def test_show_fills_in_defaults_applies_the_environment_and_hides_secrets(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("RELOOP__TRAIN__BATCH_SIZE", "64")
    monkeypatch.setenv("RELOOP__KAFKA__SASL_PASSWORD", "hunter2")
    assert main(["config", "show", "--config", str(RUN)]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["train"]["batch_size"] == 64 and shown["recovery"]["give_up_after_s"] == 900.0
    assert "hunter2" not in out and shown["kafka"]["sasl_password"] == "**********"
    assert main(["config", "show", "--config", str(SERVE)]) == 0
    served = yaml.safe_load(capsys.readouterr().out)
    assert set(served) == {"serve", "arms", "kafka", "salt"} and served["serve"]["port"] == 8000


def test_a_demo_config_is_sent_to_the_demo(capsys) -> None:
    assert main(["config", "check", "--config", str(ROOT / "deploy" / "config" / "demo.yaml")]) == 2
    assert "a demo config" in capsys.readouterr().err


def test_a_piped_config_is_read_once_for_its_kind_and_again_as_it(tmp_path: Path, capsys) -> None:
    # Read once to tell its kind, the pipe was empty for the check: "model: Field required".
    import os
    import subprocess
    import sys

    for source, said in ((RUN, "a valid run config"), (SERVE, "a valid service config")):
        read, write = os.pipe()
        os.write(write, source.read_bytes())
        os.close(write)
        done = subprocess.run(
            [sys.executable, "-m", "reloop.engine.runtime.cli", "config", "check", "--config",
             f"/dev/fd/{read}"],
            pass_fds=(read,), cwd=source.parent, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        os.close(read)
        assert done.returncode == 0 and said in done.stdout, done.stderr


def test_what_show_prints_is_taken_back_but_its_masked_secrets(tmp_path: Path, capsys, monkeypatch) -> None:
    # The service's show printed the spec read from spec_file and the spec_file: "give exactly one of
    # spec and spec_file"; and a masked password given back was taken as the password.
    for source in (RUN, SERVE):
        assert main(["config", "show", "--config", str(source)]) == 0
        shown = tmp_path / f"shown-{source.name}"
        shown.write_text(capsys.readouterr().out)
        code = main(["config", "check", "--config", str(shown)])
        said = capsys.readouterr()
        assert code == 0 and "a valid" in said.out, said.err
    monkeypatch.setenv("RELOOP__KAFKA__SASL_PASSWORD", "**********")
    assert main(["config", "check", "--config", str(RUN)]) == 2
    assert "is the mask reloop config show prints" in capsys.readouterr().err
    monkeypatch.delenv("RELOOP__KAFKA__SASL_PASSWORD")
    monkeypatch.setenv("RELOOP__SERVE__AUTH_TOKEN", "**********")
    assert main(["config", "check", "--config", str(SERVE)]) == 2
    err = capsys.readouterr().err
    assert "auth_token" in err and "is the mask reloop config show prints" in err, err
