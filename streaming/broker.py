"""An embedded single-node Apache Kafka broker (KRaft), for the demo, `cxr broker` and the tests.

It is the real broker (`kafka.Kafka` from Maven Central), not an imitation: formatted into a folder of its
own, started with Java on free loopback ports, waited for until it answers, and stopped cleanly. The child
asks the kernel to kill it when its parent dies (PR_SET_PDEATHSIG), so a killed demo or test run never
leaves an orphan broker holding ports.

A work folder is a broker's identity. Started again on a folder it used before (a restarted `cxr broker
--data-dir DIR`, a fault test that stops it for a while), it keeps that folder's cluster id (formatting is
skipped once `meta.properties` exists: a new cluster id would be refused by the storage tool) and the ports
it remembered in `ports.json`, so topics, messages and the bootstrap address that clients hold all survive.

`KafkaCluster` is the same broker grown to N nodes on loopback (`cxr broker --nodes 3`, the replication
fault test): each node an `EmbeddedBroker` in its own JVM and folder, all of them combined broker and
controller with one controller quorum and one cluster id, topics replicated three times with
`min.insync.replicas=2`, so that one broker can die without an acknowledged write being lost or new writes
refused. Its nodes can be killed and restarted one at a time.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from kafka import KafkaAdminClient
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


def plan_cluster_ports(
    nodes: int,
    fixed: int | None,
    remembered: Sequence[tuple[int, int] | None],
    pick_free: Callable[[int, tuple[int, ...]], list[int]],
) -> list[tuple[int, int]]:
    """(listener, controller) of each node of a cluster, all distinct: the peers' controller ports are part
    of every node's configuration, so they are planned together, before any node starts.

    A fixed first listener port gives the nodes consecutive ones (9092, 9093, 9094); otherwise a node keeps
    what its folder remembered, and the rest are free ports that nobody else in the plan holds."""
    planned: list[tuple[int, int]] = []
    taken: set[int] = set(range(fixed, fixed + nodes)) if fixed else set()
    taken.update(p for pair in remembered if pair is not None for p in pair)

    def pick(count: int) -> list[int]:
        ports = pick_free(count, tuple(sorted(taken)))
        taken.update(ports)
        return ports

    for index in range(nodes):
        mine = remembered[index] if index < len(remembered) else None
        if fixed:
            listener = fixed + index
            keep = mine is not None and mine[1] not in range(fixed, fixed + nodes)
            planned.append((listener, mine[1] if keep and mine is not None else pick(1)[0]))
        elif mine is not None:
            planned.append(mine)
        else:
            listener, controller = pick(2)
            planned.append((listener, controller))
    return planned


def replication(nodes: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for `nodes` brokers: 3 and 2 from three nodes up, so that
    with acks=all one broker may die without losing an acknowledged write and without refusing new ones."""
    return min(3, nodes), (2 if nodes >= 3 else 1)


def quorum_voters(host: str, controller_ports: Mapping[int, int]) -> str:
    """`controller.quorum.voters` for nodes {node id: controller port}, all on `host`."""
    return ",".join(f"{node_id}@{host}:{port}" for node_id, port in sorted(controller_ports.items()))


def broker_properties(
    *, node_id: int, host: str, port: int, controller_port: int, voters: str, data_dir: Path, nodes: int = 1
) -> dict[str, str]:
    """One node's server.properties: combined broker and controller, with the cluster's replication for
    the topics it creates itself (consumer offsets, transactions, share groups) and by default."""
    factor, min_isr = replication(nodes)
    return {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": voters,
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "default.replication.factor": str(factor),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(factor),
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": str(factor),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(factor),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "unclean.leader.election.enable": "false",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "log.retention.hours": "168",
    }


def create_topics(
    bootstrap_servers: str,
    names: Iterable[str],
    partitions: int = 1,
    replication_factor: int = 1,
    configs: Mapping[str, str] | None = None,
) -> None:
    """Topics with `partitions` partitions each, replicated `replication_factor` times; existing ones are kept.

    Returns once every partition has a leader in the metadata: the controller accepts a topic before the
    brokers know it, and a client told "ready" must not find it missing."""
    names = list(names)
    spec = {"num_partitions": partitions, "replication_factor": replication_factor, "configs": dict(configs or {})}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=30000)
    try:
        for name in names:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics({name: spec})
        admin.wait_for_topics(names, timeout_ms=30000)
    finally:
        admin.close()


