"""The embedded broker stopped and started again on the same folder: same address, same topics, same messages.

A restarted `cxr broker --data-dir DIR` once formatted its storage anew and the storage tool refused the new
cluster id; fault tests also stop the broker while a job runs and start it again on the same data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from probes import read_records
from streaming.broker import EmbeddedBroker, port_is_free
from streaming.jvm import DEFAULT_LIB_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def produce(bootstrap: str, topic: str, values: list[str]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for value in values:
            producer.send(topic, value.encode()).get(timeout=30)
    finally:
        producer.close()


def values_in(bootstrap: str, topic: str, n: int) -> list[str]:
    return [r.value.decode() for r in read_records(bootstrap, [topic], n, timeout_s=60)]


def test_a_new_broker_on_the_same_workdir_serves_the_same_topics_and_messages(tmp_path: Path) -> None:
    workdir = tmp_path / "kafka"
    first = EmbeddedBroker(DEFAULT_LIB_DIR, workdir=workdir).start()
    try:
        address = first.bootstrap_servers
        first.create_topics(["restart.a"], partitions=2)
        produce(address, "restart.a", [f"before-{i}" for i in range(10)])
    finally:
        first.stop()
    assert workdir.is_dir() and (workdir / "data" / "meta.properties").is_file()  # a given workdir stays

    second = EmbeddedBroker(DEFAULT_LIB_DIR, workdir=workdir)
    assert second.bootstrap_servers == address  # known before it starts: clients reconnect to the old address
    second.start()
    try:
        assert second.bootstrap_servers == address
        second.create_topics(["restart.a"], partitions=2)  # already there: no error, nothing lost
        produce(address, "restart.a", ["after"])
        assert sorted(values_in(address, "restart.a", 11)) == sorted([*(f"before-{i}" for i in range(10)), "after"])

        # The same object, stopped for a while and started again (what the fault tests do), from a thread
        # that ends at once: the broker must outlive it (the kernel's parent-death signal follows threads).
        outage = threading.Thread(target=second.restart, kwargs={"downtime_s": 1.0})
        outage.start()
        outage.join(120)
        time.sleep(1.0)
        assert second.running and second.bootstrap_servers == address
        assert len(values_in(address, "restart.a", 11)) == 11
    finally:
        second.stop()
    assert workdir.is_dir()


def cxr_broker(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming.cli", "broker", "--data-dir", str(data_dir), "--port", "0"],
        env={**os.environ, "CXR_INPUT_TOPIC": "ops.references"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not address:
        proc.kill()
        raise AssertionError(f"cxr broker printed no address:\n{proc.communicate(timeout=30)[1][-3000:]}")
    return proc, address


def terminate(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


def test_cxr_broker_stopped_with_sigterm_comes_back_on_its_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "broker-data"
    proc, address = cxr_broker(data_dir)
    try:
        produce(address, "ops.references", [f"m{i}" for i in range(5)])
    finally:
        terminate(proc)
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 10
    while not port_is_free(int(port), host) and time.monotonic() < deadline:
        time.sleep(0.2)

    proc, again = cxr_broker(data_dir)  # as an operator would: the same command, the same folder
    try:
        assert again == address
        consumer = KafkaConsumer(bootstrap_servers=again)
        assert {"ops.references", "cxr.results", "cxr.dead-letter"} <= consumer.topics()
        consumer.close()
        produce(again, "ops.references", ["m5"])
        # `cxr broker` makes a partition per core: order holds within a partition, not across them
        assert sorted(values_in(again, "ops.references", 6)) == [f"m{i}" for i in range(6)]
    finally:
        terminate(proc)
    assert (data_dir / "data" / "meta.properties").is_file()
