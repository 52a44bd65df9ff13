"""The start of ``reloop run``'s two stage processes, with the model check done once, by the train process.

The supervising parent never imports torch (its ~480 MB would be held while the stages run), so the model
check ran in a child of its own, and only after it the two stage processes started and imported torch
again: three imports of torch in a row, about 16 s from the command to a joining stage on 2 cores, 8 of
them the check's. Now both stage processes start at once; the train process checks the model (it builds
one anyway), says so to the parent, and both wait at a gate before anything that touches Kafka or the
checkpoint folder. The parent opens the gate once the check passed and the folder is free, or prints the
refusal as its own (``reloop run: ...``, exit 2) and closes it: a stage that reads the gate's end exits 0
having done nothing.

The handshake travels over inherited pipes named in ``RELOOP_START_GATE`` (``<gate fd>`` or
``<gate fd>,<verdict fd>`` for the train process).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

GATE_ENV = "RELOOP_START_GATE"
_OK = "ok"


# ---------------------------------------------------------------------------- a stage's side
def gated() -> bool:
    """Whether this process is a stage started by ``reloop run`` behind a gate."""
    return GATE_ENV in os.environ


def _fds() -> tuple[int, int | None]:
    gate, _, verdict = os.environ[GATE_ENV].partition(",")
    return int(gate), (int(verdict) if verdict else None)


def report(refusal: str | None) -> None:
    """The train process's verdict on the model: None when it can be built, else why not (one line)."""
    _, fd = _fds()
    if fd is None:
        return
    with contextlib.suppress(OSError):  # a parent gone: its lifeline ends this process anyway
        os.write(fd, (_OK if refusal is None else "refused " + refusal.replace("\n", " ")).encode() + b"\n")
        os.close(fd)


def wait_for_go() -> bool:
    """Block until the parent opens the gate (True) or closes it (False: it refused, or it ended)."""
    fd, _ = _fds()
    try:
        return os.read(fd, 1) == b"g"
    finally:
        os.close(fd)
        del os.environ[GATE_ENV]  # not inherited by what this stage starts


# ---------------------------------------------------------------------------- the parent's side
@dataclass
class StartGate:
    """One gate per stage process, and the train process's verdict pipe."""

    _gates: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (read, write)
    _verdict: tuple[int, int] | None = None

    def child_env(self, stage: str, reports: bool) -> tuple[dict[str, str], tuple[int, ...]]:
        """The variable and the descriptors to pass to ``stage``'s process."""
        self._gates[stage] = os.pipe()
        fds = [self._gates[stage][0]]
        value = str(fds[0])
        if reports:
            self._verdict = os.pipe()
            fds.append(self._verdict[1])
            value += f",{self._verdict[1]}"
        return {GATE_ENV: value}, tuple(fds)

    def spawned(self) -> None:
        """After the children started: this process closes their ends (an end left open here would
        hide a child's exit from the reads below)."""
        for read, _ in self._gates.values():
            os.close(read)
        if self._verdict is not None:
            os.close(self._verdict[1])

    def verdict(self) -> str | None:
        """The train process's verdict: "ok", "refused <why>", or None when it ended without one (the
        pipe's write end is its alone once ``spawned``: its end is the pipe's end)."""
        assert self._verdict is not None
        fd = self._verdict[0]
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = os.read(fd, 4096)
                if not chunk:
                    return None
                data += chunk
        finally:
            os.close(fd)
            self._verdict = None
        return data.decode(errors="replace").strip()

    def open(self) -> None:
        self._end(b"g")

    def close(self) -> None:
        self._end(b"")

    def _end(self, byte: bytes) -> None:
        for stage, (_, write) in list(self._gates.items()):
            with contextlib.suppress(OSError):  # a child that already ended
                if byte:
                    os.write(write, byte)
                os.close(write)
            del self._gates[stage]


def refusal_of(verdict: str | None) -> str | None:
    """The refusal in a verdict, or None for "ok" (and for no verdict: ask the process's exit code)."""
    if verdict is None or verdict == _OK:
        return None
    return verdict.removeprefix("refused ")
