"""The worklist's consumer against the real broker: results in, rows out; a kill and a restart lose nothing.

Issue 10, item 6: "the consumer against the real broker (results in → rows out, a kill and restart without
duplicates or gaps)". Every wait is bounded; the topics are the test's own (the `topics` fixture).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewPartitions

from streaming.contracts import Reference, Source, build_dead_letter, build_result, dumps, now_utc, parse_timestamp
from streaming.errors import ErrorCode, FetchError, ParseError
from streaming.settings import Settings
from streams import JobProcess, SteadyProducer
from worklist import consumer as consumer_module
from worklist.consumer import ResultsConsumer
from worklist.store import WorklistStore

pytestmark = pytest.mark.integration

SECRET = "DOE^JANE"  # stands in for patient data: it must never reach a log line
MODEL = {"name": "pneumonia-xception", "version": "0.3.0"}


def result(ref: Reference, priority: str, pneumonia: float, sent_at: datetime | None = None) -> str:
    sent = sent_at or now_utc()
    return dumps(
        build_result(
            ref,
            model=MODEL,
            scores={"NORMAL": round(1 - pneumonia, 6), "PNEUMONIA": pneumonia},
            top_finding="PNEUMONIA" if pneumonia >= 0.5 else None,
            priority=priority,
            sent_at=sent,
            scored_at=sent + timedelta(milliseconds=800),
        )
    )


def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """Each partition's end offset, as the broker says now."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t))]
        return {(tp.topic, tp.partition): end for tp, end in consumer.end_offsets(parts, timeout_ms=30_000).items()}
    finally:
        consumer.close()


def stored_offsets(offsets: dict[tuple[str, int], int], topics: list[str]) -> dict[tuple[str, int], int]:
    return {tp: offset for tp, offset in offsets.items() if tp[0] in topics}


def nonempty(ends: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
    """Partitions that hold records: an empty one has nothing to store an offset for."""
    return {tp: end for tp, end in ends.items() if end > 0}


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def running(consumer: ResultsConsumer) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), name="test-worklist-consumer", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(15)
        assert not thread.is_alive(), "the consumer did not stop"


@pytest.fixture
def settings(kafka_broker: Any, topics: dict[str, str]) -> Settings:
    return Settings.load(kafka_bootstrap_servers=kafka_broker.bootstrap_servers, **topics)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[WorklistStore]:
    s = WorklistStore(tmp_path / "worklist.db")
    yield s
    s.close()


