"""An embedded single-node Apache Kafka broker (KRaft), for the demo, `cxr broker` and the tests.

It is the real broker (`kafka.Kafka` from Maven Central), not an imitation: formatted into a folder of its
own, started with Java on free loopback ports, waited for until it answers, and stopped cleanly. The child
asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), so a killed demo or test run never
leaves an orphan broker holding ports.

A work folder is a broker's identity. Started again on a folder it used before (a restarted `cxr broker
--data-dir DIR`, a fault test that stops it for a while), it keeps that folder's cluster id (formatting is
skipped once `meta.properties` exists: a new cluster id would be refused by the storage tool) and the ports
it remembered in `ports.json`, so topics, messages and the bootstrap address that clients hold all survive.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streaming.cores import available_cores
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


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def spawn_tied(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Popen of a child that the kernel kills (SIGKILL) when this process dies, however it dies: an embedded
    broker or PACS must not outlive a `cxr demo` killed with -9 and keep its ports. The fork happens on one
    thread that lives as long as the process.

    The kernel sends PR_SET_PDEATHSIG when the *thread* that forked the child ends, not the process: a broker
    started from a short-lived thread (a timer that brings it back after an outage) would be killed as soon
    as that thread returned."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-broker-spawner")
        spawner = _spawner
    return spawner.submit(_popen, args, kwargs).result()


def _popen(args: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, preexec_fn=_die_with_parent, **kwargs)


def default_partitions() -> int:
    """Partitions of the topics the embedded broker creates: one per core, so a consumer group (or Spark
    without `minPartitions`) can use every core. The scoring job splits input by cores whatever this is."""
    return available_cores()


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64. Never starting with '-', which the storage
    tool would read as an option (as Kafka's own Uuid.randomUuid avoids too)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def parse_properties(text: str) -> dict[str, str]:
    """`key=value` lines of a Java properties file as Kafka writes them (comments and blanks skipped)."""
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return props


def formatted_cluster_id(data_dir: Path) -> str | None:
    """The cluster id a formatted log folder belongs to; None when it was never formatted."""
    meta = data_dir / "meta.properties"
    try:
        text = meta.read_text()
    except FileNotFoundError:
        return None
    cluster_id = parse_properties(text).get("cluster.id")
    if not cluster_id:
        raise BrokerError(f"{meta} names no cluster.id: the folder is damaged; move it away to start afresh")
    return cluster_id


PORTS_FILE = "ports.json"


def parse_ports(text: str) -> tuple[int, int] | None:
    """(listener, controller) from a ports file's text; None when it does not hold two valid ports."""
    try:
        data = json.loads(text)
        listener, controller = int(data["listener"]), int(data["controller"])
    except (ValueError, TypeError, KeyError):
        return None
    if not (0 < listener < 65536 and 0 < controller < 65536) or listener == controller:
        return None
    return listener, controller


def remembered_ports(workdir: Path) -> tuple[int, int] | None:
    """The ports a broker last served this work folder on, if it remembered them."""
    path = workdir / PORTS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    ports = parse_ports(text)
    if ports is None:
        log.warning("ignoring %s: it does not hold a listener and a controller port", path)
    return ports


def remember_ports(workdir: Path, listener: int, controller: int) -> None:
    """Written to a temporary name and renamed, so a crash never leaves half a file behind."""
    path = workdir / PORTS_FILE
    tmp = path.with_name(f".{PORTS_FILE}.tmp")
    tmp.write_text(json.dumps({"listener": listener, "controller": controller}) + "\n")
    os.replace(tmp, path)


def plan_ports(
    fixed: int | None, remembered: tuple[int, int] | None, pick_free: Callable[[int, tuple[int, ...]], list[int]]
) -> tuple[int, int]:
    """(listener, controller): a fixed listener port wins; otherwise what this folder remembered; else free ones.

    `pick_free(count, exclude)` hands out free ports (the I/O stays with the caller)."""
    if fixed:
        if remembered is not None and remembered[1] != fixed:
            return fixed, remembered[1]
        return fixed, pick_free(1, (fixed,))[0]
    if remembered is not None:
        return remembered
    listener, controller = pick_free(2, ())
    return listener, controller


