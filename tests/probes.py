"""Observing the system under test from outside: its topics and its HTTP endpoints."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition


def read_records(
    bootstrap_servers: str, topics: list[str], n: int | None = None, timeout_s: float = 120.0
) -> list[Any]:
    """Read from the beginning until `n` records arrived (or time ran out); returns what arrived.

    Without `n`: every record the topics hold when called, returned as soon as the reader reaches the end
    offsets taken then (a wait loop's probe, which need not sit out a timeout to know it has seen everything).
    """
    if n is None:
        return _read_to_end(bootstrap_servers, topics, timeout_s)
    consumer = KafkaConsumer(
        *topics, bootstrap_servers=bootstrap_servers, auto_offset_reset="earliest", enable_auto_commit=False
    )
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < n and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
    finally:
        consumer.close()
    return records


def _read_to_end(bootstrap_servers: str, topics: list[str], timeout_s: float) -> list[Any]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t))]
        if not partitions:
            return records
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if consumer.position(tp) < ends[tp]}
        while pending and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
            pending = {tp for tp in pending if consumer.position(tp) < ends[tp]}
    finally:
        consumer.close()
    return records


def http_get(url: str) -> tuple[int, str]:
    """Status and body; status 0 when nothing answers (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError:
        return 0, ""


def http_status(url: str) -> int:
    return http_get(url)[0]


def wait_for(predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.5) -> bool:
    """Polls `predicate` until it holds or `timeout_s` passes: every wait in a test has a bound."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return False
