"""An embedded single-node Apache Kafka broker (KRaft), for the demo, `cxr broker` and the tests.

It is the real broker (`kafka.Kafka` from Maven Central), not an imitation: formatted into a folder of its
own, started with Java on free loopback ports, waited for until it answers, and stopped cleanly. The child
asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), so a killed demo or test run never
leaves an orphan broker holding ports.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streaming.jvm import jars, java_executable

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
"""


def free_ports(count: int, host: str = "127.0.0.1", exclude: tuple[int, ...] = ()) -> list[int]:
    """`count` distinct free ports: all held open together while choosing, so none is handed out twice."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
            if port not in exclude:
                ports.append(port)
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the parent goes away."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64. Never starting with '-', which the storage
    tool would read as an option (as Kafka's own Uuid.randomUuid avoids too)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class BrokerError(RuntimeError):
    pass


class _StartupExit(BrokerError):
    """The broker process ended while starting (most often: a port was taken meanwhile)."""


class EmbeddedBroker:
    """`with EmbeddedBroker(lib_dir) as broker: broker.bootstrap_servers`."""

    def __init__(
        self,
        lib_dir: Path,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        heap: str = "512m",
    ) -> None:
        self.lib_dir = lib_dir
        self.host = host
        self._fixed_port = port
        self.port, self.controller_port = self._choose_ports()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="cxr-kafka-"))
        self.heap = heap
        self._process: subprocess.Popen[bytes] | None = None

    def _choose_ports(self) -> tuple[int, int]:
        if self._fixed_port:
            return self._fixed_port, free_ports(1, self.host, exclude=(self._fixed_port,))[0]
        listener, controller = free_ports(2, self.host)
        return listener, controller

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> Path:
        data_dir = self.workdir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data_dir),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.retention.hours": "168",
        }
        config = self.workdir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.workdir / "log4j2.properties").write_text(_LOG4J2.format(log_file=self.log_file))
        return config

    def _java(self, main_class: str, *args: str) -> list[str]:
        classpath = ":".join(str(p) for p in jars(self.lib_dir, "kafka"))
        return [
            java_executable(),
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.workdir}",
            "-cp",
            classpath,
            main_class,
            *args,
        ]

    def start(self, timeout_s: float = 90.0, attempts: int = 3) -> EmbeddedBroker:
        """Start and wait until it answers; with ports of its own choosing, retry on a lost race for a port."""
        if self.running:
            return self
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout_s)
            except _StartupExit:
                if self._fixed_port or attempt == attempts:
                    raise
                log.info("the Kafka broker could not start on its ports; trying others")
                shutil.rmtree(self.workdir / "data", ignore_errors=True)
                self.port, self.controller_port = self._choose_ports()
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> EmbeddedBroker:
        config = self._write_config()
        cluster_id = new_cluster_id()
        fmt = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config), "--ignore-formatted"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting the Kafka storage failed: {fmt.stderr.strip() or fmt.stdout.strip()}")
        stdout = (self.workdir / "broker.stdout").open("ab")
        self._process = subprocess.Popen(
            self._java("kafka.Kafka", str(config)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the broker in order
            preexec_fn=_die_with_parent,
        )
        stdout.close()
        self._wait_ready(timeout_s)
        log.info("embedded Kafka broker ready at %s (data in %s)", self.bootstrap_servers, self.workdir)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise _StartupExit(f"the Kafka broker exited during start-up; see {self.log_file}\n{self._log_tail()}")
            if not self._accepts_connections():
                time.sleep(0.2)
                continue
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000)
            except KafkaError:
                time.sleep(0.3)
                continue
            try:
                admin.describe_cluster()
                return
            except KafkaError:
                time.sleep(0.3)
            finally:
                admin.close()
        self.stop()
        raise BrokerError(f"the Kafka broker did not answer within {timeout_s:.0f} s; see {self.log_file}")

    def _accepts_connections(self) -> bool:
        """A plain TCP probe first, so the Kafka client does not back off (and log) while the JVM starts."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        for path in (self.workdir / "broker.stdout", self.log_file):
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=30000)
        try:
            for name in names:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            admin.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM and wait (the broker shuts down cleanly), SIGKILL if it will not go."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
