"""The export loop's decisions, without Kafka: which records advance the cursor, which are retried (and nothing
after them), which become one export dead letter (replayable, with its reason), and that no message content
reaches the log. The records are shaped like kafka-python's `ConsumerRecord`; the exporter, the producer and the
consumer are fakes recording what the loop asked of them."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaConfigurationError, KafkaTimeoutError

from exporters import runner as runner_module
from exporters import service
from exporters.cursor import ExportCursor
from exporters.errors import ExportCode, ExportError
from exporters.fhir import build_bundle, bundle_json
from exporters.fhir_server import FhirServerSink
from exporters.folder import FolderSink
from exporters.interpret import ModelRules, rules_for
from exporters.metrics import ExportMetrics
from exporters.runner import DEAD_LETTER_SCHEMA, ExportRunner, KafkaOut, dead_letter_body
from exporters.service import ExportConfigError, FhirExporter, SrExporter, make_exporter, sr_sinks
from producers.state import StateError, state_file
from streaming.backoff import Backoff
from streaming.contracts import parse_timestamp
from streaming.errors import ErrorCode, FetchError
from streaming.fetch import FetchPolicy
from streaming.settings import Settings, default_bundle_dir
from worklist.events import ImageEvent, read_result

TOPIC = "cxr.results"
DESTINATION = "kafka:cxr.fhir, https://fhir.example/r4"
#: Something a message may carry that must never be logged (a patient's name, as in a DICOM header).
SECRET = "DOE^JANE"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


def result_body(event_id: str = "e1", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": "cxr.result/v1",
        "event_id": event_id,
        "uri": "file:///x.dcm",
        "study_uid": "1.2",
        "series_uid": "1.3",
        "sop_instance_uid": "1.4",
        "accession": "ACC1",
        "model": {"name": "pneumonia-xception", "version": "1.0.0"},
        "scores": {"NORMAL": 0.07, "PNEUMONIA": 0.93},
        "top_finding": "PNEUMONIA",
        "priority": "STAT",
        "sent_at": "2026-11-26T10:00:00.000Z",
        "scored_at": "2026-11-26T10:00:01.000Z",
        "latency_ms": 1000.0,
    }
    body.update(changes)
    return body


def value_of(event_id: str = "e1", **changes: Any) -> bytes:
    # An extra field the reader ignores: content that must not reach any log line.
    return json.dumps(result_body(event_id, patient_name=SECRET, **changes)).encode("utf-8")


def record(offset: int, value: bytes | str | None, partition: int = 0, topic: str = TOPIC) -> SimpleNamespace:
    """Like kafka-python's ConsumerRecord (the fields the runner reads, and a few more)."""
    return SimpleNamespace(
        topic=topic,
        partition=partition,
        offset=offset,
        timestamp=int(time.time() * 1000),
        timestamp_type=0,
        key=None,
        value=value,
        headers=[],
    )


def result_record(offset: int, event_id: str, partition: int = 0) -> SimpleNamespace:
    return record(offset, value_of(event_id), partition)


Outcome = bool | BaseException


class FakeExporter:
    """Answers per event id: True (exported), False (skipped) or an exception to raise; a list is one answer
    per attempt (the last one repeats)."""

    name = "fhir"
    destination = DESTINATION

    def __init__(self, outcomes: Mapping[str, Outcome | list[Outcome]] | None = None) -> None:
        self.outcomes: dict[str, list[Outcome]] = {
            k: list(v) if isinstance(v, list) else [v] for k, v in (outcomes or {}).items()
        }
        self.attempts: list[str] = []
        self.results: list[ImageEvent] = []
        self.closed = False

    def export(self, result: ImageEvent) -> bool:
        self.attempts.append(result.event_id)
        self.results.append(result)
        answers = self.outcomes.get(result.event_id, [True])
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        self.closed = True


class RecordingOut(KafkaOut):
    """The exporter's producer, recording each send; `failures` sends fail (Kafka away) before any succeeds."""

    def __init__(self, settings: Settings, failures: int = 0) -> None:
        super().__init__(settings)
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.failures = failures
        self.closed = False

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ExportError(ExportCode.UNAVAILABLE, f"Kafka did not take the message for {topic}: timed out")
        self.sent.append((topic, key, value))

    def close(self) -> None:
        self.closed = True

    def letters(self) -> list[dict[str, Any]]:
        return [json.loads(value) for _, _, value in self.sent]


class FakeConsumer:
    def __init__(self, assigned: Sequence[TopicPartition]) -> None:
        self.assigned = set(assigned)
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.load(state_dir=tmp_path / "state", kafka_bootstrap_servers="kafka.invalid:9092")


@pytest.fixture
def metrics() -> ExportMetrics:
    return ExportMetrics("fhir", 120.0)


