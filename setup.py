"""Build hook; everything else is in pyproject.toml.

A wheel has no deploy/ folder, so ``build_py`` copies the files that ``reloop demo`` and ``reloop kafka`` read
at run time into the package ``reloop_data`` (engine/resources.py finds them there when deploy/ is not
next to engine/). An editable install reads deploy/ itself and gets no copy. MANIFEST.in puts the same
files in the sdist.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Globs under deploy/ that the wheel ships (keep MANIFEST.in in step).
SHIPPED = ("config/*.yaml", "kafka/pom.xml", "kafka/log4j2.xml")


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
        target = Path(self.build_lib) / "reloop_data"
        for src in shipped_files():
            dst = target / src.relative_to(ROOT / "deploy")
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst))
        init = target / "__init__.py"
        init.write_text('"""Copies of the deploy/ files the commands read at run time (see setup.py)."""\n')


setup(cmdclass={"build_py": BuildPyWithDeploy})