class Quorum(Protocol):
    """What a node shares with its peers: the cluster id it is formatted with, how many nodes there are and
    the controller quorum they vote in."""

    @property
    def cluster_id(self) -> str: ...

    @property
    def size(self) -> int: ...

    def voters(self) -> str: ...


class BrokerError(RuntimeError):
    pass


class _StartupExit(BrokerError):
    """The broker process ended while starting (most often: a port was taken meanwhile)."""


class EmbeddedBroker:
    """`with EmbeddedBroker(lib_dir) as broker: broker.bootstrap_servers`.

    `stop()` then `start()` (or `restart(downtime_s)`) brings the same broker back on the same folder and
    address, with its topics and messages; so does a new `EmbeddedBroker` on that folder. A work folder the
    caller names is never deleted; a temporary one of its own goes with `stop()` (unless `keep_workdir`).

    Alone it is a cluster of one (node 1, its own quorum). As a node of a `KafkaCluster` it is given its
    node id, both ports and the `Quorum` it belongs to; the cluster plans those, so the node never picks
    ports of its own.
    """

    def __init__(
        self,
        lib_dir: Path,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        heap: str = "512m",
        node_id: int = 1,
        controller_port: int | None = None,
        quorum: Quorum | None = None,
        jvm_options: Sequence[str] = (),
    ) -> None:
        self.lib_dir = lib_dir
        self.host = host
        self.jvm_options = tuple(jvm_options)
        self.node_id = node_id
        self.quorum = quorum
        self._fixed_port = port
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="cxr-kafka-"))
        remembered = remembered_ports(self.workdir)
        #: Ports this folder was served on before: a restart must come back on them, not on others.
        self._ports_settled = remembered is not None
        if port and controller_port:
            self.port, self.controller_port = port, controller_port
        else:
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

    def _voters(self) -> str:
        if self.quorum is not None:
            return self.quorum.voters()
        return quorum_voters(self.host, {self.node_id: self.controller_port})

    def _write_config(self) -> Path:
        data_dir = self.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        props = broker_properties(
            node_id=self.node_id,
            host=self.host,
            port=self.port,
            controller_port=self.controller_port,
            voters=self._voters(),
            data_dir=data_dir,
            nodes=self.quorum.size if self.quorum is not None else 1,
        )
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
            *self.jvm_options,
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
        for attempt in range(1, attempts + 1):
            fresh = formatted_cluster_id(self.data_dir) is None
            try:
                self.launch()
                self.wait_ready(timeout_s)
            except _StartupExit:
                if self._fixed_port or self._ports_settled or attempt == attempts:
                    raise
                log.info("the Kafka broker could not start on its ports; trying others")
                if fresh:  # nothing of value yet: format again for the new ports
                    shutil.rmtree(self.data_dir, ignore_errors=True)
                self.port, self.controller_port = plan_ports(None, None, self._pick_free)
                continue
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
        """Format a new folder; a formatted one keeps its cluster id (the storage tool refuses a new one).

        A node of a cluster is formatted with the cluster's id, and refuses a folder of another cluster."""
        cluster_id = formatted_cluster_id(self.data_dir)
        if cluster_id is not None:
            if self.quorum is not None and cluster_id != self.quorum.cluster_id:
                raise BrokerError(
                    f"{self.data_dir} belongs to Kafka cluster {cluster_id}, not to {self.quorum.cluster_id}: "
                    "move it away to start afresh"
                )
            log.info("reusing the Kafka data in %s (cluster %s)", self.data_dir, cluster_id)
            return
        new_id = self.quorum.cluster_id if self.quorum is not None else new_cluster_id()
        fmt = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", new_id, "-c", str(config)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if fmt.returncode != 0:
            raise BrokerError(f"formatting the Kafka storage failed: {fmt.stderr.strip() or fmt.stdout.strip()}")

    def launch(self) -> None:
        """Configure, format if new, and spawn the JVM without waiting for it (`wait_ready` does): a cluster
        launches all its nodes first, since none is ready before a majority of the quorum runs."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._ports_settled:
            self._wait_for_ports(timeout_s=15.0)
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

    def wait_ready(self, timeout_s: float) -> None:
        """Until this node is a registered, unfenced broker (which for a cluster's node means the quorum has
        a leader and took it in); then its ports are remembered. Stopped and an error if that takes too long."""
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
                if self.node_id in unfenced_brokers(admin.describe_cluster()):
                    remember_ports(self.workdir, self.port, self.controller_port)
                    self._ports_settled = True
                    log.info("embedded Kafka broker ready at %s (data in %s)", self.bootstrap_servers, self.workdir)
                    return
                time.sleep(0.3)
            except KafkaError:
                time.sleep(0.3)
            finally:
                admin.close()
        self.stop(keep_workdir=True)
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
        create_topics(self.bootstrap_servers, names, partitions)

    def kill(self) -> None:
        """SIGKILL, as a machine that loses power: no clean shutdown, data and folder left as they are."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(30)

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


