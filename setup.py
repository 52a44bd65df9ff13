"""Build hook; everything else is in pyproject.toml.

One importable name: the top-level folders engine/, connectors/ and bench/ are mapped under ``reloop``
(``reloop.engine`` ...), next to reloop/__init__.py; an editable install maps them the same way.

A wheel has no deploy/ folder, so ``build_py`` copies the files that ``reloop demo`` and ``reloop kafka`` read
at run time into the package ``reloop.deploy_files`` (engine/resources.py finds them there when deploy/ is
not next to engine/). An editable install reads deploy/ itself and gets no copy. MANIFEST.in puts the same
files in the sdist.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Globs under deploy/ that the wheel ships (keep MANIFEST.in in step).
SHIPPED = ("config/*.yaml", "kafka/pom.xml", "kafka/log4j2.xml")
#: Source folders mapped under the ``reloop`` package.
MAPPED = ("engine", "connectors", "bench")


def package_layout() -> tuple[list[str], dict[str, str]]:
    """Every package under ``reloop`` and where its source is (``reloop.engine`` -> ``engine``)."""
    packages, where = ["reloop"], {"reloop": "reloop"}
    for top in MAPPED:
        if not (ROOT / top).is_dir():  # a wheel built from an sdist without bench/ still builds
            continue
        where[f"reloop.{top}"] = top
        packages += [f"reloop.{top}"] + [f"reloop.{top}.{sub}" for sub in find_packages(str(ROOT / top))]
    return packages, where


def shipped_files() -> list[Path]:
    files = sorted({p for pattern in SHIPPED for p in (ROOT / "deploy").glob(pattern) if p.is_file()})
    if not any(p.name == "pom.xml" for p in files):
        raise SystemExit(f"setup.py: no deploy/kafka/pom.xml under {ROOT} (an sdist without MANIFEST.in?)")
    return files


class BuildPyWithDeploy(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "reloop" / "deploy_files"
        for src in shipped_files():
            dst = target / src.relative_to(ROOT / "deploy")
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst))
        init = target / "__init__.py"
        init.write_text('"""Copies of the deploy/ files the commands read at run time (see setup.py)."""\n')


PACKAGES, PACKAGE_DIR = package_layout()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, cmdclass={"build_py": BuildPyWithDeploy})
