"""Where the time goes, for the figures that miss their target: cProfile in-process, py-spy for another
process. Both return short markdown (a fenced block of the top functions by self and inclusive time).

>>> collapse_top({"a;b;c": 3, "a;b": 1, "a;d": 4}, top=2)
([('d', 4), ('c', 3)], [('a', 8), ('b', 4)])
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_LINE_NO = re.compile(r":\d+\)")
_GENERIC = ("threading.py", "asyncio/", "uvicorn/", "starlette/", "fastapi/", "anyio/", "concurrent/")


def cprofile_top(fn: Callable[[], Any], top: int = 15, sort: str = "tottime") -> tuple[Any, str]:
    """Run ``fn`` under cProfile; returns (its result, a markdown block of the top ``top`` functions)."""
    prof = cProfile.Profile()
    result = prof.runcall(fn)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.strip_dirs().sort_stats(sort).print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    total = next((ln.strip() for ln in lines if "function calls" in ln), "")
    body = "\n".join(lines[start:])
    return result, f"cProfile, sorted by {sort} ({total}):\n\n```\n{body}\n```"


def _pyspy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def collapse_top(
    stacks: dict[str, int], top: int = 15
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """From collapsed stacks (``f1;f2;leaf`` -> samples): the top leaf (self) and inclusive functions."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, n in stacks.items():
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return own.most_common(top), inclusive.most_common(top)


def pyspy_top(
    pid: int, seconds: float, top: int = 15, *, during: Callable[[], Any] | None = None, idle: bool = False
) -> str:
    """Sample process ``pid`` with py-spy for ``seconds`` (all threads; idle frames dropped unless
    ``idle``) while ``during()`` runs here (e.g. the load that keeps it busy); a markdown block of the
    top functions, or a line saying why there is none."""
    exe = _pyspy()
    if exe is None:
        return "(py-spy not installed: `pip install py-spy`)"
    with tempfile.TemporaryDirectory(prefix="reloop-pyspy-") as tmp:
        out = Path(tmp) / "stacks.txt"
        cmd = [exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-f", "raw", "-o", str(out)]
        cmd += ["-r", "200", "--nonblocking"]
        if idle:
            cmd.append("--idle")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if during is not None:
            during()
        _, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode != 0 or not out.exists():
            return f"(py-spy failed: {err.strip()[-300:]})"
        stacks: dict[str, int] = {}
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            stack = _LINE_NO.sub(")", stack)  # one entry per function, not per line
            if stack and count.isdigit():
                stacks[stack] = stacks.get(stack, 0) + int(count)
    return render_pyspy(stacks, top, f"py-spy, pid {pid}, {seconds:.0f} s at 200 Hz")


def render_pyspy(stacks: dict[str, int], top: int, title: str) -> str:
    total = sum(stacks.values())
    if not total:
        return f"({title}: no samples)"
    own, _ = collapse_top(stacks, top)
    # Inclusive time without the frames every request passes through (threads, event loop, ASGI stack).
    _, inclusive = collapse_top(
        {
            ";".join(f for f in s.split(";") if not any(g in f for g in _GENERIC)) or "(event loop)": n
            for s, n in stacks.items()
        },
        top,
    )
    lines = [f"{'self %':>7}  function (file:line)"]
    lines += [f"{100 * n / total:6.1f}%  {_short(f)}" for f, n in own]
    lines += ["", f"{'incl %':>7}  function (thread, event-loop and ASGI frames left out)"]
    lines += [f"{100 * n / total:6.1f}%  {_short(f)}" for f, n in inclusive]
    return f"{title}, {total} samples (all threads, busy only):\n\n```\n" + "\n".join(lines) + "\n```"


def _short(frame: str) -> str:
    # py-spy frames look like "func (path/to/file.py:123)"; keep the last two path parts.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split(os.sep)
    return f"{name} ({os.sep.join(parts[-2:])})" if where else name
