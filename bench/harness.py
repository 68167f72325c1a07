"""The bench's moving parts: a peer process, its memory, the load it gets, and the clock on its answers.

Latency is measured the same way for every peer: from the reference's `sent_at` (stamped as it is handed to
Kafka) to the moment this process reads its result from the results topic.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from kafka import KafkaConsumer, TopicPartition

from producers.load import LoadGenerator, cycle
from producers.publish import ReferencePublisher
from streaming.contracts import Reference, parse_timestamp


class PeerProcess:
    """A peer in its own process group; its output goes to a log file, and `ready_at` marks a line it prints."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_file: Path, ready_marker: str):
        self.name, self.log_file, self.ready_marker = name, log_file, ready_marker
        self.launched_at = time.monotonic()
        self.ready_at: float | None = None
        self.process = subprocess.Popen(
            list(argv),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.log_file.open("wb") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                if self.ready_at is None and self.ready_marker.encode() in line:
                    self.ready_at = time.monotonic()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self._reader.join(10)


@dataclass
class RssSampler:
    """Peak resident memory of a process tree: the whole tree, and the largest Python worker in it."""

    pid: int
    interval_s: float = 0.5
    peak_total_mb: float = 0.0
    peak_python_worker_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> RssSampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total, worker = 0.0, 0.0
            for proc in tree:
                try:
                    rss = proc.memory_info().rss / 2**20
                    cmdline = " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                total += rss
                if "python" in cmdline.split(" ", 1)[0].lower():  # the driver, or a Python worker of Spark's
                    worker = max(worker, rss)
            self.peak_total_mb = max(self.peak_total_mb, total)
            self.peak_python_worker_mb = max(self.peak_python_worker_mb, worker)

    def stop(self) -> None:
        self._stop.set()


class ResultClock:
    """Reads the results topic from its current end; records when each event's first answer arrived."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        self._consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10)
        partitions = [
            TopicPartition(t, p) for t in topics for p in sorted(self._consumer.partitions_for_topic(t) or {0})
        ]
        self._consumer.assign(partitions)
        self._consumer.seek_to_end(*partitions)
        for tp in partitions:
            self._consumer.position(tp)
        self._lock = threading.Lock()
        self.answered: dict[str, tuple[float, float | None]] = {}  # event id → (monotonic, latency s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=100).values():
                now_mono, now_wall = time.monotonic(), time.time()
                for record in records:
                    body = json.loads(record.value)
                    event_id = body.get("event_id")
                    sent_at = body.get("sent_at")
                    latency = now_wall - parse_timestamp(sent_at).timestamp() if sent_at else None
                    with self._lock:
                        self.answered.setdefault(event_id, (now_mono, latency))

    def count(self) -> int:
        with self._lock:
            return len(self.answered)

    def answered_between(self, start: float, end: float) -> int:
        with self._lock:
            return sum(1 for at, _ in self.answered.values() if start <= at < end)

    def latencies(self, event_ids: set[str]) -> list[float]:
        with self._lock:
            return [lat for eid, (_, lat) in self.answered.items() if eid in event_ids and lat is not None]

    def wait_for(self, event_ids: set[str], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if event_ids <= self.answered.keys():
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


@dataclass
class Feeder:
    """Sends references to one topic: a kept backlog (throughput) or a steady rate (latency)."""

    publisher: ReferencePublisher
    templates: Sequence[Reference]
    sent_ids: list[str] = field(default_factory=list)

    def send(self, count: int) -> set[str]:
        generator = LoadGenerator(self.publisher, rate_per_s=1e9)
        ids: set[str] = set()
        generator.on_sent = lambda ref: ids.add(ref.event_id)
        generator.run(cycle(self.templates, count))
        self.sent_ids.extend(ids)
        return ids

    def keep_backlog(self, clock: ResultClock, backlog: int, until: float, stop: Callable[[], bool]) -> None:
        """Keep about `backlog` references waiting (sent, not answered) until the monotonic time `until`."""
        while time.monotonic() < until and not stop():
            waiting = len(self.sent_ids) - clock.count()
            if waiting < backlog // 2:
                self.send(backlog - waiting)
            time.sleep(0.02)

    def steady(self, rate_per_s: float, duration_s: float) -> list[tuple[float, str]]:
        """Send at `rate_per_s` for `duration_s`; returns (monotonic send time, event id) of each."""
        sent: list[tuple[float, str]] = []
        generator = LoadGenerator(self.publisher, rate_per_s=rate_per_s, duration_s=duration_s)
        generator.on_sent = lambda ref: sent.append((time.monotonic(), ref.event_id))
        generator.run(cycle(self.templates))
        self.sent_ids.extend(eid for _, eid in sent)
        return sent


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    arr = np.asarray(values)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "p99": float(np.percentile(arr, 99)),
        "max": float(arr.max()),
    }
