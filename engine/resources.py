"""Where the commands find the files under ``deploy/`` and where they keep their caches.

In a checkout (``deploy/`` next to ``engine/``) everything is read from ``deploy/`` and the README's
commands keep working as they are. An installed wheel has no ``deploy/``: it ships the files the commands
read at run time (``deploy/config/*.yaml``, ``deploy/kafka/pom.xml`` and ``log4j2.xml``) as the package
``reloop.deploy_files`` (setup.py copies them there at build time), and whatever a command downloads or writes
goes to the user's XDG folders instead of the source tree:

- ``$XDG_CACHE_HOME/reloop`` (default ``~/.cache/reloop``): the Kafka jars (``kafka/lib``);
- ``$XDG_STATE_HOME/reloop`` (default ``~/.local/state/reloop``): the local broker's state.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_DEPLOY = REPO_ROOT / "deploy"
PACKAGE = "reloop.deploy_files"


class ResourceError(FileNotFoundError):
    """A file the command needs is neither in a checkout's deploy/ nor in the installed package."""


def in_checkout() -> bool:
    """True when running from a source checkout (its ``deploy/`` folder is next to ``engine/``)."""
    return (CHECKOUT_DEPLOY / "kafka" / "pom.xml").is_file()


def packaged_deploy() -> Path | None:
    """The installed copy of the deploy files (``reloop.deploy_files``), or None (an editable install)."""
    try:
        root = resources.files(PACKAGE)
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if path.is_dir() else None


def deploy_file(relative: str) -> Path:
    """``deploy/<relative>`` of the checkout, else of the installed package; fails naming both places."""
    checkout = CHECKOUT_DEPLOY / relative
    if checkout.is_file():
        return checkout
    packaged = packaged_deploy()
    if packaged is not None and (packaged / relative).is_file():
        return packaged / relative
    where = f"{checkout}" + (f" or {packaged / relative}" if packaged is not None else "")
    raise ResourceError(f"deploy/{relative} not found (looked in {where}); reinstall reloop")


def packaged_copy_of(path: str | os.PathLike[str]) -> Path | None:
    """The installed copy of a ``deploy/...`` path the docs give (relative to a checkout), or None: outside
    a checkout ``reloop run --config deploy/config/reloop.example.yaml`` named only a missing file."""
    parts = Path(path).parts
    packaged = packaged_deploy()
    if packaged is None or len(parts) < 2 or parts[0] != "deploy":
        return None
    found = packaged.joinpath(*parts[1:])
    return found if found.is_file() else None


def _xdg(variable: str, default: str) -> Path:
    value = os.environ.get(variable)
    # The XDG spec: a relative path is invalid and is ignored.
    base = Path(value) if value and Path(value).is_absolute() else Path.home() / default
    return base / "reloop"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/reloop`` or ``~/.cache/reloop`` (downloads that can be fetched again)."""
    return _xdg("XDG_CACHE_HOME", ".cache")


def user_state_dir() -> Path:
    """``$XDG_STATE_HOME/reloop`` or ``~/.local/state/reloop`` (what a command keeps between runs)."""
    return _xdg("XDG_STATE_HOME", ".local/state")
