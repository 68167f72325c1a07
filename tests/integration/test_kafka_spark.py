"""The foundation against the real things: the embedded broker, Spark and the official Kafka connector."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from streaming.broker import EmbeddedBroker, port_is_free
from streaming.jvm import DEFAULT_LIB_DIR

pytestmark = pytest.mark.integration


def test_spark_streams_from_kafka_to_kafka(spark, kafka_broker, produce, consume, tmp_path: Path) -> None:
    source, sink = f"rt.in.{uuid.uuid4().hex[:8]}", f"rt.out.{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topics([source, sink], partitions=2)
    values = [f"message-{i}" for i in range(50)]
    produce(source, values)

    stream = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", kafka_broker.bootstrap_servers)
        .option("subscribe", source)
        .option("startingOffsets", "earliest")
        .load()
        .selectExpr("key", "upper(CAST(value AS STRING)) AS value")
    )
    query = (
        stream.writeStream.format("kafka")
        .option("kafka.bootstrap.servers", kafka_broker.bootstrap_servers)
        .option("topic", sink)
        .option("checkpointLocation", str(tmp_path / "checkpoint"))
        .start()
    )
    try:
        records = consume([sink], len(values), timeout_s=120)
    finally:
        query.stop()
    assert query.exception() is None
    assert sorted(r.value.decode() for r in records) == sorted(v.upper() for v in values)


def test_broker_stops_cleanly_and_frees_its_port(tmp_path: Path) -> None:
    broker = EmbeddedBroker(DEFAULT_LIB_DIR, workdir=tmp_path / "kafka")
    broker.start()
    broker.create_topics(["t"])
    assert not port_is_free(broker.port)
    broker.stop()
    assert not broker.running
    assert port_is_free(broker.port)
    assert port_is_free(broker.controller_port)


@pytest.mark.slow
def test_cxr_broker_command_serves_kafka_python(tmp_path: Path) -> None:
    """`cxr broker` in the foreground: prints its address, has the three topics, stops on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming.cli", "broker", "--port", str(port), "--data-dir", str(tmp_path / "k")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert address == f"127.0.0.1:{port}"
        producer = KafkaProducer(bootstrap_servers=address)
        producer.send("cxr.references", b"hello").get(timeout=30)
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=address, auto_offset_reset="earliest")
        assert {"cxr.references", "cxr.results", "cxr.dead-letter"} <= consumer.topics()
        consumer.close()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    deadline = time.monotonic() + 10
    while not port_is_free(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert port_is_free(port)


def _alive(pid: int) -> bool:
    """Running, not just a zombie waiting for a parent that no longer exists to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.slow
def test_broker_never_outlives_a_killed_parent(tmp_path: Path) -> None:
    script = (
        "import sys, time; from pathlib import Path\n"
        "from streaming.broker import EmbeddedBroker\n"
        "from streaming.jvm import DEFAULT_LIB_DIR\n"
        "b = EmbeddedBroker(DEFAULT_LIB_DIR, workdir=Path(sys.argv[1])).start()\n"
        "print(b.port, b._process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "k")], stdout=subprocess.PIPE, text=True)
    line = parent.stdout.readline()  # type: ignore[union-attr]
    assert line, "the child did not start its broker"
    port, pid = map(int, line.split())
    assert _alive(pid) and not port_is_free(port)
    parent.kill()  # SIGKILL: no atexit, no finally, no chance to clean up
    parent.wait(10)
    deadline = time.monotonic() + 30
    while (_alive(pid) or not port_is_free(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
    assert port_is_free(port)