def unfenced_brokers(cluster: Mapping[str, Any]) -> set[int]:
    """Node ids of the brokers a DescribeCluster answer lists as serving (registered and not fenced)."""
    return {int(b["broker_id"]) for b in cluster.get("brokers", ()) if not b.get("is_fenced", False)}


#: JVM options of a cluster's nodes: N brokers (and their storage formatting) start at once on a laptop's few
#: cores, and the C1 compiler alone halves their start there (measured: 15 s instead of 30-40 s for three on
#: two busy cores). The light load of a local cluster never needs C2's faster code.
QUICK_START_JVM: tuple[str, ...] = ("-XX:TieredStopAtLevel=1",)


@dataclass(frozen=True)
class PartitionState:
    """Who leads a partition and who is in sync with it."""

    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


class KafkaCluster:
    """`with KafkaCluster(lib_dir, nodes=3) as cluster: cluster.bootstrap_servers` (all nodes, comma-separated).

    N `EmbeddedBroker` nodes on loopback, node ids 1..N, each in `workdir/node-<id>` with its own JVM, data
    and ports, combined broker and controller in one N-voter quorum under one cluster id. Ports are planned
    when it is made, so the bootstrap string is known before it starts. Started again on its folder, it
    keeps its cluster id, ports, topics and messages. `kill(node)` and `restart(node)` are for fault tests.
    """

    def __init__(
        self,
        lib_dir: Path,
        nodes: int = 3,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        heap: str = "512m",
        jvm_options: Sequence[str] = QUICK_START_JVM,
    ) -> None:
        if nodes < 1:
            raise ValueError("a Kafka cluster needs at least one node")
        self.lib_dir, self.host, self.heap, self.size = lib_dir, host, heap, nodes
        self.jvm_options = tuple(jvm_options)
        self._fixed_port = port
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="cxr-kafka-cluster-"))
        self._cluster_id = self._existing_cluster_id() or new_cluster_id()
        self.nodes = self._plan_nodes(fresh=False)

    # The Quorum its nodes belong to ----------------------------------------------------------------

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    def voters(self) -> str:
        return quorum_voters(self.host, {n.node_id: n.controller_port for n in self.nodes})

    # --------------------------------------------------------------------------------------------------

    def _node_dir(self, node_id: int) -> Path:
        return self.workdir / f"node-{node_id}"

    def _existing_cluster_id(self) -> str | None:
        found = (formatted_cluster_id(self._node_dir(i) / "data") for i in range(1, self.size + 1))
        ids = {cluster_id for cluster_id in found if cluster_id is not None}
        if len(ids) > 1:
            raise BrokerError(f"the nodes under {self.workdir} belong to different Kafka clusters: {sorted(ids)}")
        return next(iter(ids), None)

    def _plan_nodes(self, fresh: bool) -> list[EmbeddedBroker]:
        remembered = [None if fresh else remembered_ports(self._node_dir(i)) for i in range(1, self.size + 1)]
        plan = plan_cluster_ports(
            self.size, self._fixed_port, remembered, lambda n, ex: free_ports(n, self.host, exclude=ex)
        )
        return [
            EmbeddedBroker(
                self.lib_dir,
                port=listener,
                controller_port=controller,
                workdir=self._node_dir(node_id),
                host=self.host,
                heap=self.heap,
                node_id=node_id,
                quorum=self,
                jvm_options=self.jvm_options,
            )
            for node_id, (listener, controller) in enumerate(plan, start=1)
        ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(n.bootstrap_servers for n in self.nodes)

    @property
    def running(self) -> bool:
        """Every node runs."""
        return all(n.running for n in self.nodes)

    def node(self, node_id: int) -> EmbeddedBroker:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no node {node_id} in a cluster of {self.size}")

    def start(self, timeout_s: float = 120.0, attempts: int = 3) -> KafkaCluster:
        """Launch every node, then wait for each (none is ready before a majority of the quorum runs).

        A first start on ports of its own choosing that loses a race for one is tried again on new ports;
        a cluster that has data keeps its ports, since its nodes know each other by them."""
        for attempt in range(1, attempts + 1):
            fresh = self._existing_cluster_id() is None
            try:
                with ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="cxr-kafka-launch") as pool:
                    list(pool.map(lambda n: n.launch(), [n for n in self.nodes if not n.running]))
                deadline = time.monotonic() + timeout_s
                for n in self.nodes:
                    n.wait_ready(max(1.0, deadline - time.monotonic()))
            except _StartupExit:
                self.stop(keep_workdir=True)
                if not fresh or self._fixed_port or attempt == attempts:
                    raise
                log.info("a Kafka node could not start on its ports; trying others")
                for n in self.nodes:  # nothing of value yet: format again for the new ports (logs stay)
                    shutil.rmtree(n.data_dir, ignore_errors=True)
                    (n.workdir / PORTS_FILE).unlink(missing_ok=True)
                self.nodes = self._plan_nodes(fresh=True)
                continue
            except BaseException:
                self.stop(keep_workdir=True)
                raise
            log.info("Kafka cluster %s ready at %s", self.cluster_id, self.bootstrap_servers)
            return self
        raise AssertionError("unreachable")

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (a crashed machine); the others go on without it."""
        self.node(node_id).kill()

    def restart(self, node_id: int, downtime_s: float = 0.0, timeout_s: float = 90.0) -> EmbeddedBroker:
        """Stop a node if it runs, stay away `downtime_s`, start it again on its folder and ports, and wait
        until the quorum has taken it back in as a serving broker."""
        node = self.node(node_id)
        node.stop(keep_workdir=True)
        time.sleep(downtime_s)
        return node.start(timeout_s)

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        """Topics replicated min(3, nodes) times, with min.insync.replicas=2 from three nodes up; existing
        ones are kept."""
        factor, min_isr = replication(self.size)
        create_topics(self.bootstrap_servers, names, partitions, factor, {"min.insync.replicas": str(min_isr)})

    def _ask(self, question: Callable[[KafkaAdminClient], Any], timeout_s: float = 30.0) -> Any:
        """An admin request to the nodes that run, asked again while a node just killed is still in the
        cluster's metadata (the client may pick it, and fail to connect) until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            alive = ",".join(n.bootstrap_servers for n in self.nodes if n.running) or self.bootstrap_servers
            try:
                admin = KafkaAdminClient(bootstrap_servers=alive, request_timeout_ms=5000)
                try:
                    return question(admin)
                finally:
                    admin.close()
            except KafkaError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def partitions(self, topic: str) -> dict[int, PartitionState]:
        """Leader, replicas and in-sync replicas of each partition of `topic`, as the cluster sees them now."""
        [described] = self._ask(lambda admin: admin.describe_topics([topic]))
        return {
            int(p["partition_index"]): PartitionState(
                int(p["leader_id"]), tuple(p["replica_nodes"]), tuple(sorted(p["isr_nodes"]))
            )
            for p in described["partitions"]
        }

    def active_controller(self) -> int:
        """The node that leads the controller quorum now."""
        quorum = self._ask(lambda admin: admin.describe_metadata_quorum())
        return int(quorum["topics"][0]["partitions"][0]["leader_id"])

    def stop(self, timeout_s: float = 30.0, *, keep_workdir: bool = False) -> None:
        """Every node stopped cleanly (in parallel: each waits for the others while it shuts down); a
        temporary folder of its own is removed unless `keep_workdir`."""
        with ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="cxr-kafka-stop") as pool:
            list(pool.map(lambda n: n.stop(timeout_s, keep_workdir=True), self.nodes))
        if self._own_workdir and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
