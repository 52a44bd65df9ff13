"""Appending to a file whole or not at all: what the training ledger and the JSONL sink write.

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
