"""The consumer's pure parts (worklist/consumer.py) and its behaviour with no broker at all.

The consumer against the real broker (records in, rows out; a kill and a restart) is
tests/integration/test_worklist_consumer.py; here: one poll's records become one `apply` whose offsets cover
every record read, readable or not; partitions resume where the store says; the client can never be configured
into a consumer group or into committing; and a broker that is not there is reported, retried and never
keeps `stop` waiting.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from streaming.backoff import Backoff
from streaming.broker import free_port
from streaming.contracts import Reference, Source, build_dead_letter, build_result, dumps
from streaming.errors import ErrorCode, FetchError
from streaming.positions import plan_seeks, short_error, starts_from_now
from streaming.settings import Settings
from worklist.consumer import ResultsConsumer, convert
from worklist.events import DeadLetter, ImageEvent, Kind, NormalLabels
from worklist.store import WorklistStore

TOPICS = {"results_topic": "r", "dead_letter_topic": "d", "input_topic": "i"}
TS = int(datetime(2024, 5, 1, 10, 0, tzinfo=UTC).timestamp() * 1000)
REF = Reference(event_id="ev-1", uri="file:///x.jpeg", study_uid="1.2.3")


@dataclass(frozen=True)
class Record:
    """The fields of kafka-python's ConsumerRecord that the consumer reads."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    timestamp: int = TS


def result_value(ref: Reference = REF) -> bytes:
    moment = datetime(2024, 5, 1, 9, 59, tzinfo=UTC)
    body = build_result(
        ref,
        model={"name": "m", "version": "1"},
        scores={"NORMAL": 0.2, "PNEUMONIA": 0.8},
        top_finding="PNEUMONIA",
        priority="URGENT",
        sent_at=moment,
        scored_at=moment,
    )
    return dumps(body).encode()


def letter_value(event_id: str | None) -> bytes:
    body = build_dead_letter(
        FetchError(ErrorCode.NOT_FOUND, "the file does not exist"),
        payload=REF.to_json() if event_id else b"\xff",
        source=Source("i", 0, 3),
        event_id=event_id,
        failed_at=datetime(2024, 5, 1, 9, 59, tzinfo=UTC),
    )
    return dumps(body).encode()


def batches(*records: Record) -> dict[TopicPartition, list[Record]]:
    out: dict[TopicPartition, list[Record]] = {}
    for record in records:
        out.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
    return out


def test_one_poll_becomes_records_and_the_next_offset_of_every_partition_read() -> None:
    polled = batches(
        Record("i", 0, 10, REF.to_json().encode()),
        Record("r", 0, 4, result_value()),
        Record("r", 0, 5, b"\x00 not json"),
        Record("r", 1, 7, None),  # a tombstone: the partition's only record, unreadable
        Record("d", 0, 2, letter_value("ev-1")),
        Record("d", 0, 3, letter_value(None)),
    )
    converted = convert(polled, **TOPICS, normal_labels=("NORMAL",))
    assert converted.next_offsets == {("i", 0): 11, ("r", 0): 6, ("r", 1): 8, ("d", 0): 4}
    kinds = [r.kind if isinstance(r, ImageEvent) else "letter" for r in converted.records]
    assert kinds == [Kind.ANNOUNCED, Kind.SCORED, "letter", Kind.FAILED, "letter"]
    assert converted.readable == 4
    assert [u[:3] for u in converted.unreadable] == [("r", 0, 5), ("r", 1, 7)]
    assert all("not json" not in u[3] for u in converted.unreadable)
    letters = [r for r in converted.records if isinstance(r, DeadLetter)]
    assert [(x.topic, x.partition, x.offset) for x in letters] == [("d", 0, 2), ("d", 0, 3)]


def test_a_reader_that_breaks_is_one_unreadable_message_not_a_stopped_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise KeyError("DOE^JANE")

    monkeypatch.setattr("worklist.consumer.read_reference", broken)
    converted = convert(batches(Record("i", 0, 0, REF.to_json().encode())), **TOPICS)
    assert converted.records == [] and converted.next_offsets == {("i", 0): 1}
    assert converted.unreadable == [("i", 0, 0, "the message could not be read (KeyError)")]


def test_a_message_from_another_topic_is_unreadable() -> None:
    converted = convert(batches(Record("other", 0, 0, REF.to_json().encode())), **TOPICS)
    assert converted.records == [] and converted.unreadable[0][:3] == ("other", 0, 0)