def make_runner(
    settings: Settings,
    metrics: ExportMetrics,
    exporter: FakeExporter | None = None,
    out: RecordingOut | None = None,
) -> tuple[ExportRunner, FakeExporter, RecordingOut]:
    exporter = exporter if exporter is not None else FakeExporter()
    out = out if out is not None else RecordingOut(settings)
    return ExportRunner(settings, exporter, metrics, out), exporter, out


def count(metrics: ExportMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"exporter": "fhir", **labels})


def go(runner: ExportRunner, batches: Mapping[TopicPartition, Sequence[Any]]) -> bool:
    return runner._export(batches, threading.Event())


# ------------------------------------------------------------------------------------------------ the cursor


def test_the_runner_opens_its_own_cursor(settings: Settings, metrics: ExportMetrics) -> None:
    runner, _, _ = make_runner(settings, metrics)
    assert runner.topic == TOPIC
    assert runner.cursor.source == f"{TOPIC} → {DESTINATION}"
    assert runner.cursor.path == state_file(settings.state_dir, "export-fhir", f"{TOPIC} → {DESTINATION}")
    assert runner.cursor.offsets == {}
    assert not runner.cursor.path.exists()


def test_a_saved_cursor_is_resumed_and_a_corrupt_one_refused(settings: Settings, metrics: ExportMetrics) -> None:
    cursor = ExportCursor.open(settings.state_dir, "fhir", f"{TOPIC} → {DESTINATION}")
    cursor.advance({0: 41, 1: 3})
    cursor.save()
    runner, _, _ = make_runner(settings, metrics)
    assert runner.cursor.offsets == {0: 41, 1: 3}

    cursor.path.write_text('{"schema": "cxr.export-cursor/v1"}', "utf-8")
    with pytest.raises(StateError):
        make_runner(settings, metrics)


def test_exported_and_skipped_results_advance_the_cursor(settings: Settings, metrics: ExportMetrics) -> None:
    runner, exporter, out = make_runner(settings, metrics, FakeExporter({"e2": False}))
    assert go(runner, {P0: [result_record(10, "e1"), result_record(11, "e2"), result_record(12, "e3")]})
    assert exporter.attempts == ["e1", "e2", "e3"]
    assert runner.cursor.offsets == {0: 13}
    assert runner._unsaved
    assert out.sent == []
    assert count(metrics, "cxr_export_results_total", outcome="exported") == 2
    assert count(metrics, "cxr_export_results_total", outcome="skipped") == 1
    assert count(metrics, "cxr_export_results_total", outcome="dead_letter") == 0
    runner._save()
    assert not runner._unsaved
    assert ExportCursor.open(settings.state_dir, "fhir", runner.cursor.source).offsets == {0: 13}


def test_the_exporter_gets_the_result_as_the_worklist_reads_it(settings: Settings, metrics: ExportMetrics) -> None:
    runner, exporter, _ = make_runner(settings, metrics)
    rec = result_record(0, "e1")
    assert go(runner, {P0: [rec]})
    [got] = exporter.results
    assert got == read_result(rec.value, rec.timestamp)
    assert (got.event_id, got.study_uid, got.sop_instance_uid, got.uri) == ("e1", "1.2", "1.4", "file:///x.dcm")
    assert (got.model_name, got.model_version, got.top_finding) == ("pneumonia-xception", "1.0.0", "PNEUMONIA")


def test_partitions_in_order_each_with_its_own_offset(settings: Settings, metrics: ExportMetrics) -> None:
    runner, exporter, _ = make_runner(settings, metrics)
    batches = {
        P1: [result_record(3, "b1", 1), result_record(4, "b2", 1)],
        P0: [result_record(7, "a1", 0)],
    }
    assert go(runner, batches)
    assert exporter.attempts == ["a1", "b1", "b2"]
    assert runner.cursor.offsets == {0: 8, 1: 5}


def test_an_empty_poll_changes_nothing(settings: Settings, metrics: ExportMetrics) -> None:
    runner, exporter, _ = make_runner(settings, metrics)
    assert go(runner, {})
    assert go(runner, {P0: []})
    assert exporter.attempts == []
    assert runner.cursor.offsets == {}
    assert not runner._unsaved


def test_a_stop_leaves_the_rest_for_the_next_start(settings: Settings, metrics: ExportMetrics) -> None:
    runner, exporter, _ = make_runner(settings, metrics)
    stop = threading.Event()
    stop.set()
    assert runner._export({P0: [result_record(0, "e1")]}, stop)
    assert exporter.attempts == []
    assert runner.cursor.offsets == {}


# ------------------------------------------------------------------------------------------------ retries


