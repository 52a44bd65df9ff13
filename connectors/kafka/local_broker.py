"""A real single-node Apache Kafka broker (KRaft) run from the jars that ``deploy/kafka/pom.xml`` pulls from
Maven Central: for tests, CI and the local demo. No tarball, no Docker, no mock.

Kafka home (pom.xml, log4j2.xml and the jars in lib/): ``deploy/kafka`` in a checkout; in an installed
wheel, ``~/.cache/reloop/kafka`` (``$XDG_CACHE_HOME/reloop/kafka``) with copies of the pom and log4j2
config the wheel ships (engine/resources.py).

State folder layout (everything the broker writes stays there)::

    <state_dir>/server.properties   generated config (ports, log.dirs)
    <state_dir>/data/                KRaft metadata log + topic data
    <state_dir>/broker.log           broker stdout/stderr (log4j2 console appender)
    <state_dir>/broker.json          pid, ports, version, start time: how `reloop kafka status/down` find it

Example (needs Java 17 and Maven)::

    broker = LocalBroker(Path("/tmp/k"))
    broker.start()           # a few seconds
    broker.bootstrap         # "127.0.0.1:41234"
    broker.stop()
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from reloop.engine.resources import deploy_file, user_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_HOME = REPO_ROOT / "deploy" / "kafka"
READY_LINE = "Kafka Server started"
_MARKER = ".complete"
_JAR_VERSION = re.compile(r"^kafka_2\.\d+-(?P<version>[\w.\-]+)\.jar$")


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """TLS for the client listener (SSL, or SASL_SSL with ``sasl_plain``), as PEM files (Kafka's
    ssl.keystore.type=PEM): ``keystore`` holds the broker's private key (PKCS#8, unencrypted) and then its
    certificate chain; ``cafile`` the CA certificates the broker's clients trust (and the broker trusts
    for client certificates). ``client_auth``: require a client certificate signed by that CA (mutual TLS).
    """

    keystore: Path
    cafile: Path
    client_auth: bool = False


class BrokerError(RuntimeError):
    """The broker could not be fetched, started or reached; the message says why (with the log tail)."""


def default_kafka_home() -> Path:
    """``deploy/kafka`` in a checkout (the jars in ``deploy/kafka/lib``, as the README says); otherwise
    ``<user cache>/kafka``, where the installed pom.xml and log4j2.xml are copied (refreshed when the
    installed ones change, so an upgrade re-fetches the jars) and ``reloop kafka fetch`` puts the jars."""
    if (KAFKA_HOME / "pom.xml").is_file():
        return KAFKA_HOME
    home = user_cache_dir() / "kafka"
    try:
        home.mkdir(parents=True, exist_ok=True)
        for name in ("pom.xml", "log4j2.xml"):
            data = deploy_file(f"kafka/{name}").read_bytes()
            target = home / name
            if not target.is_file() or target.read_bytes() != data:
                tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
    except OSError as exc:
        raise BrokerError(f"cannot set up the Kafka folder {home}: {exc}") from exc
    return home


@dataclass(frozen=True, slots=True)
class BrokerInfo:
    """What ``broker.json`` records about a started broker."""

    pid: int
    port: int
    controller_port: int
    version: str
    cluster_id: str
    started_at: float
    start_seconds: float
    log_path: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True, slots=True)
class BrokerStatus:
    running: bool
    info: BrokerInfo | None
    reachable: bool
    rss_mb: float | None
    detail: str


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (free now; a tiny race remains, as with any such scheme)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_cluster_id() -> str:
    """A random KRaft cluster id (22 url-safe base64 characters).

    Never one that starts with "-": the storage tool's argument parser would take it for an option
    (Kafka's own Uuid.randomUuid() skips those for the same reason; 1 id in 64 would fail).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The broker binds with SO_REUSEADDR, so connections of its previous run still in TIME_WAIT do
        # not block it; check the same way, or a restart would move to a new port for no reason.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    """preexec hook: the kernel sends SIGTERM to the broker when the process that started it dies,
    so a killed test run never leaves an orphan broker behind."""
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalBroker:
    """One KRaft broker+controller process on 127.0.0.1 with its state under ``state_dir``.

    ``port``/``controller_port`` default to the ports of the previous run in the same state folder when
    they are still free (restarts keep the bootstrap address), else to fresh free ports.
    ``kafka_home`` defaults to ``default_kafka_home()``. ``detached=True`` lets the broker outlive this
    Python process (``reloop kafka up``); otherwise the broker is terminated when its parent dies (Linux
    PR_SET_PDEATHSIG, which fires when the *thread* that called ``start`` exits: start a non-detached
    broker from a thread that outlives it). Either way it runs in a session of its own: signals to the
    owner's process group (a terminal's Ctrl-C) do not reach it, and the owner stops it.
    ``sasl_plain=(username, password)``: the client (and inter-broker) listener requires SASL/PLAIN with
    that user instead of PLAINTEXT. ``tls``: that listener speaks TLS (SSL, or SASL_SSL with
    ``sasl_plain``) with the broker's key and certificate of ``tls``.
    """

    def __init__(
        self,
        state_dir: Path | str,
        port: int | None = None,
        *,
        controller_port: int | None = None,
        kafka_home: Path | str | None = None,
        heap_mb: int = 512,
        java: str = "java",
        detached: bool = False,
        sasl_plain: tuple[str, str] | None = None,
        tls: BrokerTls | None = None,
    ) -> None:
        if sasl_plain is not None and any(not part or re.search(r'["\\\s]', part) for part in sasl_plain):
            raise ValueError("sasl_plain: a non-empty user and password without quotes, backslashes, spaces")
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.controller_port = controller_port
        self.kafka_home = Path(kafka_home).resolve() if kafka_home is not None else default_kafka_home()
        self.heap_mb = heap_mb
        self.java = java
        self.detached = detached
        self.sasl_plain = sasl_plain
        self.tls = tls
        self._proc: subprocess.Popen[bytes] | None = None
        self._info: BrokerInfo | None = None
        self._lock_depth = 0

    # ----------------------------------------------------------------------------------------- paths
    @property
    def lib_dir(self) -> Path:
        return self.kafka_home / "lib"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "broker.log"

    @property
    def info_path(self) -> Path:
        return self.state_dir / "broker.json"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "server.properties"

    @property
    def lock_path(self) -> Path:
        return self.state_dir / "broker.lock"

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold ``<state_dir>/broker.lock`` (flock): one start or stop at a time per state folder.

        Without it two shells running `reloop kafka up` both saw no broker, overwrote each other's
        server.properties, formatted the storage twice and launched two JVMs on one data dir: both failed.
        Re-entrant within this object, so the CLI can hold it around its status check and ``start``.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:  # not inherited by the broker (close_fds)
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------------ jars
    def ensure_jars(self) -> Path:
        """Copy the broker jars into ``lib/`` with Maven unless ``lib/`` already matches the pom.

        The marker file holds the pom's sha256, so a second call downloads nothing, and editing the pom
        (a Kafka upgrade) wipes the old jars instead of mixing two versions on the classpath.
        """
        pom = self.kafka_home / "pom.xml"
        if not pom.is_file():
            raise BrokerError(f"no Kafka pom at {pom}")
        # One fetch at a time per Kafka home (every state folder and test run shares it): a second
        # process must not wipe lib/ under a Maven run of the first, nor see its marker-less half copy.
        try:
            lock = open(self.kafka_home / ".fetch.lock", "a")  # noqa: SIM115 - closed below
        except OSError as exc:
            if self._fetched(pom):  # a read-only folder with the jars in it: nothing to write, no lock
                return self.lib_dir
            raise BrokerError(f"cannot lock the Kafka folder {self.kafka_home}: {exc}") from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._ensure_jars_locked(pom)

    def _fetched(self, pom: Path) -> bool:
        """Whether ``lib/`` holds a complete fetch of this pom (its marker, written last, names it)."""
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()
        marker = self.lib_dir / _MARKER
        return marker.is_file() and marker.read_text().strip() == digest and self._kafka_jar() is not None

    def _ensure_jars_locked(self, pom: Path) -> Path:
        if self._fetched(pom):
            return self.lib_dir
        digest = hashlib.sha256(pom.read_bytes()).hexdigest()
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError(
                "Maven ('mvn') is not on PATH; it is needed once to fetch the Kafka jars "
                "(install it, e.g. `apt-get install maven` or `brew install maven`)"
            )
        if self.lib_dir.exists():
            shutil.rmtree(self.lib_dir)
        cmd = [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or self._kafka_jar() is None:
            output = f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
            raise BrokerError(f"{' '.join(cmd)} failed ({done.returncode}):\n{output}")
        (self.lib_dir / _MARKER).write_text(digest + "\n")
        return self.lib_dir

    def _kafka_jar(self) -> Path | None:
        if not self.lib_dir.is_dir():
            return None
        return next((p for p in sorted(self.lib_dir.iterdir()) if _JAR_VERSION.match(p.name)), None)

    @property
    def version(self) -> str:
        """The Kafka version of the jars on the classpath (e.g. "4.4.0")."""
        if self._info is not None:
            return self._info.version
        jar = self._kafka_jar()
        if jar is None:
            raise BrokerError(f"no kafka_2.13-*.jar in {self.lib_dir}; run `reloop kafka fetch`")
        match = _JAR_VERSION.match(jar.name)
        assert match is not None
        return match.group("version")

    @property
    def security_protocol(self) -> str:
        """The protocol of the client listener: PLAINTEXT, SASL_PLAINTEXT, SSL or SASL_SSL."""
        transport = "SSL" if self.tls is not None else "PLAINTEXT"
        return transport if self.sasl_plain is None else f"SASL_{transport}"

    @property
    def client_settings(self) -> dict[str, str]:
        """The kafka-python connection settings a client of this broker needs (empty for PLAINTEXT); with
        ``tls.client_auth`` the broker's own key and certificate serve as the client certificate."""
        out: dict[str, str] = {}
        if self.sasl_plain is not None:
            username, password = self.sasl_plain
            out |= {"sasl_mechanism": "PLAIN", "sasl_plain_username": username}
            out["sasl_plain_password"] = password
        if self.tls is not None:
            out["ssl_cafile"] = str(self.tls.cafile)
            if self.tls.client_auth:
                out["ssl_certfile"] = str(self.tls.keystore)  # key and chain in one file: ssl accepts it
        return {"security_protocol": self.security_protocol, **out} if out else {}

    # --------------------------------------------------------------------------------- lifecycle
    @property
    def bootstrap(self) -> str:
        if self._info is None:
            raise BrokerError("the broker is not started")
        return self._info.bootstrap

    @property
    def info(self) -> BrokerInfo | None:
        return self._info

    @property
    def pid(self) -> int | None:
        return None if self._info is None else self._info.pid

    def start(self, timeout_s: float = 90.0) -> BrokerInfo:
        """Format storage if new, start the broker, and return once it answers a metadata request."""
        with self.exclusive():
            return self._start(timeout_s)

    def _start(self, timeout_s: float) -> BrokerInfo:
        if self.status().running:
            raise BrokerError(f"a broker already runs from {self.state_dir} (pid {self.pid})")
        if self.port is not None and not _port_is_free(self.port):
            # Say so before formatting anything; otherwise the JVM dies with a BindException deep in
            # its stack trace.
            raise BrokerError(
                f"port {self.port} on 127.0.0.1 is already in use{_listener(self.port)}: "
                "choose another port, or stop what listens there"
            )
        if shutil.which(self.java) is None:
            raise BrokerError(
                f"{self.java!r} is not on PATH: the local Kafka broker needs Java 17+ "
                "(install a JDK or JRE 17 or newer, e.g. `apt-get install openjdk-17-jre-headless`)"
            )
        self.ensure_jars()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        previous = _read_info(self.info_path)
        port = self.port or _reuse(previous.port if previous else None) or free_port()
        controller_port = self.controller_port or _reuse(previous.controller_port if previous else None)
        controller_port = controller_port or free_port()
        if controller_port == port:
            controller_port = free_port()
        # Owner-only: with SASL it holds the users' passwords (the JAAS line).
        self.config_path.touch(mode=0o600)
        self.config_path.chmod(0o600)
        self.config_path.write_text(self._server_properties(port, controller_port))
        began = time.monotonic()
        cluster_id = self._format_storage()

        if self.log_path.exists():
            self.log_path.replace(self.state_dir / "broker.previous.log")
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self._java_cmd("kafka.Kafka", str(self.config_path), heap=f"-Xmx{self.heap_mb}m", xms=True),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state_dir,
                # Always a session of its own: a Ctrl-C to the owner's group (a terminal's) reached the
                # broker too, so `reloop demo` stopped its trainers against a broker already gone.
                # The owner stops it last; PDEATHSIG still ends it with a non-detached owner.
                start_new_session=True,
                preexec_fn=None if self.detached else _die_with_parent,
            )
        try:
            self._wait_ready(port, began + timeout_s)
            info = BrokerInfo(
                pid=self._proc.pid,
                port=port,
                controller_port=controller_port,
                version=self.version,
                cluster_id=cluster_id,
                started_at=time.time(),
                start_seconds=round(time.monotonic() - began, 3),
                log_path=str(self.log_path),
            )
            self.info_path.write_text(json.dumps(asdict(info), indent=2) + "\n")
        except BaseException:
            # Also on an interrupt: a broker nobody recorded in broker.json could not be found by
            # `status`/`down`, and would hold the data dir's lock against every later `up`.
            self._terminate(self._proc.pid, 10.0)
            raise
        self._info = info
        return info

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM (Kafka's clean shutdown), wait, SIGKILL after ``timeout_s``; True if one was stopped."""
        if not self.state_dir.is_dir() and self._proc is None:
            return False  # never started here; do not create the folder just to lock it
        # Under the start lock: a `down` during another shell's `up` waits for it, then stops that broker.
        with self.exclusive():
            return self._stop(timeout_s)

    def _stop(self, timeout_s: float) -> bool:
        info = self._info or _read_info(self.info_path)
        stopped = False
        if info is not None and _is_broker_process(info.pid, self.config_path):
            stopped = self._terminate(info.pid, timeout_s)
        if self._proc is not None:
            self._proc.poll()
            self._proc = None
        # broker.json stays: the next start reuses its ports so the bootstrap address survives down/up.
        self._info = None
        return stopped

    def status(self) -> BrokerStatus:
        """Whether the broker recorded in the state folder is alive, and whether it answers metadata."""
        info = self._info or _read_info(self.info_path)
        if info is None:
            return BrokerStatus(False, None, False, None, f"no broker recorded in {self.state_dir}")
        if not _is_broker_process(info.pid, self.config_path):
            # The same after a clean `down` as after a crash ("is gone" read as a crash): its log tells.
            return BrokerStatus(
                False, info, False, None,
                f"the broker last started here (pid {info.pid}, {info.bootstrap}) is not running (its log: "
                f"{info.log_path}); `reloop kafka up` starts it again at the same address",
            )  # fmt: skip
        self._info = info
        reachable, detail = _metadata_ok(info.bootstrap, timeout_s=10.0, client_config=self.client_settings)
        return BrokerStatus(True, info, reachable, self.rss_mb(), detail)

    def rss_mb(self) -> float | None:
        """Resident memory of the broker JVM in MB (None when not running)."""
        pid = self.pid
        if pid is None:
            return None
        try:
            return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        except psutil.Error:
            return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no broker log)"

    def ready_line(self) -> str | None:
        """The broker's own 'Kafka Server started' log line (proof it ran from the project's jars)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
            return next((ln for ln in lines if READY_LINE in ln), None)
        except FileNotFoundError:
            return None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------ helpers
    def _java_cmd(self, main: str, *args: str, heap: str, xms: bool = False) -> list[str]:
        cmd = [self.java, heap]
        if xms:
            # Small-footprint flags: one GC thread, C1 only (fast start, a few hundred MB); the broker is
            # a dev/CI tool here, not a production deployment.
            cmd += ["-Xms128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError"]
        cmd += [
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.kafka_home / 'log4j2.xml'}",
            "-cp",
            f"{self.lib_dir}/*",
            main,
            *args,
        ]
        return cmd

    def _format_storage(self) -> str:
        meta = self.data_dir / "meta.properties"
        if meta.is_file():
            # Already formatted: keep its cluster id (and the topics) across down/up.
            match = re.search(r"^cluster\.id=(.+)$", meta.read_text(), re.MULTILINE)
            if match:
                return match.group(1).strip()
        cluster_id = new_cluster_id()
        cmd = self._java_cmd(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.config_path),
            "--ignore-formatted",
            heap="-Xmx256m",
        )
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.state_dir)
        if done.returncode != 0:
            raise BrokerError(f"formatting storage failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return cluster_id

    def _server_properties(self, port: int, controller_port: int) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "1",
            "num.io.threads": "2",
            "log.cleaner.dedupe.buffer.size": "2097152",
        }
        protocol = self.security_protocol
        if protocol != "PLAINTEXT":
            name = protocol.lower()
            props |= {
                "listeners": f"{protocol}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
                "advertised.listeners": f"{protocol}://127.0.0.1:{port}",
                "inter.broker.listener.name": protocol,
                "listener.security.protocol.map": f"CONTROLLER:PLAINTEXT,{protocol}:{protocol}",
            }
        if self.sasl_plain is not None:
            user, password = self.sasl_plain
            props |= {
                "sasl.enabled.mechanisms": "PLAIN",
                "sasl.mechanism.inter.broker.protocol": "PLAIN",
                # username/password: what the broker itself logs in with; user_<name>: the users it accepts.
                f"listener.name.{name}.plain.sasl.jaas.config": (
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    # The option name is quoted as well: unquoted, a user such as "alice@example.com"
                    # ends the JAAS token at "@" and the broker dies at startup.
                    f'username="{user}" password="{password}" "user_{user}"="{password}";'
                ),
            }
        if self.tls is not None:
            # The broker is also a client of this listener (inter-broker): it presents the same key and
            # certificate and trusts the same CA.
            props |= {
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self.tls.keystore),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(self.tls.cafile),
                "ssl.client.auth": "required" if self.tls.client_auth else "none",
            }
        return "".join(f"{k}={_properties_ascii(v)}\n" for k, v in props.items())

    def _wait_ready(self, port: int, deadline: float) -> None:
        assert self._proc is not None
        while READY_LINE not in self.log_path.read_text(errors="replace"):
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"the broker exited with {self._proc.returncode} (log: {self.log_path}):\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BrokerError(f"no '{READY_LINE}' in {self.log_path} in time:\n{self.log_tail()}")
            time.sleep(0.1)
        # The log line says the server object started; a metadata round trip says clients can use it.
        while True:
            timeout_s = max(1.0, deadline - time.monotonic())
            ok, detail = _metadata_ok(
                f"127.0.0.1:{port}", timeout_s=timeout_s, client_config=self.client_settings
            )
            if ok:
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise BrokerError(f"the broker does not answer metadata: {detail}\n{self.log_tail()}")
            time.sleep(0.2)

    @staticmethod
    def _terminate(pid: int, timeout_s: float) -> bool:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        except psutil.NoSuchProcess:
            return False
        return True


def _properties_ascii(value: str) -> str:
    """``value`` with every non-ASCII character as a \\uXXXX escape: Java reads a .properties file as
    ISO-8859-1, so a UTF-8 "ä" in a SASL password would reach the broker as two other characters."""
    if value.isascii():
        return value
    units = value.encode("utf-16-be")  # surrogate pairs for characters beyond the BMP, as Java wants
    chars = (int.from_bytes(units[i : i + 2], "big") for i in range(0, len(units), 2))
    return "".join(chr(c) if c < 128 else f"\\u{c:04x}" for c in chars)


def _listener(port: int) -> str:
    """Who listens on the port, as ' (pid 123: java)', when the OS tells us (else an empty string)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f" (pid {conn.pid}: {psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


