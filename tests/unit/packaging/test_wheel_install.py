"""A plain (non-editable) install of the built wheel, in a fresh venv outside the checkout, run from a
folder outside it: `reloop --version`, `reloop models`, `reloop demo` (its packaged config), and, where
Java and Maven are there, `reloop kafka fetch | up | status | down` with the jars in a user cache and the
demo itself for a few seconds.

The heavy dependencies (torch alone is gigabytes) are not downloaded again: the fresh venv sees the
test interpreter's site-packages through a .pth line placed *after* its own, so every `reloop` module
(`reloop.engine`, `reloop.connectors`, `reloop.bench`, `reloop.deploy_files`) and the `reloop` metadata come
from the wheel (asserted), and only third-party packages from the shared folder. The wheel's declared
dependencies and extras are checked from its METADATA.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
#: What a wheel is built from (setup.py + MANIFEST.in ship the deploy/ files).
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
PACKAGES = ("reloop", "engine", "connectors", "bench")


def _run(cmd: list[str], *, env: dict, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False)
    return done


def _ok(done: subprocess.CompletedProcess) -> str:
    tail = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{done.args} -> {done.returncode}\n{tail}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy2(ROOT / name, src / name)
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # deploy/ without the jars (deploy/kafka/lib) and Maven's target/.
    jars = shutil.ignore_patterns("lib", "target", "__pycache__")
    shutil.copytree(ROOT / "deploy", src / "deploy", ignore=jars)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "RELOOP_"))}
    env |= {"XDG_CACHE_HOME": str(work / "cache"), "XDG_STATE_HOME": str(work / "state"), "HOME": str(work)}
    dist = work / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _ok(_run([*build, "-w", str(dist), str(src)], env=env, cwd=work))
    (wheel,) = dist.glob("reloop-*.whl")
    target = work / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    purelib = Path(_ok(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            env=env, cwd=work)).strip())  # fmt: skip
    (purelib / "zz_heavy_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
             env=env, cwd=work))  # fmt: skip
    outside = work / "elsewhere"
    outside.mkdir()
    return {"work": work, "wheel": wheel, "venv": target, "reloop": target / "bin" / "reloop", "env": env,
            "cwd": outside, "python": python, "purelib": purelib}  # fmt: skip


def test_the_wheel_declares_a_lean_core_and_the_extras(installed: dict) -> None:
    with zipfile.ZipFile(installed["wheel"]) as zf:
        names = set(zf.namelist())
        meta = email.message_from_bytes(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    shipped = {"config/demo.yaml", "config/reloop.example.yaml", "config/serve.example.yaml", "kafka/pom.xml",
               "kafka/log4j2.xml"}  # fmt: skip
    assert {f"reloop/deploy_files/{name}" for name in shipped} <= names
    # One importable top-level name: everything but the metadata is under reloop/.
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"reloop"}
    assert {"reloop/engine/__init__.py", "reloop/connectors/__init__.py", "reloop/bench/__init__.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert meta["License-Expression"] == "Apache-2.0"
    requires = meta.get_all("Requires-Dist")
    core = {r.split(">")[0].split("[")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert {"torch", "pydantic", "confluent-kafka", "pyarrow"} <= core
    assert not core & {"fastapi", "uvicorn", "matplotlib", "rich", "httpx", "pytest"}
    assert set(meta.get_all("Provides-Extra")) >= {"serve", "replay", "demo", "dev"}


def test_the_code_comes_from_the_wheel_not_the_checkout(installed: dict) -> None:
    code = ("import reloop.engine, reloop.connectors, reloop.deploy_files, importlib.metadata as m; "
            "print(reloop.engine.__file__); print(reloop.connectors.__file__); "
            "print(reloop.deploy_files.__file__); "
            "print(m.distribution('reloop')._path)")  # fmt: skip
    out = _ok(_run([str(installed["python"]), "-c", code], env=installed["env"], cwd=installed["cwd"]))
    for line in out.splitlines():
        assert line.startswith(str(installed["purelib"])), line


def test_version_models_and_demo_help(installed: dict) -> None:
    run = [str(installed["reloop"])]
    env, cwd = installed["env"], installed["cwd"]
    assert _ok(_run([*run, "--version"], env=env, cwd=cwd)) == "reloop 0.1.0\n"
    assert "deepfm" in _ok(_run([*run, "models"], env=env, cwd=cwd))
    help_text = _ok(_run([*run, "demo", "--help"], env=env, cwd=cwd))
    shipped = installed["purelib"] / "reloop" / "deploy_files" / "config" / "demo.yaml"
    assert "reloop/deploy_files/config/demo.yaml" in help_text.replace("\n", "").replace(" ", "")
    assert shipped.is_file()
    bad = _run([*run, "no-such-command"], env=env, cwd=cwd)
    assert bad.returncode == 2 and bad.stdout == "" and "unknown command" in bad.stderr


def test_kafka_and_the_demo_from_the_installed_wheel(installed: dict, unavailable) -> None:
    if shutil.which("java") is None or shutil.which("mvn") is None:
        unavailable("needs Java and Maven (scripts/setup.sh checks for them)")
    run = [str(installed["reloop"])]
    env, cwd, work = installed["env"], installed["cwd"], installed["work"]
    env = env | {"MAVEN_OPTS": f"-Dmaven.repo.local={Path.home() / '.m2' / 'repository'}"}  # HOME moved
    lib = work / "cache" / "reloop" / "kafka" / "lib"
    fetched = _ok(_run([*run, "kafka", "fetch"], env=env, cwd=cwd, timeout=300))
    assert f"jars in {lib}" in fetched and any(lib.glob("kafka_2.13-*.jar"))
    assert not (installed["purelib"] / "reloop" / "deploy_files" / "kafka" / "lib").exists()
    state = work / "state" / "reloop" / "kafka"
    try:
        assert f"state {state}" in _ok(_run([*run, "kafka", "up"], env=env, cwd=cwd, timeout=120))
        assert "metadata: ok" in _ok(_run([*run, "kafka", "status"], env=env, cwd=cwd))
    finally:
        down = _run([*run, "kafka", "down"], env=env, cwd=cwd, timeout=60)
    assert down.returncode == 0 and "stopped the broker" in down.stdout
    # The whole loop for a few seconds: its packaged config, its own broker from the cached jars.
    demo = [*run, "demo", "--duration", "12", "--no-live", "--rate", "10", "--workdir", str(work / "demo")]
    out = _ok(_run(demo, env=env, cwd=cwd, timeout=240))
    assert "per arm: model versions and logging" in out, out[-3000:]
