"""Kafka values as worklist records (worklist/events.py): every value is hostile until read.

Each test states one promise: whatever a value's bytes, reading it gives a frozen record or `Unreadable` with a
reason that never quotes the message; a producer's wrong clock cannot move a study by days; a dead letter puts
the failed image on its study when its reference can be read, and is at least a letter when it cannot.
"""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from streaming.contracts import (
    DEAD_LETTER_SCHEMA,
    REFERENCE_SCHEMA,
    RESULT_SCHEMA,
    Reference,
    Source,
    build_dead_letter,
    build_result,
    dumps,
    rfc3339,
)
from streaming.errors import ErrorCode, FetchError
from streaming.triage import Priority
from worklist.events import (
    MAX_CLOCK_SKEW,
    DeadLetter,
    Kind,
    NormalLabels,
    Unreadable,
    kafka_time,
    read_dead_letter,
    read_reference,
    read_result,
)

#: The broker's clock for every message here (Kafka timestamps are milliseconds).
RECEIVED = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
TS = int(RECEIVED.timestamp() * 1000)
SECRET = "DOE^JANE"  # stands in for patient data that must never reach a reason
REF = Reference(
    event_id="ev-1", uri="file:///xrays/1.jpeg", study_uid="1.2.840.1", series_uid="1.2.840.1.1", accession="A7"
)


def result_body(ref: Reference = REF, **changes: Any) -> dict[str, Any]:
    body = build_result(
        ref,
        model={"name": "pneumonia-xception", "version": "0.3.0"},
        scores={"NORMAL": 0.1, "PNEUMONIA": 0.9},
        top_finding="PNEUMONIA",
        priority="URGENT",
        sent_at=RECEIVED - timedelta(seconds=3),
        scored_at=RECEIVED - timedelta(seconds=1),
    )
    body.update(changes)
    return body


def letter_body(payload: Any = None, event_id: Any = "ev-1", **changes: Any) -> dict[str, Any]:
    body = build_dead_letter(
        FetchError(ErrorCode.NOT_FOUND, "the file does not exist"),
        payload=REF.to_json() if payload is None else payload,
        source=Source("cxr.references", 0, 41),
        event_id=event_id,
        failed_at=RECEIVED - timedelta(seconds=2),
    )
    body.update(changes)
    return body


def letter(body: dict[str, Any] | str | bytes | None) -> tuple[DeadLetter, Any]:
    value = dumps(body) if isinstance(body, dict) else body
    return read_dead_letter(value, TS, "cxr.dead-letter", 1, 7)


def unreadable_reason(read: Any, *args: Any) -> str:
    with pytest.raises(Unreadable) as info:
        read(*args)
    reason = str(info.value)
    assert SECRET not in reason and len(reason) < 200
    return reason


# Hostile values, on each of the three topics ------------------------------------------------------------

