"""Writing files whole or not at all: appending (the training ledger, the JSONL sink) and replacing
(the files a resumed replay or backtest cuts back).

A buffered file that meets a full disk midway drops the rest of the write and keeps the bytes that
landed, so the next line is glued onto a torn one. ``append_whole`` writes to an unbuffered file until
all of ``data`` is in, and when a write fails it cuts the bytes of ``data`` that landed (best effort: the
file's own error may stop that too) before it raises, so the file ends where it ended before.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "lines"
>>> with open(path, "ab", buffering=0) as f:
...     append_whole(f, b"a\\n", 0), append_whole(f, b"bc\\n", 2)
(2, 5)
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def append_whole(f: BinaryIO, data: bytes | bytearray | memoryview, size: int) -> int:
    """Append ``data`` to ``f`` (opened unbuffered for appending, ``size`` bytes long): all of it, or
    none of it and the ``OSError`` raised. Returns the file's new size."""
    written = 0
    with memoryview(data) as view:
        try:
            while written < len(view):
                n = f.write(view[written:])
                if not n:  # a regular file that takes nothing and reports no error
                    raise OSError(errno.ENOSPC, "write took no bytes")
                written += n
        except OSError:
            if written:
                with contextlib.suppress(OSError):
                    f.truncate(size)
            raise
    return size + written


def replace_whole(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Make ``data`` (bytes, or what a function writes to the file it is given) the content of ``path``
    at once: written to a temporary file beside it, fsynced and renamed over it, so a reader (or a
    crash, or a full disk) sees the old content or the new, never a part; the temporary file is removed
    when that fails. The temporary name is this call's own: two saves at once never share one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