def test_partitions_resume_at_the_stored_offset_else_at_the_beginning() -> None:
    parts = [TopicPartition("r", 0), TopicPartition("r", 1), TopicPartition("d", 0)]
    plan = plan_seeks(parts, {("r", 0): 42, ("x", 0): 3}, reader="the worklist")
    assert plan.seeks == {TopicPartition("d", 0): 0, TopicPartition("r", 0): 42, TopicPartition("r", 1): 0}
    assert (plan.resumed, plan.from_beginning, plan.from_end) == (1, 2, 0)
    assert plan.store == {} and plan.warnings == []
    # with the broker's answers: inside the log resumes there; no offset starts at the log's start
    ends = {tp: 100 for tp in parts}
    plan = plan_seeks(parts, {("r", 0): 42}, {tp: 10 for tp in parts}, ends, reader="the worklist")
    assert plan.seeks == {TopicPartition("d", 0): 10, TopicPartition("r", 0): 42, TopicPartition("r", 1): 10}
    assert plan.store == {} and plan.warnings == []
    at_the_edges = plan_seeks(
        parts[:2], {("r", 0): 10, ("r", 1): 100}, {tp: 10 for tp in parts}, ends, reader="the worklist"
    )
    assert at_the_edges.seeks == {TopicPartition("r", 0): 10, TopicPartition("r", 1): 100}
    assert at_the_edges.warnings == [] and at_the_edges.resumed == 2


def test_an_offset_that_retention_deleted_resumes_at_the_log_start_and_says_how_much_was_lost() -> None:
    tp = TopicPartition("r", 3)
    plan = plan_seeks([tp], {("r", 3): 40}, {tp: 100}, {tp: 250}, reader="the worklist")
    assert plan.seeks == {tp: 100} and plan.store == {("r", 3): 100}
    [warning] = plan.warnings
    assert "r/3" in warning and "60 message(s)" in warning and "retention" in warning and "100" in warning


def test_an_offset_past_the_log_end_means_a_recreated_topic_read_from_its_beginning() -> None:
    tp = TopicPartition("d", 0)
    plan = plan_seeks([tp], {("d", 0): 5000}, {tp: 0}, {tp: 12}, reader="the worklist")
    assert plan.seeks == {tp: 0} and plan.store == {("d", 0): 0}
    [warning] = plan.warnings
    assert "d/0" in warning and "looks recreated" in warning and "5000" in warning


def test_a_first_start_from_now_begins_at_the_end_and_stores_it() -> None:
    parts = [TopicPartition("r", 0), TopicPartition("i", 0)]
    plan = plan_seeks(
        parts,
        {},
        {tp: 3 for tp in parts},
        {TopicPartition("r", 0): 900, TopicPartition("i", 0): 0},
        reader="the worklist",
    )
    assert plan.seeks == {TopicPartition("r", 0): 3, TopicPartition("i", 0): 3}  # not from now: the beginning
    plan = plan_seeks(
        parts,
        {},
        {tp: 3 for tp in parts},
        {TopicPartition("r", 0): 900, TopicPartition("i", 0): 3},
        from_now=True,
        reader="the worklist",
    )
    assert plan.seeks == {TopicPartition("r", 0): 900, TopicPartition("i", 0): 3}
    assert plan.store == {("r", 0): 900, ("i", 0): 3}  # a restart resumes there, not at the beginning
    assert (plan.from_end, plan.from_beginning) == (2, 0)
    # a partition with a stored offset is resumed even from now
    plan = plan_seeks(
        parts,
        {("r", 0): 7},
        {},
        {TopicPartition("r", 0): 900, TopicPartition("i", 0): 50},
        from_now=True,
        reader="the worklist",
    )
    assert plan.seeks == {TopicPartition("r", 0): 7, TopicPartition("i", 0): 50}


def test_from_now_applies_only_to_a_store_without_offsets_for_the_topics() -> None:
    topics = ("r", "d", "i")
    assert starts_from_now("latest", {}, topics)
    assert starts_from_now("latest", {("someone-else", 0): 4}, topics)  # another topic's offsets do not count
    assert not starts_from_now("latest", {("d", 1): 0}, topics)  # started before: later partitions from the start
    assert not starts_from_now("earliest", {}, topics)


class FakeKafka:
    """The calls `ResultsConsumer._assign` makes of a `KafkaConsumer`, with the log's start and end."""

    def __init__(self, logs: dict[TopicPartition, tuple[int, int]]) -> None:
        self.logs = logs
        self.positions: dict[TopicPartition, int] = {}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.logs if tp.topic == topic}

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    def beginning_offsets(self, partitions: list[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp][0] for tp in partitions}

    def end_offsets(self, partitions: list[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp][1] for tp in partitions}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset


def test_assignment_warns_of_lost_messages_and_of_a_recreated_topic_and_stores_the_new_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = WorklistStore(tmp_path / "w.db")
    try:
        store.apply([], {("r", 0): 5, ("d", 0): 80, ("i", 0): 30})
        kafka = FakeKafka(
            {TopicPartition("r", 0): (20, 50), TopicPartition("d", 0): (0, 2), TopicPartition("i", 0): (0, 40)}
        )
        consumer = ResultsConsumer(Settings.load(**TOPICS), store)
        with caplog.at_level(logging.INFO, logger="cxr.worklist.consumer"):
            consumer._assign(kafka, set())  # type: ignore[arg-type]
        assert kafka.positions == {TopicPartition("r", 0): 20, TopicPartition("d", 0): 0, TopicPartition("i", 0): 30}
        assert store.offsets() == {("r", 0): 20, ("d", 0): 0, ("i", 0): 30}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2
        assert any("r/0" in w and "15 message(s)" in w for w in warnings)
        assert any("d/0" in w and "looks recreated" in w for w in warnings)
    finally:
        store.close()


