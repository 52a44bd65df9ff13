"""Shared fixtures: the real local Kafka broker (one per test process) and unique topic names.

With CI=true a broker that cannot start fails every test that needs it; elsewhere those tests are
skipped with the reason, so a laptop without Java can still run the unit tests.

The suite runs in parallel with pytest-xdist (the README's command: ``-n auto --dist loadfile``): each
test module runs in one worker, so its module-scoped fixtures are built once, and each worker that runs
a test needing the broker starts its own (topics are unique per test either way). ``--dist loadgroup``
would keep every broker test in one worker, but pytest-xdist 3.8 does not group on pytest 9.2
(pytest-xdist issue 1386).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import uuid
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest
from reloop.connectors.kafka.local_broker import BrokerError, LocalBroker

_KAFKA_OUTCOMES: dict[str, int] = {}
_BROKER_LINES: list[str] = []  # the broker's start lines, in the process that started it
_SUMMARY_LINES: dict[str, None] = {}  # those lines as reports brought them (a worker's to the controller)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(message: str) -> NoReturn:
    """A real part the tests need is missing: a failure with CI=true, a skip with the reason elsewhere."""
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message + " (CI=true makes this a failure)")


@pytest.fixture(scope="session")
def unavailable() -> Callable[[str], NoReturn]:
    """``unavailable(reason)``: fail the test with CI=true, skip it elsewhere (a broker, a tool missing)."""
    return _unavailable


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A started LocalBroker (``.bootstrap`` = "127.0.0.1:PORT"), stopped after the last test."""
    broker = LocalBroker(tmp_path_factory.mktemp("kafka-broker"))
    try:
        info = broker.start()
    except (BrokerError, OSError) as exc:
        broker.stop()
        _unavailable(f"the local Kafka broker did not start: {exc}")
    _BROKER_LINES.append(
        f"kafka_broker: Apache Kafka {info.version} from {broker.lib_dir} at {info.bootstrap} "
        f"started in {info.start_seconds:.1f} s, RSS {broker.rss_mb()} MB"
    )
    _BROKER_LINES.append(f"kafka_broker log: {broker.ready_line()}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def unique_topic() -> Callable[[str], str]:
    """``unique_topic("impressions")`` -> "impressions-3f9c2a1b7d": topics never collide across tests."""

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    return make


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.0 loads its protocol schemas with importlib.resources' legacy API; noise, not ours.
    config.addinivalue_line("filterwarnings", "ignore:read_text is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:open_text is deprecated:DeprecationWarning")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Workers share the cores: torch's default (a thread per core) in each would oversubscribe them,
        # and OpenMP's spinning threads slow each other many times over. Subprocesses choose their own.
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per CPU this process may use, its cgroup's CPU quota included (a container
    of 2 CPUs on a 64-core host gets 2 workers, not 64); PYTEST_XDIST_AUTO_NUM_WORKERS still wins."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    from reloop.engine.runtime.cpu_limit import usable_cpus

    return usable_cpus()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    if _BROKER_LINES and call.when == "teardown":
        # The broker's lines travel with a report, once: under xdist only the controller writes the summary.
        outcome.get_result().user_properties.extend(("kafka_broker_line", line) for line in _BROKER_LINES)
        _BROKER_LINES.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == "kafka_broker_line":
            _SUMMARY_LINES[value] = None
    if "kafka" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _KAFKA_OUTCOMES[report.outcome] = _KAFKA_OUTCOMES.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 (pytest's own type is private)
    for line in _SUMMARY_LINES:
        terminalreporter.write_line(line)
    if _KAFKA_OUTCOMES:
        counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(_KAFKA_OUTCOMES.items()))
        terminalreporter.write_line(f"kafka-marked tests: {counts}")


class FullDisk(io.RawIOBase):
    """A real file that takes ``room[0]`` more bytes, then fails with ENOSPC (a short write first)."""

    def __init__(self, raw: io.FileIO, room: list[int]) -> None:
        self.raw, self.room = raw, room

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.raw.seek(pos, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, data) -> int:  # noqa: ANN001 - a buffer
        if self.room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.raw.write(bytes(memoryview(data)[: self.room[0]]))
        self.room[0] -= n
        return n

    def truncate(self, size=None) -> int:  # noqa: ANN001
        return self.raw.truncate(size)

    def close(self) -> None:
        self.raw.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``full_disk(module, room, when=...)``: the files ``module`` opens for writing from now on (those
    ``when(path, mode)`` picks) sit on a disk with ``room[0]`` bytes left (a list: a test may make room);
    ``patch``: another MonkeyPatch to set it with (a ``monkeypatch.context()``)."""

    def install(
        module: object,
        room: list[int],
        when: Callable[[str, str], bool] | None = None,
        patch: pytest.MonkeyPatch | None = None,
    ) -> None:
        def fake_open(path, mode="r", buffering=-1, **kw):  # noqa: ANN001, ANN202
            if not ("a" in mode or "w" in mode) or (when is not None and not when(str(path), mode)):
                return builtins.open(path, mode, buffering, **kw)
            raw = FullDisk(io.FileIO(path, mode.replace("b", "")), room)
            return raw if buffering == 0 else io.BufferedWriter(raw)

        (patch or monkeypatch).setattr(module, "open", fake_open, raising=False)

    return install


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """The root logger's handlers and level as they were before each test. A command run in-process
    (``reloop train`` in a test) sets up its JSON logging, which replaces the root handlers with one
    writing to the test's captured stderr; once the capture closed, a later test in the same worker that
    flushed the root handlers (a forced stop's last line) failed on the closed file, depending on which
    tests xdist gave that worker before it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
