"""Fault-test harness: `cxr run` as a separate process, a steady stream of references, and the final tally.

Each fault test sends several hundred references at a steady pace while something goes wrong, then checks
that every reference ended as a result or a dead letter, and counts the duplicates that replays wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from probes import read_records
from streaming.contracts import Reference, now_utc, rfc3339


def job_env(
    bootstrap: str, topics: dict[str, str], roots: list[Path], checkpoint: Path, **extra: str
) -> dict[str, str]:
    """The environment of a `cxr run` sized for the 2-core test machine, with small micro-batches."""
    return {
        **os.environ,
        "CXR_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        **{f"CXR_{name.upper()}": topic for name, topic in topics.items()},
        "CXR_ALLOWED_ROOTS": ",".join(str(r) for r in roots),
        "CXR_CHECKPOINT_DIR": str(checkpoint),
        "CXR_METRICS_PORT": "0",
        "CXR_MAX_OFFSETS_PER_TRIGGER": "32",  # the duplicate bound: one micro-batch per restart
        "CXR_TRIGGER_INTERVAL": "0 seconds",
        "CXR_SPARK_MASTER": "local[2]",
        "CXR_SPARK_DRIVER_MEMORY": "1g",
        **extra,
    }


class JobProcess:
    """A `cxr` command (`cxr run` unless `command` says otherwise) in its own process group, its output
    appended to one log file across restarts."""

    command: tuple[str, ...] = ("run",)

    def __init__(self, env: dict[str, str], log_file: Path, args: tuple[str, ...] = ()) -> None:
        self.env, self.log_file, self.args = env, log_file, args
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exit_codes: list[int] = []

    def start(self) -> JobProcess:
        self.starts += 1
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streaming.cli", *self.command, *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the driver and everything it started (JVM, Python workers) at once: no shutdown hooks."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.exit_codes.append(self.process.wait(30))

    def stop(self, timeout_s: float = 120.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        code = self.process.returncode
        self.exit_codes.append(code)
        return code

    def wait_exit(self, timeout_s: float) -> int | None:
        assert self.process is not None
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None
        self.exit_codes.append(code)
        return code

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def image_references(paths: list[Path], count: int) -> list[Reference]:
    return [Reference(event_id=str(uuid.uuid4()), uri=paths[i % len(paths)].as_uri()) for i in range(count)]


@dataclass
class SteadyProducer:
    """Sends references at `rate_per_s` from a thread; retries through broker outages (idempotent, acks=all)."""

    bootstrap: str
    topic: str
    refs: list[Reference]
    rate_per_s: float
    sent: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    attempted: int = 0
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> SteadyProducer:
        self._thread = threading.Thread(target=self._run, name="steady-producer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            retries=2**31 - 1,
            delivery_timeout_ms=300_000,
            max_block_ms=300_000,
            reconnect_backoff_max_ms=2000,
        )
        try:
            start = time.monotonic()
            for i, ref in enumerate(self.refs):
                if self._stop.wait(max(0.0, start + i / self.rate_per_s - time.monotonic())):
                    break
                self.attempted += 1
                ref = replace(ref, sent_at=rfc3339(now_utc()))
                future = producer.send(self.topic, key=ref.key.encode(), value=ref.to_json().encode())
                future.add_callback(lambda _, eid=ref.event_id: self.sent.append(eid))
                future.add_errback(self.errors.append)
            producer.flush(timeout=300)
        except BaseException as exc:  # surfaced by join()
            self.errors.append(exc)
        finally:
            producer.close(timeout=30)

    def stop(self) -> None:
        """Send nothing more (what was sent still goes out): for a stream that must outlast what the test does."""
        self._stop.set()

    def join(self, timeout_s: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the producer did not finish"
        assert not self.errors, f"the producer failed: {self.errors[:3]}"
        assert len(self.sent) == self.attempted, "not every reference was acknowledged by Kafka"
        assert self.attempted == len(self.refs) or self._stop.is_set(), "the producer stopped early"


@dataclass
class Tally:
    """Every output record, by event id: what was answered, what was lost, what was written twice."""

    results: Counter[str]
    dead_letters: dict[str, dict[str, Any]]
    unkeyed_dead_letters: int
    total_records: int

    @classmethod
    def read(cls, bootstrap: str, results_topic: str, dead_letter_topic: str) -> Tally:
        """Everything both topics hold now."""
        records = read_records(bootstrap, [results_topic, dead_letter_topic], timeout_s=60.0)
        results: Counter[str] = Counter()
        dead: dict[str, dict[str, Any]] = {}
        unkeyed = 0
        for record in records:
            body = json.loads(record.value)
            if record.topic == results_topic:
                results[body["event_id"]] += 1
            elif body.get("event_id"):
                dead.setdefault(body["event_id"], {**body, "_count": 0})["_count"] += 1
            else:
                unkeyed += 1
        return cls(results, dead, unkeyed, len(records))

    def answered(self) -> set[str]:
        return set(self.results) | set(self.dead_letters)

    def lost(self, sent: list[str]) -> set[str]:
        return set(sent) - self.answered()

    @property
    def duplicates(self) -> int:
        return self.total_records - len(self.answered()) - self.unkeyed_dead_letters

    def summary(self, sent: list[str]) -> str:
        return (
            f"sent {len(sent)}, results {len(self.results)}, dead letters {len(self.dead_letters)}, "
            f"lost {len(self.lost(sent))}, duplicates {self.duplicates}"
        )


def wait_until_answered(
    bootstrap: str, topics: dict[str, str], sent: list[str], timeout_s: float, poll_s: float = 1.0
) -> Tally:
    """Read the outputs until every sent reference is answered, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        tally = Tally.read(bootstrap, topics["results_topic"], topics["dead_letter_topic"])
        if not tally.lost(sent) or time.monotonic() > deadline:
            return tally
        time.sleep(poll_s)


def answered_count(bootstrap: str, topics: dict[str, str]) -> int:
    return len(Tally.read(bootstrap, topics["results_topic"], topics["dead_letter_topic"]).answered())