def test_from_now_at_the_first_assignment_only_and_never_for_partitions_added_later(tmp_path: Path) -> None:
    store = WorklistStore(tmp_path / "w.db")
    try:
        logs = {TopicPartition("r", 0): (0, 500), TopicPartition("d", 0): (0, 70)}
        kafka = FakeKafka(logs)
        consumer = ResultsConsumer(Settings.load(worklist_start="latest", **TOPICS), store)
        consumer._assign(kafka, set())  # type: ignore[arg-type]
        assert kafka.positions == {TopicPartition("r", 0): 500, TopicPartition("d", 0): 70}
        assert store.offsets() == {("r", 0): 500, ("d", 0): 70}
        logs[TopicPartition("r", 1)] = (0, 9)  # a partition added later
        consumer._assign(kafka, set(kafka.assigned))  # type: ignore[arg-type]
        assert kafka.positions[TopicPartition("r", 1)] == 0
        # a restart (a new consumer, the same file) resumes where the first start began
        again = FakeKafka({**logs, TopicPartition("r", 0): (0, 800)})
        ResultsConsumer(Settings.load(worklist_start="latest", **TOPICS), store)._assign(again, set())  # type: ignore[arg-type]
        assert again.positions == {TopicPartition("r", 0): 500, TopicPartition("d", 0): 70, TopicPartition("r", 1): 0}
    finally:
        store.close()


def test_the_bundles_normal_labels_score_only_that_models_results() -> None:
    mine = Record("r", 0, 0, result_value())  # model "m": NORMAL 0.2, PNEUMONIA 0.8, top finding PNEUMONIA
    labels = NormalLabels("m", ("PNEUMONIA",))  # deliberately odd, so that applying them shows
    [event] = convert(batches(mine), **TOPICS, normal_labels=labels).records
    assert isinstance(event, ImageEvent) and event.score == pytest.approx(0.2)
    [event] = convert(batches(mine), **TOPICS, normal_labels=NormalLabels("other", ("PNEUMONIA",))).records
    assert isinstance(event, ImageEvent) and event.score == pytest.approx(0.8)  # the top finding's score


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(first_s=0.5, max_s=10.0)
    assert [backoff.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_short_error_is_one_bounded_line_without_the_type_twice() -> None:
    class KafkaTimeoutError(Exception):
        def __str__(self) -> str:
            return "KafkaTimeoutError: Unable to bootstrap"

    assert short_error(KafkaTimeoutError()) == "KafkaTimeoutError: Unable to bootstrap"
    assert short_error(OSError("disk full\nsecond line")) == "OSError: disk full"
    assert short_error(RuntimeError()) == "RuntimeError"
    assert len(short_error(ValueError("x" * 5000))) <= 200


def test_the_client_never_joins_a_group_nor_commits_whatever_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_KAFKA__GROUP_ID", "someone-elses-group")
    monkeypatch.setenv("CXR_KAFKA__ENABLE_AUTO_COMMIT", "true")
    monkeypatch.setenv("CXR_KAFKA__AUTO_OFFSET_RESET", "latest")
    monkeypatch.setenv("CXR_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CXR_KAFKA__CLIENT_ID", "site-worklist")
    store = WorklistStore(tmp_path / "w.db")
    try:
        config = ResultsConsumer(Settings.load(kafka_bootstrap_servers="k1:9092,k2:9092"), store)._client_config()
    finally:
        store.close()
    assert config["group_id"] is None and config["enable_auto_commit"] is False
    assert config["auto_offset_reset"] == "earliest"  # a lost position re-reads; replays are de-duplicated
    assert config["security_protocol"] == "SASL_SSL" and config["client_id"] == "site-worklist"
    assert config["bootstrap_servers"] == ["k1:9092", "k2:9092"]


def test_no_broker_is_reported_retried_and_never_delays_stop(tmp_path: Path) -> None:
    store = WorklistStore(tmp_path / "w.db")
    old = ImageEvent(Kind.ANNOUNCED, "old", "S-old", datetime.now(UTC) - timedelta(days=1), datetime.now(UTC))
    store.apply([old], {})
    store.mark_read("S-old", None)
    time.sleep(0.1)  # longer ago than the retention below (a tenth of a second is 1.2e-6 days)
    settings = Settings.load(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}", worklist_retention_days=1e-6)
    consumer = ResultsConsumer(settings, store)
    status = consumer.status()
    assert status == {"connected": False, "last_poll_at": None, "records": 0, "unreadable": 0, "error": None}
    stop = threading.Event()
    before = threading.active_count()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while consumer.status()["error"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        status = consumer.status()
        assert status["connected"] is False and status["error"] and "\n" not in status["error"]
        json.dumps(status)
        assert store.counts()["read"] == 0  # pruned at start, whether or not Kafka answers
    finally:
        stopping = time.monotonic()
        stop.set()
        thread.join(10)
        store.close()
    assert not thread.is_alive() and time.monotonic() - stopping < 1.5
    time.sleep(0.2)
    assert threading.active_count() <= before  # no client thread left behind by the failed attempts