HOSTILE: list[Any] = [
    None,  # a tombstone
    b"",
    b"\x00\x01\x02\xff\xfe binary " + SECRET.encode(),
    b'{"schema": "' + SECRET.encode() + b'\xff\xfe"}',  # invalid UTF-8 inside JSON
    "[" * 100_000 + "]" * 100_000,  # deep enough to exhaust the parser's recursion
    f"not json {SECRET}",
    json.dumps([SECRET]),
    json.dumps(SECRET),
    "42",
    "null",
    '"\\ud800"',
    json.dumps({"schema": "cxr.other/v9", "event_id": SECRET}),
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_values_are_unreadable_on_every_topic(value: Any) -> None:
    unreadable_reason(read_reference, value, TS)
    unreadable_reason(read_result, value, TS)
    unreadable_reason(read_dead_letter, value, TS, "cxr.dead-letter", 0, 0)


def test_records_are_frozen() -> None:
    event = read_result(dumps(result_body()), TS)
    with pytest.raises(FrozenInstanceError):
        event.priority = Priority.ROUTINE  # type: ignore[misc]


# References ---------------------------------------------------------------------------------------------


def test_reference_announces_the_image_in_its_study() -> None:
    sent = RECEIVED - timedelta(seconds=30)
    event = read_reference(Reference(**_ref_fields(sent)).to_json(), TS)
    assert event.kind is Kind.ANNOUNCED
    assert (event.event_id, event.study_key, event.accession) == ("ev-1", "1.2.840.1", "A7")
    assert event.arrived_at == event.at == sent
    assert event.priority is None and event.score is None


def _ref_fields(sent: datetime) -> dict[str, Any]:
    return {name: getattr(REF, name) for name in Reference.__slots__} | {"sent_at": rfc3339(sent)}


def test_reference_without_study_uid_is_keyed_by_its_event_id() -> None:
    event = read_reference(Reference(event_id="ev-9", uri="file:///x.png").to_json(), TS)
    assert event.study_key == "ev-9" and event.study_uid is None


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"schema": REFERENCE_SCHEMA, "uri": "file:///x"}, "missing_field"),
        ({"schema": REFERENCE_SCHEMA, "event_id": 7, "uri": "file:///x"}, "invalid_field"),
        ({"schema": REFERENCE_SCHEMA, "event_id": "e", "uri": "file:///x", "sent_at": "yesterday"}, "invalid_field"),
        ({"schema": "cxr.reference/v0", "event_id": "e", "uri": "file:///x"}, "unsupported_schema"),
    ],
)
def test_reference_that_breaks_the_contract_says_which_rule(body: dict[str, Any], code: str) -> None:
    assert code in unreadable_reason(read_reference, dumps(body), TS)


# Clock skew ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("days", [-3, 3, -400, 4000])
def test_sent_at_days_away_from_kafka_time_is_replaced_by_it(days: int) -> None:
    skewed = rfc3339(RECEIVED + timedelta(days=days))
    ref = read_reference(Reference(event_id="e", uri="file:///x", sent_at=skewed).to_json(), TS)
    result = read_result(dumps(result_body(sent_at=skewed, scored_at=skewed)), TS)
    assert ref.arrived_at == RECEIVED
    assert result.arrived_at == RECEIVED and result.at == RECEIVED


def test_a_believable_sent_at_is_kept_but_never_later_than_the_broker_received_it() -> None:
    earlier, later = RECEIVED - timedelta(minutes=5), RECEIVED + timedelta(minutes=5)
    assert read_reference(Reference(event_id="e", uri="u:x", sent_at=rfc3339(earlier)).to_json(), TS).arrived_at == (
        earlier
    )
    assert read_reference(Reference(event_id="e", uri="u:x", sent_at=rfc3339(later)).to_json(), TS).arrived_at == (
        RECEIVED
    )


@pytest.mark.parametrize(
    "sent_at", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "2024-13-01T00:00:00Z", "soon"]
)
def test_timestamps_out_of_any_calendar_fall_back_to_kafka_time(sent_at: str) -> None:
    result = read_result(dumps(result_body(sent_at=sent_at, scored_at=sent_at)), TS)
    assert result.arrived_at == RECEIVED and result.at == RECEIVED
    failed_letter, image = letter(letter_body(failed_at=sent_at))
    assert failed_letter.failed_at == RECEIVED and image is not None and image.at == RECEIVED


@pytest.mark.parametrize("timestamp_ms", [None, -1, 0, 2**62, 10**20])
def test_a_missing_or_impossible_kafka_timestamp_is_now(timestamp_ms: int | None) -> None:
    before = datetime.now(UTC)
    assert before <= kafka_time(timestamp_ms) <= datetime.now(UTC)
    read_reference(REF.to_json(), timestamp_ms)  # and reading does not fail on it


def test_the_skew_allowed_is_a_day() -> None:
    assert timedelta(hours=1) < MAX_CLOCK_SKEW <= timedelta(days=1)


# Results ------------------------------------------------------------------------------------------------