def test_a_transient_failure_stops_at_that_result(settings: Settings, metrics: ExportMetrics) -> None:
    away = ExportError(ExportCode.UNAVAILABLE, "the FHIR server answered HTTP 503")
    runner, exporter, out = make_runner(settings, metrics, FakeExporter({"e2": [away, away, True]}))
    batch = [result_record(10, "e1"), result_record(11, "e2"), result_record(12, "e3")]

    assert not go(runner, {P0: batch})
    assert exporter.attempts == ["e1", "e2"]  # nothing after the result to retry
    assert runner.cursor.offsets == {0: 11}  # the records before it advanced; not past it
    assert out.sent == []  # retried, not dead-lettered
    assert count(metrics, "cxr_export_retries_total", error="unavailable") == 1
    assert count(metrics, "cxr_export_retrying") == 1
    assert count(metrics, "cxr_export_dead_letters_total", error="unavailable") is None

    # The loop rewinds to the cursor: the same result comes first again.
    assert not go(runner, {P0: batch[1:]})
    assert runner.cursor.offsets == {0: 11}
    assert count(metrics, "cxr_export_retries_total", error="unavailable") == 2

    assert go(runner, {P0: batch[1:]})
    assert exporter.attempts == ["e1", "e2", "e2", "e2", "e3"]
    assert runner.cursor.offsets == {0: 13}
    assert count(metrics, "cxr_export_retrying") == 0
    assert count(metrics, "cxr_export_results_total", outcome="exported") == 3


def test_a_transient_failure_on_a_later_partition_keeps_the_earlier_ones(
    settings: Settings, metrics: ExportMetrics
) -> None:
    away = ExportError(ExportCode.UNAVAILABLE, "timed out")
    runner, _, _ = make_runner(settings, metrics, FakeExporter({"b1": away}))
    assert not go(runner, {P0: [result_record(5, "a1", 0)], P1: [result_record(0, "b1", 1)]})
    assert runner.cursor.offsets == {0: 6}


def test_a_success_resets_the_retry_backoff(settings: Settings, metrics: ExportMetrics) -> None:
    runner, _, _ = make_runner(settings, metrics)
    for _ in range(3):
        runner._retry.next_delay()
    assert runner._retry.failing
    assert go(runner, {P0: [result_record(0, "e1")]})
    assert not runner._retry.failing