def test_results_in_rows_out(
    settings: Settings,
    store: WorklistStore,
    topics: dict[str, str],
    produce: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cxr.worklist")
    refs = {
        "a1": Reference(event_id="a1", uri="file:///x/a1.jpeg", study_uid="1.2.A", accession=SECRET),
        "a2": Reference(event_id="a2", uri="file:///x/a2.jpeg", study_uid="1.2.A"),
        "b1": Reference(event_id="b1", uri="file:///x/b1.jpeg", study_uid="1.2.B"),
        "c1": Reference(event_id="c1", uri="file:///x/c1.jpeg", study_uid="1.2.C"),
        "d1": Reference(event_id="d1", uri="file:///x/d1.jpeg"),  # no study UID: keyed by its event id
        "e1": Reference(event_id="e1", uri="file:///x/e1.jpeg", study_uid="1.2.E"),  # never scored: fails
    }
    sent = now_utc() - timedelta(minutes=1)
    produce(
        topics["input_topic"],
        [replace(r, sent_at=sent.isoformat()).to_json() for r in refs.values()] + ["{}"],
        keys=[r.key for r in refs.values()] + [None],
    )
    produce(
        topics["results_topic"],
        [
            result(refs["a1"], "ROUTINE", 0.2),
            result(refs["a2"], "STAT", 0.95),
            result(refs["b1"], "URGENT", 0.7),
            result(refs["c1"], "URGENT", 0.9),
            b"\xff\xfe" + SECRET.encode(),  # binary
            f"not json {SECRET}",
            None,  # a tombstone
        ],
        keys=["1.2.A", "1.2.A", "1.2.B", "1.2.C", None, None, "a-tombstone-needs-a-key"],
    )
    failure = FetchError(ErrorCode.NOT_FOUND, "the file does not exist")
    letters = [
        build_dead_letter(
            failure,
            payload=refs["e1"].to_json(),
            source=Source(topics["input_topic"], 0, 5),
            event_id="e1",
            failed_at=now_utc(),
        ),
        build_dead_letter(
            ParseError(ErrorCode.INVALID_JSON, "the message value is not valid UTF-8 JSON"),
            payload=b"\x00" + SECRET.encode(),
            source=Source(topics["input_topic"], 1, 9),
            event_id=None,
            failed_at=now_utc(),
        ),
    ]
    produce(topics["dead_letter_topic"], [dumps(x) for x in letters] + ["[]"], keys=["e1", None, None])
    readable, unreadable = len(refs) + 4 + len(letters), 5

    consumer = ResultsConsumer(settings, store, normal_labels=("NORMAL",))
    with running(consumer):
        wait_for(
            lambda: consumer.status()["records"] + consumer.status()["unreadable"] >= readable + unreadable,
            60,
            "every record to be applied",
        )
        status = consumer.status()
    json.dumps(status)
    assert status["connected"] is True and status["error"] is None
    assert (status["records"], status["unreadable"]) == (readable, unreadable)
    assert parse_timestamp(status["last_poll_at"]) > now_utc() - timedelta(minutes=1)

    items = store.queue(now_utc())[1]
    assert [i["key"] for i in items] == ["1.2.A", "1.2.C", "1.2.B", "d1", "1.2.E"]
    assert [i["priority"] for i in items] == ["STAT", "URGENT", "URGENT", None, None]
    first = items[0]
    assert first["event_ids"] == ["a1", "a2"] and first["score"] == pytest.approx(0.95)
    assert first["model"] == MODEL and first["images"] == {"total": 2, "scored": 2, "failed": 0, "pending": 0}
    assert items[3]["images"]["pending"] == 1 and items[4]["images"]["failed"] == 1

    total, dead = store.dead_letters()
    assert total == 2
    assert {(d["event_id"], d["stage"], d["error"], d["reason"]) for d in dead} == {
        ("e1", "fetch", "not_found", "the file does not exist"),
        (None, "parse", "invalid_json", "the message value is not valid UTF-8 JSON"),
    }
    assert store.study("1.2.E", now_utc())["image_list"][0]["error"]["code"] == "not_found"

    names = list(topics.values())
    ends = end_offsets(settings.kafka_bootstrap_servers, names)
    assert stored_offsets(store.offsets(), names) == nonempty(ends)

    skipped = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(skipped) == unreadable and all(r.levelno == logging.WARNING for r in skipped)
    assert all(
        topics["results_topic"] in r.getMessage()
        or topics["input_topic"] in r.getMessage()
        or topics["dead_letter_topic"] in r.getMessage()
        for r in skipped
    )
    assert SECRET not in caplog.text


def test_a_poll_the_store_cannot_take_is_read_again(
    settings: Settings, store: WorklistStore, topics: dict[str, str], produce: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = [Reference(event_id=f"ev-{i}", uri=f"file:///x/{i}.jpeg", study_uid=f"1.3.{i}") for i in range(20)]
    produce(topics["results_topic"], [result(r, "URGENT", 0.7) for r in refs], keys=[r.key for r in refs])
    real_apply = store.apply
    calls: list[int] = []

    def fail_once(records: Any, next_offsets: Any) -> set[str]:
        calls.append(len(records))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real_apply(records, next_offsets)

    monkeypatch.setattr(store, "apply", fail_once)
    consumer = ResultsConsumer(settings, store)
    with running(consumer):
        wait_for(lambda: consumer.status()["error"] is not None or len(calls) > 1, 30, "the failure to be seen")
        wait_for(lambda: store.image_counts()["scored"] == len(refs), 60, "every result after the failure")
        status = consumer.status()
    assert calls[0] > 0 and len(calls) >= 2
    assert status["records"] == len(refs) and status["error"] is None
    names = [topics["results_topic"]]
    assert stored_offsets(store.offsets(), names) == nonempty(end_offsets(settings.kafka_bootstrap_servers, names))


def test_partitions_added_later_are_read_from_their_beginning(
    settings: Settings,
    store: WorklistStore,
    topics: dict[str, str],
    produce: Any,
    kafka_broker: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(consumer_module, "REFRESH_PARTITIONS_S", 1.0)
    bootstrap = kafka_broker.bootstrap_servers
    first = Reference(event_id="p-first", uri="file:///x/1.jpeg")
    produce(topics["results_topic"], [result(first, "ROUTINE", 0.1)], keys=[first.key])
    consumer = ResultsConsumer(settings, store)
    with running(consumer):
        wait_for(lambda: consumer.status()["records"] == 1, 60, "the first result")
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            admin.create_partitions({topics["results_topic"]: NewPartitions(total_count=3)})
        finally:
            admin.close()
        late = Reference(event_id="p-late", uri="file:///x/2.jpeg")
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        try:
            producer.send(topics["results_topic"], value=result(late, "STAT", 0.9).encode(), partition=2).get(30)
        finally:
            producer.close()
        wait_for(lambda: consumer.status()["records"] == 2, 60, "the result on the new partition")
    assert store.offsets()[(topics["results_topic"], 2)] == 1
    assert [i["key"] for i in store.queue(now_utc())[1]] == ["p-late", "p-first"]


def test_offsets_the_log_no_longer_has_are_warned_about_and_read_from_what_it_has(
    settings: Settings,
    store: WorklistStore,
    topics: dict[str, str],
    kafka_broker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Retention deleted what the worklist had not read yet (the first 3 of 5): say so, read the other 2. The
    topic was recreated (the worklist had read up to 1000 of a log that now ends at 2): read it all."""
    bootstrap = kafka_broker.bootstrap_servers
    results, references = topics["results_topic"], topics["input_topic"]
    caplog.set_level(logging.INFO, logger="cxr.worklist")
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i in range(5):
            ref = Reference(event_id=f"kept-{i}", uri=f"file:///x/k{i}.jpeg", study_uid=f"1.5.{i}")
            producer.send(results, value=result(ref, "ROUTINE", 0.1).encode(), partition=0)
        for i in range(2):
            ref = Reference(event_id=f"new-{i}", uri=f"file:///x/n{i}.jpeg", study_uid=f"1.6.{i}")
            producer.send(references, value=ref.to_json().encode(), partition=1)
        producer.flush(30)
    finally:
        producer.close()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_records({TopicPartition(results, 0): 3}, timeout_ms=30_000)
    finally:
        admin.close()
    store.apply([], {(results, 0): 1, (references, 1): 1000})
    consumer = ResultsConsumer(settings, store)
    with running(consumer):
        wait_for(lambda: consumer.status()["records"] == 4, 30, "the records the log still has")
    assert {row["key"] for row in store.queue(now_utc())[1]} == {"1.5.3", "1.5.4", "1.6.0", "1.6.1"}
    assert store.offsets()[(results, 0)] == 5 and store.offsets()[(references, 1)] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{results}/0" in w and "2 message(s)" in w and "retention" in w for w in warnings), warnings
    assert any(f"{references}/1" in w and "looks recreated" in w for w in warnings), warnings


# Crash and resume: the real `cxr worklist`, SIGKILLed mid-stream -----------------------------------------


@dataclass(frozen=True)
class ResultMessage:
    """A result that `streams.SteadyProducer` can send as it sends references: it reads `key`, `event_id`,
    `sent_at` (replaced with the moment of sending) and `to_json()`."""

    ref: Reference
    priority: str
    pneumonia: float
    sent_at: str | None = None

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def event_id(self) -> str:
        return self.ref.event_id

    def to_json(self) -> str:
        sent = parse_timestamp(self.sent_at) if self.sent_at else None
        return result(self.ref, self.priority, self.pneumonia, sent)


class WorklistProcess(JobProcess):
    command = ("worklist",)


def read_db(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of the worklist file, read as another process would (read-only, beside the writer: WAL)."""
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []


def images_in(db: Path) -> set[str]:
    return {row[0] for row in read_db(db, "SELECT event_id FROM images")}


def offsets_in(db: Path) -> dict[tuple[str, int], int]:
    return {(t, p): o for t, p, o in read_db(db, "SELECT topic, partition, next_offset FROM offsets")}


@pytest.mark.slow
def test_kill_and_restart_loses_and_doubles_nothing(kafka_broker: Any, topics: dict[str, str], tmp_path: Path) -> None:
    bootstrap = kafka_broker.bootstrap_servers
    db = tmp_path / "worklist.db"
    env = {
        **os.environ,
        "CXR_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        **{f"CXR_{name.upper()}": topic for name, topic in topics.items()},
    }
    count = 400
    # Two images per study, so a study is built from rows applied before and after the kill.
    studies = [f"1.4.{uuid.uuid4().int}" for _ in range(count // 2)]
    priorities = ("STAT", "URGENT", "ROUTINE", "URGENT")
    messages = [
        ResultMessage(
            Reference(event_id=str(uuid.uuid4()), uri=f"file:///x/{i}.jpeg", study_uid=studies[i // 2]),
            priorities[i % 4],
            (0.9, 0.6, 0.1, 0.6)[i % 4],
        )
        for i in range(count)
    ]
    sent_ids = {m.event_id for m in messages}
    names = [topics["results_topic"]]

    worklist = WorklistProcess(env, tmp_path / "worklist.log", ("--db", str(db), "--port", "0")).start()
    try:
        wait_for(lambda: "worklist on" in worklist.log() or not worklist.running, 90, "the worklist to start")
        assert worklist.running, worklist.log()
        producer = SteadyProducer(bootstrap, topics["results_topic"], messages, rate_per_s=40.0)  # type: ignore[arg-type]
        producer.start()
        wait_for(lambda: len(images_in(db)) >= 40 or not worklist.running, 90, "the first rows")
        assert worklist.running, worklist.log()
        assert len(producer.sent) < count, "the kill must land mid-stream"
        worklist.kill()
        assert worklist.exit_codes[-1] == -9
        at_kill = len(images_in(db))
        assert 40 <= at_kill < count
        time.sleep(1.0)  # the producer goes on while the worklist is down
        worklist.start()
        producer.join(60)
        wait_for(lambda: len(images_in(db)) >= count or not worklist.running, 90, "every result after the restart")
        assert worklist.running, worklist.log()
        ends = nonempty(end_offsets(bootstrap, names))
        # Written with the rows: once every row is in, the offsets are at the end (the last poll's commit).
        wait_for(lambda: stored_offsets(offsets_in(db), names) == ends, 30, "the stored offsets to reach the end")
    finally:
        code = worklist.stop(30) if worklist.running else None
    assert code == 0, worklist.log()
    assert sum(ends.values()) == count

    assert images_in(db) == sent_ids  # every event id, and no other (event_id is the key: one row each)
    store = WorklistStore(db)
    try:
        assert store.image_counts() == {"announced": 0, "scored": count, "failed": 0}
        queue = store.queue(now_utc(), limit=count)[1]
        assert sorted(s["key"] for s in queue) == sorted(studies)
        assert all(s["images"] == {"total": 2, "scored": 2, "failed": 0, "pending": 0} for s in queue)
        assert stored_offsets(store.offsets(), names) == ends
    finally:
        store.close()
    assert "Traceback" not in worklist.log(), worklist.log()