def test_result_scores_the_image() -> None:
    event = read_result(dumps(result_body()), TS, normal_labels=("NORMAL",))
    assert event.kind is Kind.SCORED
    assert (event.event_id, event.study_key, event.study_uid) == ("ev-1", "1.2.840.1", "1.2.840.1")
    assert event.priority is Priority.URGENT and event.top_finding == "PNEUMONIA"
    assert event.score == pytest.approx(0.9)
    assert dict(event.scores) == {"NORMAL": 0.1, "PNEUMONIA": 0.9}
    assert (event.model_name, event.model_version) == ("pneumonia-xception", "0.3.0")
    assert event.arrived_at == RECEIVED - timedelta(seconds=3) and event.at == RECEIVED - timedelta(seconds=1)


def test_routine_result_is_ordered_by_its_strongest_finding_when_normal_labels_are_known() -> None:
    body = result_body(scores={"NORMAL": 0.7, "PNEUMONIA": 0.3}, top_finding=None, priority="ROUTINE")
    assert read_result(dumps(body), TS, normal_labels=("NORMAL",)).score == pytest.approx(0.3)
    assert read_result(dumps(body), TS).score == 0.0


def test_a_bundles_normal_labels_score_only_that_models_results() -> None:
    body = result_body(scores={"NORMAL": 0.7, "PNEUMONIA": 0.3}, top_finding=None, priority="ROUTINE")
    bundle = NormalLabels("pneumonia-xception", ("NORMAL",))
    assert read_result(dumps(body), TS, normal_labels=bundle).score == pytest.approx(0.3)
    # another model's labels may mean anything: its result is scored by its own top finding
    other = result_body(
        model={"name": "chexnet", "version": "2"},
        scores={"NORMAL": 0.7, "NODULE": 0.6},
        top_finding="NODULE",
        priority="URGENT",
    )
    assert read_result(dumps(other), TS, normal_labels=bundle).score == pytest.approx(0.6)
    quiet = result_body(model={"name": "chexnet", "version": "2"}, scores={"NORMAL": 0.9, "NODULE": 0.1})
    quiet.update(top_finding=None, priority="ROUTINE")
    assert read_result(dumps(quiet), TS, normal_labels=bundle).score == 0.0
    # a result that names no model is not the bundle's either; nor is anything when no bundle could be read
    nameless = {**body, "model": "xception"}
    assert read_result(dumps(nameless), TS, normal_labels=bundle).score == 0.0
    assert read_result(dumps(body), TS, normal_labels=NormalLabels(None, ("NORMAL",))).score == 0.0
    assert NormalLabels("m", ("N",)).for_model("m") == ("N",) and NormalLabels("m", ("N",)).for_model(None) == ()


def test_result_without_study_uid_is_keyed_by_its_event_id() -> None:
    body = result_body(study_uid=None)
    assert read_result(dumps(body), TS).study_key == "ev-1"


@pytest.mark.parametrize(
    "scores",
    [
        {"PNEUMONIA": 1.5},
        {"PNEUMONIA": -0.1},
        {"PNEUMONIA": True},
        {"PNEUMONIA": "0.9"},
        {"PNEUMONIA": None},
        {},
        [0.9],
        None,
        {str(i): 0.1 for i in range(1001)},
    ],
)
def test_scores_must_be_probabilities(scores: Any) -> None:
    body = result_body(scores=scores, top_finding=None)
    assert "scores" in unreadable_reason(read_result, dumps(body), TS)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_scores_are_refused(value: str) -> None:
    text = dumps(result_body(top_finding=None)).replace('"PNEUMONIA":0.9', f'"PNEUMONIA":{value}')
    assert value in text
    assert "scores" in unreadable_reason(read_result, text, TS)


def test_top_finding_must_be_a_scored_label() -> None:
    body = result_body(top_finding="PNEUMOTHORAX")
    assert "top_finding" in unreadable_reason(read_result, dumps(body), TS)


@pytest.mark.parametrize("priority", [None, "stat", "CRITICAL", 1, SECRET])
def test_priority_must_be_one_of_the_three_classes(priority: Any) -> None:
    assert "priority" in unreadable_reason(read_result, dumps(result_body(priority=priority)), TS)


@pytest.mark.parametrize(
    "changes",
    [
        {"event_id": None},
        {"event_id": ""},
        {"event_id": 12},
        {"uri": None},
        {"study_uid": ["1.2"]},
        {"study_uid": "x" * 9000},
        {"schema": REFERENCE_SCHEMA},
        {"schema": None},
    ],
)
def test_result_fields_are_checked(changes: dict[str, Any]) -> None:
    unreadable_reason(read_result, dumps(result_body(**changes)), TS)