class BrokerError(RuntimeError):
    pass


class _StartupExit(BrokerError):
    """The broker process ended while starting (most often: a port was taken meanwhile)."""


class EmbeddedBroker:
    """`with EmbeddedBroker(lib_dir) as broker: broker.bootstrap_servers`.

    `stop()` then `start()` (or `restart(downtime_s)`) brings the same broker back on the same folder and
    address, with its topics and messages; so does a new `EmbeddedBroker` on that folder. A work folder the
    caller names is never deleted; a temporary one of its own goes with `stop()` (unless `keep_workdir`).
    """

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
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="cxr-kafka-"))
        remembered = remembered_ports(self.workdir)
        #: Ports this folder was served on before: a restart must come back on them, not on others.
        self._ports_settled = remembered is not None
        self.port, self.controller_port = plan_ports(port, remembered, self._pick_free)
        self.heap = heap
        self._process: subprocess.Popen[bytes] | None = None

    def _pick_free(self, count: int, exclude: tuple[int, ...]) -> list[int]:
        return free_ports(count, self.host, exclude=exclude)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_file(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> Path:
        data_dir = self.data_dir
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
        """Start and wait until it answers; on a folder used before, with its data and on its ports.

        Only a first start on ports of its own choosing may lose a race for a port and try others; a restart
        waits for its remembered ports instead, since clients will look for it there."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            if self._ports_settled:
                self._wait_for_ports(timeout_s=15.0)
            fresh = formatted_cluster_id(self.data_dir) is None
            try:
                self._start_once(timeout_s)
            except _StartupExit:
                if self._fixed_port or self._ports_settled or attempt == attempts:
                    raise
                log.info("the Kafka broker could not start on its ports; trying others")
                if fresh:  # nothing of value yet: format again for the new ports
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                self.port, self.controller_port = plan_ports(None, None, self._pick_free)
                continue
            remember_ports(self.workdir, self.port, self.controller_port)
            self._ports_settled = True
            return self
        raise AssertionError("unreachable")

    def restart(self, downtime_s: float = 0.0, timeout_s: float = 90.0) -> EmbeddedBroker:
        """Stop, stay away `downtime_s` (an outage for fault tests), start again on the same folder and ports."""
        self.stop(keep_workdir=True)
        time.sleep(downtime_s)
        return self.start(timeout_s)

    def _wait_for_ports(self, timeout_s: float) -> None:
        """A restart right after a stop may find the old process still letting go of its sockets."""
        deadline = time.monotonic() + timeout_s
        while True:
            busy = [p for p in (self.port, self.controller_port) if not port_is_free(p, self.host)]
            if not busy:
                return
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"port {busy[0]}, which the Kafka data in {self.workdir} was served on ({PORTS_FILE}), is in "
                    "use by another process; stop it, or choose the listener port (cxr broker --port N)"
                )
            time.sleep(0.2)

    def _format_storage(self, config: Path) -> None:
        """Format a new folder; a formatted one keeps its cluster id (the storage tool refuses a new one)."""
        cluster_id = formatted_cluster_id(self.data_dir)
        if cluster_id is not None:
            log.info("reusing the Kafka data in %s (cluster %s)", self.data_dir, cluster_id)
            return
        fmt = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", new_cluster_id(), "-c", str(config)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting the Kafka storage failed: {fmt.stderr.strip() or fmt.stdout.strip()}")

    def _start_once(self, timeout_s: float) -> EmbeddedBroker:
        config = self._write_config()
        self._format_storage(config)
        stdout = (self.workdir / "broker.stdout").open("ab")
        self._process = spawn_tied(
            self._java("kafka.Kafka", str(config)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the broker in order
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
        """Topics with `partitions` partitions each (replication 1: one broker); existing ones are kept."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=30000)
        try:
            for name in names:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            admin.close()

    def stop(self, timeout_s: float = 30.0, *, keep_workdir: bool = False) -> None:
        """SIGTERM and wait (the broker shuts down cleanly), SIGKILL if it will not go.

        A work folder the caller named stays, to be started again; a temporary one of its own is removed
        unless `keep_workdir`."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self._own_workdir and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._ports_settled = False

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