def test_the_retry_warning_is_logged_once_per_outage(
    settings: Settings, metrics: ExportMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    away = ExportError(ExportCode.UNAVAILABLE, "the FHIR server answered HTTP 503")
    runner, _, _ = make_runner(settings, metrics, FakeExporter({"e1": away}))
    with caplog.at_level(logging.INFO, logger="cxr.exporters"):
        assert not go(runner, {P0: [result_record(0, "e1")]})
        runner._retry.next_delay()  # what the loop does before trying again
        assert not go(runner, {P0: [result_record(0, "e1")]})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "event e1" in warnings[0] and "cxr.results/0@0" in warnings[0] and "HTTP 503" in warnings[0]


# ------------------------------------------------------------------------------------------------ dead letters


def assert_recent(moment: str) -> None:
    parsed = parse_timestamp(moment)
    assert moment.endswith("Z")
    assert abs(parsed - datetime.now(UTC)) < timedelta(minutes=1)


def test_a_permanent_failure_is_one_dead_letter_and_the_loop_moves_on(
    settings: Settings, metrics: ExportMetrics
) -> None:
    refused = ExportError(ExportCode.REJECTED, "the FHIR server refused the bundle (HTTP 422)")
    runner, exporter, out = make_runner(settings, metrics, FakeExporter({"e1": refused}))
    rec = result_record(10, "e1", partition=1)

    assert go(runner, {P1: [rec, result_record(11, "e2", partition=1)]})
    assert exporter.attempts == ["e1", "e2"]
    assert runner.cursor.offsets == {1: 12}
    [(topic, key, raw)] = out.sent
    assert topic == settings.export_dead_letter_topic == "cxr.export-dead-letter"
    assert key == b"e1"
    letter = json.loads(raw)
    assert set(letter) == {
        "schema",
        "exporter",
        "destination",
        "event_id",
        "error",
        "reason",
        "payload",
        "source",
        "failed_at",
    }
    assert letter["schema"] == DEAD_LETTER_SCHEMA == "cxr.export-dead-letter/v1"
    assert letter["exporter"] == "fhir"
    assert letter["destination"] == DESTINATION
    assert letter["event_id"] == "e1"
    assert letter["error"] == "rejected"
    assert letter["reason"] == "the FHIR server refused the bundle (HTTP 422)"
    assert letter["payload"] == rec.value.decode("utf-8")  # replayable: the message as it was
    assert read_result(letter["payload"], rec.timestamp) == read_result(rec.value, rec.timestamp)
    assert letter["source"] == {"topic": TOPIC, "partition": 1, "offset": 10}
    assert_recent(letter["failed_at"])
    assert count(metrics, "cxr_export_dead_letters_total", error="rejected") == 1
    assert count(metrics, "cxr_export_results_total", outcome="dead_letter") == 1
    assert count(metrics, "cxr_export_results_total", outcome="exported") == 1


@pytest.mark.parametrize("code", [c for c in ExportCode if c is not ExportCode.UNAVAILABLE])
def test_every_permanent_code_is_dead_lettered(settings: Settings, metrics: ExportMetrics, code: ExportCode) -> None:
    runner, _, out = make_runner(settings, metrics, FakeExporter({"e1": ExportError(code, "why")}))
    assert go(runner, {P0: [result_record(0, "e1")]})
    assert [letter["error"] for letter in out.letters()] == [code.value]
    assert count(metrics, "cxr_export_dead_letters_total", error=code.value) == 1


@pytest.mark.parametrize(
    ("value", "encoding"),
    [
        (b'{"schema": "cxr.result/v1", "event_id": "e1", "patient": "' + SECRET.encode() + b'"', None),
        (b"\xff\xfe" + SECRET.encode(), "base64"),
        (json.dumps(result_body(schema="cxr.reference/v1", patient_name=SECRET)).encode(), None),
        (json.dumps(result_body(scores={"PNEUMONIA": 1.5}, patient_name=SECRET)).encode(), None),
        (json.dumps([SECRET]).encode(), None),
        ("not json " + SECRET, None),
        (None, None),
    ],
    ids=["bad-json", "not-utf8", "wrong-schema", "bad-scores", "not-object", "str", "tombstone"],
)
def test_an_unreadable_message_is_dead_lettered_without_an_event_id(
    settings: Settings,
    metrics: ExportMetrics,
    caplog: pytest.LogCaptureFixture,
    value: bytes | str | None,
    encoding: str | None,
) -> None:
    runner, exporter, out = make_runner(settings, metrics)
    with caplog.at_level(logging.DEBUG, logger="cxr.exporters"):
        assert go(runner, {P0: [record(7, value), result_record(8, "e2")]})
    assert exporter.attempts == ["e2"]
    assert runner.cursor.offsets == {0: 9}
    [(_, key, raw)] = out.sent
    assert key is None
    letter = json.loads(raw)
    assert letter["event_id"] is None
    assert letter["error"] == "unreadable_result"
    assert letter["exporter"] == "fhir" and letter["destination"] == DESTINATION
    assert letter["source"] == {"topic": TOPIC, "partition": 0, "offset": 7}
    assert_recent(letter["failed_at"])
    if value is None:
        assert letter["payload"] is None
    elif encoding == "base64":
        assert letter["payload_encoding"] == "base64"
        assert base64.b64decode(letter["payload"]) == value
    else:
        assert "payload_encoding" not in letter
        assert letter["payload"] == (value if isinstance(value, str) else value.decode("utf-8"))
    assert SECRET not in letter["reason"]
    assert count(metrics, "cxr_export_dead_letters_total", error="unreadable_result") == 1
    assert SECRET not in caplog.text


def test_a_bug_in_the_reader_is_dead_lettered_naming_only_its_type(
    settings: Settings, metrics: ExportMetrics, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_reader(value: bytes | str | None, timestamp_ms: int | None) -> ImageEvent:
        raise KeyError(SECRET)

    monkeypatch.setattr(runner_module, "read_result", broken_reader)
    runner, exporter, out = make_runner(settings, metrics)
    with caplog.at_level(logging.INFO, logger="cxr.exporters"):
        assert go(runner, {P0: [result_record(0, "e1")]})
    assert exporter.attempts == []
    [letter] = out.letters()
    assert letter["error"] == "unreadable_result"
    assert letter["reason"] == "the result could not be read (KeyError)"
    assert letter["event_id"] is None
    assert runner.cursor.offsets == {0: 1}
    assert SECRET not in caplog.text


def test_an_unexpected_exception_is_an_invalid_export_naming_only_its_type(
    settings: Settings, metrics: ExportMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    bug = RuntimeError(f"cannot encode PatientName {SECRET}")
    runner, exporter, out = make_runner(settings, metrics, FakeExporter({"e1": bug}))
    with caplog.at_level(logging.INFO, logger="cxr.exporters"):
        assert go(runner, {P0: [result_record(4, "e1"), result_record(5, "e2")]})
    assert exporter.attempts == ["e1", "e2"]
    assert runner.cursor.offsets == {0: 6}
    [letter] = out.letters()
    assert letter["error"] == "invalid_export"
    assert letter["reason"] == "the export failed unexpectedly (RuntimeError)"
    assert letter["event_id"] == "e1"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["event e1 (cxr.results/0@4): the export failed unexpectedly (RuntimeError)"]
    assert SECRET not in caplog.text
    assert count(metrics, "cxr_export_dead_letters_total", error="invalid_export") == 1


def test_a_dead_letter_kafka_does_not_take_is_retried(settings: Settings, metrics: ExportMetrics) -> None:
    refused = ExportError(ExportCode.REJECTED, "HTTP 400")
    out = RecordingOut(settings, failures=2)
    runner, exporter, _ = make_runner(settings, metrics, FakeExporter({"e1": refused}), out)
    batch = [result_record(0, "done"), result_record(1, "e1"), result_record(2, "e2")]

    assert not go(runner, {P0: batch})
    assert runner.cursor.offsets == {0: 1}  # not past the result whose dead letter Kafka lacks
    assert out.sent == []
    assert count(metrics, "cxr_export_retries_total", error="unavailable") == 1
    assert count(metrics, "cxr_export_retrying") == 1
    assert count(metrics, "cxr_export_dead_letters_total", error="rejected") == 0
    assert count(metrics, "cxr_export_results_total", outcome="dead_letter") == 0

    assert not go(runner, {P0: batch[1:]})
    assert runner.cursor.offsets == {0: 1}

    assert go(runner, {P0: batch[1:]})
    assert exporter.attempts == ["done", "e1", "e1", "e1", "e2"]
    assert [letter["event_id"] for letter in out.letters()] == ["e1"]  # one letter, not one per attempt
    assert runner.cursor.offsets == {0: 3}
    assert count(metrics, "cxr_export_dead_letters_total", error="rejected") == 1
    assert count(metrics, "cxr_export_retrying") == 0


def test_an_unreadable_messages_dead_letter_is_retried_too(settings: Settings, metrics: ExportMetrics) -> None:
    runner, _, out = make_runner(settings, metrics, out=RecordingOut(settings, failures=1))
    assert not go(runner, {P0: [record(0, b"{")]})
    assert runner.cursor.offsets == {}
    assert go(runner, {P0: [record(0, b"{")]})
    assert runner.cursor.offsets == {0: 1}
    assert len(out.sent) == 1


def test_a_big_payload_is_cut_and_marked(tmp_path: Path, metrics: ExportMetrics) -> None:
    settings = Settings.load(state_dir=tmp_path, dead_letter_payload_max_bytes=200)
    runner, _, out = make_runner(settings, metrics, FakeExporter({"e1": ExportError(ExportCode.REJECTED, "no")}))
    value = value_of("e1", comment="x" * 5000)
    assert go(runner, {P0: [record(0, value)]})
    [letter] = out.letters()
    assert letter["payload_truncated"] is True
    assert letter["payload_bytes"] == len(value)
    assert value.decode("utf-8").startswith(letter["payload"])
    assert len(json.dumps(letter["payload"])) <= 200


def test_dead_letter_body_of_a_str_value() -> None:
    exporter = FakeExporter()
    rec = record(3, "{}", partition=2, topic="other")
    body = dead_letter_body(exporter, ExportError(ExportCode.REJECTED, "why"), rec, "e9", 1024)
    assert body["payload"] == "{}"
    assert body["source"] == {"topic": "other", "partition": 2, "offset": 3}
    assert body["event_id"] == "e9"


# ------------------------------------------------------------------------------------------------ rewind, save


def test_rewind_seeks_every_assigned_partition_to_the_cursor(settings: Settings, metrics: ExportMetrics) -> None:
    runner, _, _ = make_runner(settings, metrics)
    runner.cursor.advance({0: 5, 1: 9})
    p2 = TopicPartition(TOPIC, 2)
    consumer = FakeConsumer([P0, P1, p2])
    runner._rewind(consumer)
    assert sorted(consumer.seeks) == [(P0, 5), (P1, 9)]  # a partition the cursor does not know is left alone


def test_a_transient_failure_then_rewind_replays_from_the_failed_result(
    settings: Settings, metrics: ExportMetrics
) -> None:
    away = ExportError(ExportCode.UNAVAILABLE, "timed out")
    runner, _, _ = make_runner(settings, metrics, FakeExporter({"e2": away}))
    assert not go(runner, {P0: [result_record(10, "e1"), result_record(11, "e2")], P1: [result_record(3, "f", 1)]})
    consumer = FakeConsumer([P0, P1])
    runner._rewind(consumer)
    assert consumer.seeks == [(P0, 11)]  # partition 1 was never reached: the consumer's own position stands


def test_a_cursor_that_cannot_be_saved_is_kept_and_saved_later(
    settings: Settings, metrics: ExportMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    runner, _, _ = make_runner(settings, metrics)
    assert go(runner, {P0: [result_record(0, "e1")]})
    folder = runner.cursor.path.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_bytes(b"a file where the cursor's folder should be")  # every write there fails

    with caplog.at_level(logging.INFO, logger="cxr.exporters"):
        runner._save()
    assert runner._unsaved
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "cannot save the export cursor" in error.getMessage()
    assert str(runner.cursor.path) in error.getMessage()

    assert go(runner, {P0: [result_record(1, "e2")]})  # the loop goes on meanwhile
    folder.unlink()
    runner._save()
    assert not runner._unsaved
    assert ExportCursor.open(settings.state_dir, "fhir", runner.cursor.source).offsets == {0: 2}


def test_a_failing_save_is_retried_on_the_next_save(
    settings: Settings, metrics: ExportMetrics, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runner, _, _ = make_runner(settings, metrics)
    assert go(runner, {P0: [result_record(0, "e1")]})
    calls: list[int] = []

    def full_disk() -> None:
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner.cursor, "save", full_disk)
    with caplog.at_level(logging.ERROR, logger="cxr.exporters"):
        runner._save()
        runner._save()
    assert len(calls) == 2
    assert runner._unsaved
    assert all("No space left on device" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    runner._save()
    assert not runner._unsaved
    calls.clear()
    runner._save()  # nothing new: nothing written
    assert calls == []


def test_nothing_to_save_writes_nothing(settings: Settings, metrics: ExportMetrics) -> None:
    runner, _, _ = make_runner(settings, metrics)
    runner._save()
    assert not runner.cursor.path.exists()


def test_close_closes_the_producer_and_the_exporter(settings: Settings, metrics: ExportMetrics) -> None:
    runner, exporter, out = make_runner(settings, metrics)
    runner._close()
    assert out.closed and exporter.closed


# ------------------------------------------------------------------------------------------------ logs


def test_no_message_content_in_any_log_record(
    settings: Settings, metrics: ExportMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: dict[str, Outcome | list[Outcome]] = {
        "rejected": ExportError(ExportCode.REJECTED, "HTTP 422"),
        "away": [ExportError(ExportCode.UNAVAILABLE, "HTTP 503"), True],
        "bug": ValueError(f"bad PN {SECRET}"),
        "skip": False,
    }
    runner, _, _ = make_runner(settings, metrics, FakeExporter(outcomes), RecordingOut(settings, failures=1))
    batch = [
        record(0, b"{" + SECRET.encode()),
        result_record(1, "rejected"),
        result_record(2, "away"),
        result_record(3, "bug"),
        result_record(4, "skip"),
        result_record(5, "fine"),
    ]
    with caplog.at_level(logging.INFO):
        offset = 0
        for _ in range(10):
            if go(runner, {P0: [r for r in batch if r.offset >= offset]}):
                break
            offset = runner.cursor.offsets.get(0, 0)
        runner._save()
    assert runner.cursor.offsets == {0: 6}
    assert caplog.records
    for rec in caplog.records:
        assert SECRET not in rec.getMessage()
        assert SECRET not in str(rec.args)
    assert SECRET not in caplog.text


# ------------------------------------------------------------------------------------------------ KafkaOut


class FakeFuture:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def get(self, timeout: float | None = None) -> object:
        if self.error is not None:
            raise self.error
        return object()


class FakeProducer:
    DEFAULT_CONFIG = runner_module.KafkaProducer.DEFAULT_CONFIG
    made: list[FakeProducer] = []  # noqa: RUF012
    errors: list[Exception | None] = []  # noqa: RUF012

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.closed = False
        FakeProducer.made.append(self)

    def send(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> FakeFuture:
        assert value is not None
        self.sent.append((topic, key, value))
        return FakeFuture(FakeProducer.errors.pop(0) if FakeProducer.errors else None)

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    FakeProducer.made, FakeProducer.errors = [], []
    monkeypatch.setattr(runner_module, "KafkaProducer", FakeProducer)
    return FakeProducer


def test_kafka_out_sends_reliably_and_waits(fake_producer: type[FakeProducer], tmp_path: Path) -> None:
    settings = Settings.load(state_dir=tmp_path, export_timeout_s=7.0, kafka_bootstrap_servers="k1:9092,k2:9092")
    out = KafkaOut(settings)
    out.send("cxr.fhir", b"id", b"{}")
    out.send("cxr.fhir", None, b"{}")
    [producer] = fake_producer.made
    assert producer.sent == [("cxr.fhir", b"id", b"{}"), ("cxr.fhir", None, b"{}")]
    assert producer.config["acks"] == "all"
    assert producer.config["enable_idempotence"] is True
    assert producer.config["max_block_ms"] == 7000
    assert producer.config["client_id"] == "cxr-export"
    assert producer.config["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    out.close()
    assert producer.closed


def test_kafka_out_failure_is_unavailable_and_makes_a_new_producer(
    fake_producer: type[FakeProducer], settings: Settings
) -> None:
    fake_producer.errors = [KafkaTimeoutError("Timeout after waiting for 30000 ms")]
    out = KafkaOut(settings)
    with pytest.raises(ExportError) as caught:
        out.send("cxr.export-dead-letter", None, b"{}")
    assert caught.value.code is ExportCode.UNAVAILABLE
    assert caught.value.transient
    assert "cxr.export-dead-letter" in caught.value.reason
    assert "KafkaTimeoutError" in caught.value.reason
    assert caught.value.__suppress_context__  # the reason says it; no chained traceback
    first = fake_producer.made[0]
    assert first.closed
    out.send("cxr.export-dead-letter", None, b"{}")
    assert len(fake_producer.made) == 2


def test_kafka_out_configuration_errors_are_not_retried(fake_producer: type[FakeProducer], settings: Settings) -> None:
    fake_producer.errors = [KafkaConfigurationError("Unrecognized configs")]
    with pytest.raises(KafkaConfigurationError):
        KafkaOut(settings).send("cxr.fhir", None, b"{}")


def test_the_retry_backoff_is_capped_by_the_setting(tmp_path: Path, metrics: ExportMetrics) -> None:
    settings = Settings.load(state_dir=tmp_path, export_retry_max_s=2.0)
    runner, _, _ = make_runner(settings, metrics)
    delays = [runner._retry.next_delay() for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert isinstance(runner._backoff, Backoff)


# ------------------------------------------------------------------------------------------------ the exporters
# (exporters/service.py: what the loop drives; kept here because no test_service.py was asked for)


class RecordingServer(FhirServerSink):
    """A FHIR server sink that records what it was given instead of POSTing it."""

    def __init__(self, error: ExportError | None = None) -> None:
        self.destination = "fhir:https://fhir.example/r4"
        self.posted: list[bytes] = []
        self.error = error
        self.closed = False

    def post(self, bundle: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.posted.append(bundle)

    def close(self) -> None:
        self.closed = True


def demo_result(version: str = "0.3.0", **changes: Any) -> ImageEvent:
    body = result_body(model={"name": "pneumonia-xception", "version": version}, **changes)
    return read_result(json.dumps(body).encode("utf-8"), None)


def test_the_fhir_exporter_publishes_then_posts_the_same_bundle(settings: Settings) -> None:
    rules = ModelRules.of_bundle(default_bundle_dir())
    out, server = RecordingOut(settings), RecordingServer()
    exporter = FhirExporter(out, "cxr.fhir", server, rules)
    assert exporter.name == "fhir"
    assert exporter.destination == "kafka:cxr.fhir, fhir:https://fhir.example/r4"
    result = demo_result()

    assert exporter.export(result) is True
    bundle = build_bundle(result, rules)
    [(topic, key, data)] = out.sent
    assert (topic, key) == ("cxr.fhir", str(bundle["id"]).encode("utf-8"))
    assert data == bundle_json(bundle)
    assert server.posted == [data]
    exporter.close()
    assert server.closed


def test_the_fhir_exporter_posts_nothing_when_kafka_did_not_take_the_bundle(settings: Settings) -> None:
    out, server = RecordingOut(settings, failures=1), RecordingServer()
    exporter = FhirExporter(out, "cxr.fhir", server, None)
    with pytest.raises(ExportError) as caught:
        exporter.export(demo_result())
    assert caught.value.transient
    assert server.posted == []


def test_a_retry_for_the_server_does_not_publish_the_same_bundle_again(settings: Settings) -> None:
    out, server = RecordingOut(settings), RecordingServer(ExportError(ExportCode.UNAVAILABLE, "HTTP 503"))
    exporter = FhirExporter(out, "cxr.fhir", server, None)
    for _ in range(3):
        with pytest.raises(ExportError):
            exporter.export(demo_result())
    server.error = None
    assert exporter.export(demo_result()) is True
    assert len(out.sent) == 1 and len(server.posted) == 1
    assert exporter.export(demo_result(event_id="another")) is True
    assert len(out.sent) == 2


def test_the_fhir_exporter_passes_the_servers_refusal_on(settings: Settings) -> None:
    refused = ExportError(ExportCode.REJECTED, "HTTP 422")
    exporter = FhirExporter(RecordingOut(settings), "cxr.fhir", RecordingServer(refused), None)
    with pytest.raises(ExportError) as caught:
        exporter.export(demo_result())
    assert caught.value is refused


def test_the_fhir_exporter_without_a_server_only_publishes(settings: Settings) -> None:
    out = RecordingOut(settings)
    exporter = FhirExporter(out, "cxr.fhir", None, None)
    assert exporter.destination == "kafka:cxr.fhir"
    assert exporter.export(demo_result()) is True
    assert len(out.sent) == 1
    exporter.close()


def test_the_fhir_exporter_applies_the_rules_of_the_results_own_model_only(settings: Settings) -> None:
    rules = ModelRules.of_bundle(default_bundle_dir())
    assert rules is not None
    out = RecordingOut(settings)
    exporter = FhirExporter(out, "cxr.fhir", None, rules)
    for version in (rules.version, "9.9.9"):
        result = demo_result(version)
        exporter.export(result)
        assert out.sent[-1][2] == bundle_json(build_bundle(result, rules_for(rules, result.model_name, version)))
    assert out.sent[0][2] != out.sent[1][2]


def never_fetch(uri: str, policy: FetchPolicy, deadline: float | None = None) -> bytes:
    raise AssertionError("nothing should be fetched")


def test_the_sr_exporter_skips_a_result_without_a_dicom_instance(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "fetch", never_fetch)
    exporter = SrExporter([FolderSink(settings.state_dir / "sr")], None, FetchPolicy(), 5.0)
    assert exporter.export(demo_result(sop_instance_uid=None, uri="file:///x.png")) is False
    assert exporter.export(demo_result(study_uid=None)) is False


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (ErrorCode.UNAVAILABLE, True),
        (ErrorCode.TIMEOUT, True),
        (ErrorCode.NOT_FOUND, False),
        (ErrorCode.FORBIDDEN_URI, False),
        (ErrorCode.TOO_LARGE, False),
        (ErrorCode.FETCH_FAILED, False),
    ],
)
def test_the_sr_exporter_waits_for_an_image_server_that_is_away_only(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, code: ErrorCode, transient: bool
) -> None:
    seen: list[tuple[str, float | None]] = []

    def failing_fetch(uri: str, policy: FetchPolicy, deadline: float | None = None) -> bytes:
        seen.append((uri, deadline))
        raise FetchError(code, "the server said no")

    monkeypatch.setattr(service, "fetch", failing_fetch)
    exporter = SrExporter([FolderSink(settings.state_dir / "sr")], None, FetchPolicy(), 5.0)
    before = time.monotonic()
    with pytest.raises(ExportError) as caught:
        exporter.export(demo_result())
    assert caught.value.transient is transient
    assert caught.value.code is (ExportCode.UNAVAILABLE if transient else ExportCode.SOURCE_UNREADABLE)
    assert caught.value.reason == f"the scored image cannot be read back ({code.value}): the server said no"
    [(uri, deadline)] = seen
    assert uri == "file:///x.dcm"
    assert deadline is not None and before + 5.0 <= deadline <= time.monotonic() + 5.0
    assert not list((settings.state_dir / "sr").glob("*"))


def test_sr_sinks_needs_somewhere_to_store(settings: Settings) -> None:
    with pytest.raises(ExportConfigError, match="CXR_SR_STOW_URL, CXR_SR_CSTORE, CXR_SR_OUTPUT_DIR"):
        sr_sinks(settings)


def test_sr_sinks_refuses_a_malformed_destination(tmp_path: Path) -> None:
    with pytest.raises(ExportConfigError, match="http"):
        sr_sinks(Settings.load(state_dir=tmp_path, sr_stow_url="ftp://pacs/dicom-web"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ExportConfigError, match="not a folder"):
        sr_sinks(Settings.load(state_dir=tmp_path, sr_output_dir=tmp_path / "file"))


def test_make_exporter(tmp_path: Path) -> None:
    out = RecordingOut(Settings.load(state_dir=tmp_path))
    fhir = make_exporter("fhir", Settings.load(state_dir=tmp_path), out)
    assert isinstance(fhir, FhirExporter)
    assert (fhir.name, fhir.destination) == ("fhir", "kafka:cxr.fhir")
    assert fhir.rules is not None and fhir.rules.name == "pneumonia-xception"

    settings = Settings.load(state_dir=tmp_path, fhir_server_url="https://fhir.example/r4/", fhir_topic="t.fhir")
    served = make_exporter("fhir", settings, out)
    assert served.destination == "kafka:t.fhir, fhir:https://fhir.example/r4"
    served.close()

    sr = make_exporter("sr", Settings.load(state_dir=tmp_path, sr_output_dir=tmp_path / "out"), out)
    assert isinstance(sr, SrExporter)
    assert (sr.name, sr.destination) == ("sr", f"folder:{tmp_path / 'out'}")

    with pytest.raises(ExportConfigError, match="credentials"):
        make_exporter("fhir", Settings.load(state_dir=tmp_path, fhir_server_url="https://u:p@fhir.example/r4"), out)
    with pytest.raises(ExportConfigError, match="no exporter named 'hl7'"):
        make_exporter("hl7", Settings.load(state_dir=tmp_path), out)


def test_without_a_bundle_the_exporters_still_start(tmp_path: Path) -> None:
    settings = Settings.load(state_dir=tmp_path, model_bundle=tmp_path / "no-bundle")
    fhir = make_exporter("fhir", settings, RecordingOut(settings))
    assert isinstance(fhir, FhirExporter)
    assert fhir.rules is None