def test_a_result_with_an_odd_model_is_still_a_result() -> None:
    event = read_result(dumps(result_body(model="xception")), TS)
    assert event.model_name is None and event.priority is Priority.URGENT


def test_unknown_fields_are_ignored() -> None:
    event = read_result(dumps(result_body(extra={"nested": [1, 2]}, heatmap="...")), TS)
    assert event.kind is Kind.SCORED


def test_result_read_from_bytes_or_text_is_the_same() -> None:
    text = dumps(result_body())
    assert read_result(text, TS) == read_result(text.encode(), TS)


# Dead letters -------------------------------------------------------------------------------------------


def test_dead_letter_with_a_readable_reference_fails_that_image_in_its_study() -> None:
    failed_letter, image = letter(letter_body())
    assert (failed_letter.stage, failed_letter.error) == ("fetch", "not_found")
    assert failed_letter.reason == "the file does not exist"
    assert (failed_letter.topic, failed_letter.partition, failed_letter.offset) == ("cxr.dead-letter", 1, 7)
    assert failed_letter.event_id == "ev-1" and failed_letter.study_key == "1.2.840.1"
    assert image is not None and image.kind is Kind.FAILED
    assert (image.event_id, image.study_key, image.uri) == ("ev-1", "1.2.840.1", REF.uri)
    assert (image.stage, image.error, image.reason) == ("fetch", "not_found", "the file does not exist")
    assert image.at == RECEIVED - timedelta(seconds=2)


@pytest.mark.parametrize(
    "payload",
    [
        "not json at all",
        json.dumps({"schema": REFERENCE_SCHEMA, "uri": "file:///x"}),  # the reference's own problem
        Reference(event_id="another-event", uri="file:///x", study_uid="9.9").to_json(),  # not this letter's
        12,
    ],
)
def test_dead_letter_with_an_unreadable_payload_is_keyed_by_its_event_id(payload: Any) -> None:
    body = letter_body(payload="placeholder")
    body["payload"] = payload
    failed_letter, image = letter(body)
    assert image is not None and image.kind is Kind.FAILED
    assert image.event_id == image.study_key == failed_letter.study_key == "ev-1"
    assert image.arrived_at == RECEIVED


def test_dead_letter_with_a_base64_payload_is_keyed_by_its_event_id() -> None:
    _, image = letter(letter_body(payload=b"\xff\xd8\xff binary", event_id="ev-2"))
    assert image is not None and image.study_key == "ev-2"


def test_dead_letter_without_an_event_id_is_a_letter_only() -> None:
    failed_letter, image = letter(
        letter_body(payload=b"\x00garbage", event_id=None, stage="parse", error="invalid_json")
    )
    assert image is None
    assert failed_letter.event_id is None and failed_letter.study_key is None
    assert (failed_letter.stage, failed_letter.error) == ("parse", "invalid_json")


def test_a_huge_reason_is_truncated() -> None:
    failed_letter, image = letter(letter_body(reason="x" * 50_000))
    assert len(failed_letter.reason) <= 512 and failed_letter.reason.endswith("…")
    assert image is not None and image.reason == failed_letter.reason


@pytest.mark.parametrize("changes", [{"stage": None}, {"error": None}, {"stage": "x" * 65}, {"error": 3}])
def test_dead_letter_needs_its_stage_and_error(changes: dict[str, Any]) -> None:
    unreadable_reason(letter, letter_body(**changes))


def test_dead_letter_schema_is_checked() -> None:
    assert DEAD_LETTER_SCHEMA in unreadable_reason(letter, letter_body(schema=RESULT_SCHEMA))


def test_a_dead_letter_failed_long_ago_is_placed_at_most_a_day_before_kafka_time() -> None:
    failed_letter, _ = letter(letter_body(failed_at=rfc3339(RECEIVED - timedelta(days=30))))
    assert failed_letter.failed_at == RECEIVED
