"""Where the commands find deploy/ files and keep their caches: the checkout's deploy/ (README commands
unchanged), else the installed copies and the user's XDG folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from reloop.connectors.kafka import local_broker, local_broker_cli
from reloop.engine import resources
from reloop.engine.runtime import demo

ROOT = Path(__file__).resolve().parents[3]


def test_a_checkout_reads_its_own_deploy_folder() -> None:
    assert resources.in_checkout()
    assert resources.deploy_file("config/demo.yaml") == ROOT / "deploy" / "config" / "demo.yaml"
    assert demo.DEFAULT_CONFIG == ROOT / "deploy" / "config" / "demo.yaml"
    assert local_broker.default_kafka_home() == ROOT / "deploy" / "kafka"
    assert local_broker.LocalBroker(ROOT / ".state" / "unused").lib_dir == ROOT / "deploy" / "kafka" / "lib"


def test_a_missing_file_names_where_it_looked() -> None:
    with pytest.raises(resources.ResourceError, match=r"deploy/config/nope\.yaml not found \(looked in "):
        resources.deploy_file("config/nope.yaml")


def test_xdg_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "s"))
    assert resources.user_cache_dir() == tmp_path / "c" / "reloop"
    assert resources.user_state_dir() == tmp_path / "s" / "reloop"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the spec: relative paths are invalid
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resources.user_cache_dir() == tmp_path / "home" / ".cache" / "reloop"
    assert resources.user_state_dir() == tmp_path / "home" / ".local" / "state" / "reloop"


@pytest.fixture()
def installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """As an installed wheel sees it: no deploy/ next to the code, the shipped copies elsewhere."""
    shipped = tmp_path / "site-packages" / "reloop" / "deploy_files"
    (shipped / "kafka").mkdir(parents=True)
    for name in ("pom.xml", "log4j2.xml"):
        (shipped / "kafka" / name).write_bytes((ROOT / "deploy" / "kafka" / name).read_bytes())
    monkeypatch.setattr(resources, "CHECKOUT_DEPLOY", tmp_path / "no-checkout" / "deploy")
    monkeypatch.setattr(resources, "packaged_deploy", lambda: shipped)
    monkeypatch.setattr(local_broker, "KAFKA_HOME", tmp_path / "no-checkout" / "deploy" / "kafka")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("RELOOP_STATE_DIR", raising=False)
    return shipped


def test_installed_kafka_home_is_a_user_cache_with_the_shipped_pom(installed: Path, tmp_path: Path) -> None:
    assert not resources.in_checkout()
    home = local_broker.default_kafka_home()
    assert home == tmp_path / "cache" / "reloop" / "kafka"
    assert (home / "pom.xml").read_bytes() == (installed / "kafka" / "pom.xml").read_bytes()
    assert (home / "log4j2.xml").is_file()
    broker = local_broker.LocalBroker(tmp_path / "state-x")
    assert broker.kafka_home == home and broker.lib_dir == home / "lib"
    # An upgrade ships a new pom: the cached copy follows (and ensure_jars then re-fetches the jars).
    (installed / "kafka" / "pom.xml").write_text("<project>upgraded</project>\n")
    assert (local_broker.default_kafka_home() / "pom.xml").read_text() == "<project>upgraded</project>\n"


def test_installed_broker_state_goes_to_the_xdg_state_folder(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert local_broker_cli.default_state_dir() == tmp_path / "state" / "reloop" / "kafka"
    monkeypatch.setenv("RELOOP_STATE_DIR", str(tmp_path / "mine"))
    assert local_broker_cli.default_state_dir() == tmp_path / "mine" / "kafka"


def test_a_checkout_keeps_the_broker_state_in_dot_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELOOP_STATE_DIR", raising=False)
    assert local_broker_cli.default_state_dir() == ROOT / ".state" / "kafka"


def test_a_deploy_path_of_the_docs_outside_a_checkout_names_the_installed_copy(
    installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's `reloop run --config deploy/config/reloop.example.yaml`, run elsewhere, said only
    # "config file not found".
    from reloop.engine.config_common import ConfigError, read_document

    (installed / "config").mkdir()
    (installed / "config" / "reloop.example.yaml").write_text("kafka: {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        read_document("deploy/config/reloop.example.yaml")
    said = str(caught.value)
    assert said.endswith(f"(the copy installed with reloop: {installed / 'config' / 'reloop.example.yaml'})")
    with pytest.raises(ConfigError) as caught:
        read_document("deploy/config/nothing.yaml")
    assert "installed" not in str(caught.value)