def _reuse(port: int | None) -> int | None:
    return port if port is not None and _port_is_free(port) else None


def _read_info(path: Path) -> BrokerInfo | None:
    try:
        return BrokerInfo(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _is_broker_process(pid: int, config_path: Path) -> bool:
    """Alive, not a zombie, and the Kafka JVM of this state folder (never signal a recycled pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
        return "kafka.Kafka" in cmdline and str(config_path) in cmdline
    except psutil.Error:
        return False


def _metadata_ok(
    bootstrap: str, timeout_s: float, client_config: dict[str, str] | None = None
) -> tuple[bool, str]:
    """A real client round trip: the cluster must list an unfenced broker."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError
    from reloop.connectors.kafka.client_start import start_client

    timeout_ms = int(max(timeout_s, 1.0) * 1000)
    try:
        admin = start_client(
            KafkaAdminClient,
            probe=False,  # a readiness probe of a broker still starting: no warning
            bootstrap_servers=bootstrap,
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
            **(client_config or {}),
        )
    except (KafkaError, OSError) as exc:
        return False, f"cannot connect to {bootstrap}: {exc!r}"
    try:
        cluster = admin.describe_cluster()
    except (KafkaError, OSError) as exc:
        return False, f"metadata request to {bootstrap} failed: {exc!r}"
    finally:
        admin.close()
    brokers = [b for b in cluster.get("brokers", []) if not b.get("is_fenced", False)]
    if not brokers:
        return False, f"no unfenced broker in the metadata of {bootstrap}"
    return True, f"cluster {cluster.get('cluster_id')} answers with {len(brokers)} broker(s)"


def read_bootstrap(state_dir: Path | str) -> str | None:
    """The bootstrap address of the broker recorded in ``state_dir`` if it is alive, else None.

    For other commands (demo, run) that want to find the broker `reloop kafka up` started.
    """
    state = Path(state_dir).resolve()
    info = _read_info(state / "broker.json")
    if info is None or not _is_broker_process(info.pid, state / "server.properties"):
        return None
    return info.bootstrap
