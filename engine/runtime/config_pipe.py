"""A run config given as a pipe, made readable by the child processes that open it again.

``reloop run --config <(envsubst < run.yaml)`` hands the command ``/dev/fd/63``: a pipe that only it can
read, and only once. Its stage processes (``stages.processes: 2``) and ``reloop train --world-size``'s
ranks open the same path again, found nothing there, and refused the config as "not found". The command
that starts them now reads the pipe once into a private copy (a folder only its user can enter, removed
when it exits; one left by a command that was SIGKILLed is removed by the next) and gives them that.
A relative ``model.spec_file`` in such a config is taken from the working folder, in the command and in
its children alike (``config_base_dir``): a pipe has no folder of its own.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COPY_PREFIX = "reloop-config"


@contextmanager
def reopenable(path: str) -> Iterator[str]:
    """``path`` itself when it is a regular file (or anything this process cannot read: loading it says
    why); else a private copy of what it held, for as long as the context lasts. The copy keeps the
    name's suffix (``.toml`` is read as TOML)."""
    source = Path(path)
    try:
        mode = source.stat().st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            yield path
            return
        data = source.read_bytes()
    except OSError:
        yield path
        return
    root = Path(tempfile.gettempdir())
    remove_dead_owners_folders(root, COPY_PREFIX)
    with tempfile.TemporaryDirectory(prefix=f"{COPY_PREFIX}-{os.getpid()}-", dir=root) as folder:
        copy = Path(folder, "config" + source.suffix)
        # A config may hold Kafka credentials: the folder is the user's alone (mkdtemp: 0700), the file too.
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        yield str(copy)


def config_base_dir(path: Path) -> Path:
    """The folder a relative path in the config at ``path`` is taken from: the config's own folder; the
    working folder for a pipe, or for ``reopenable``'s copy of one (``/dev/fd`` had been taken)."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError:
        regular = True  # not readable: loading it says why
    copy = path.parent.name.startswith(f"{COPY_PREFIX}-") and path.parent.parent == Path(
        tempfile.gettempdir()
    )
    return path.parent if regular and not copy else Path.cwd()


def remove_dead_owners_folders(root: Path, prefix: str) -> None:
    """Remove the folders ``root/PREFIX-PID-*`` whose process PID is gone: one SIGKILLed had no chance
    to (a pid that is alive again, or another user's process, keeps its folder)."""
    for folder in root.glob(f"{prefix}-*-*"):
        pid = folder.name[len(prefix) + 1 :].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # another user's process: alive
            continue
