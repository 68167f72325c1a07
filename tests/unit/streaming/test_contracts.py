"""The wire contracts: parsing references, building results and dead letters, timestamps (DESIGN.md, Messages)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from streaming.contracts import (
    DEAD_LETTER_SCHEMA,
    MAX_FIELD_CHARS,
    REFERENCE_SCHEMA,
    RESULT_SCHEMA,
    Reference,
    Source,
    build_dead_letter,
    build_result,
    dumps,
    parse_reference,
    parse_timestamp,
    rfc3339,
    salvage_event_id,
)
from streaming.errors import ErrorCode, FetchError, ParseError, Stage

URI = "file:///data/xrays/1.jpeg"
_DROP = object()


#: Every optional field of a reference, filled in.
OPTIONAL = {
    "study_uid": "1.2.3",
    "series_uid": "1.2.3.4",
    "sop_instance_uid": "1.2.3.4.5",
    "accession": "ACC1",
    "modality": "CR",
    "view_position": "PA",
    "sent_at": "2024-05-01T10:00:00.123Z",
}


def message(**fields: Any) -> str:
    body: dict[str, Any] = {"schema": REFERENCE_SCHEMA, "event_id": "ev-1", "uri": URI}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not _DROP})


def parse_error(value: str | bytes | None) -> ParseError:
    with pytest.raises(ParseError) as caught:
        parse_reference(value)
    assert caught.value.stage is Stage.PARSE
    return caught.value


# ------------------------------------------------------------------------------------------ parse_reference


def test_parse_reference_reads_every_contract_field() -> None:
    ref = parse_reference(message(**OPTIONAL))
    assert ref == Reference(event_id="ev-1", uri=URI, **OPTIONAL)
    assert ref.study_uid == "1.2.3" and ref.view_position == "PA" and ref.sent_at == "2024-05-01T10:00:00.123Z"


def test_parse_reference_accepts_bytes_and_leaves_optional_fields_none() -> None:
    ref = parse_reference(message().encode())
    assert (ref.event_id, ref.uri) == ("ev-1", URI)
    assert ref.study_uid is None and ref.sent_at is None and ref.modality is None


def test_optional_fields_may_be_null() -> None:
    ref = parse_reference(message(study_uid=None, sent_at=None))
    assert ref.study_uid is None and ref.sent_at is None


def test_unknown_fields_are_ignored() -> None:
    ref = parse_reference(message(priority_hint="high", nested={"a": [1, 2]}, study_uid="9.9"))
    assert ref.study_uid == "9.9"
    assert not hasattr(ref, "priority_hint")


@pytest.mark.parametrize(
    "value",
    [None, "", "not json", "{", '{"schema": "cxr.reference/v1",}', b"\xff\xfe\x00garbage", b'{"event_id": "\xc3"}'],
    ids=["none", "empty", "text", "truncated", "trailing-comma", "bad-bytes", "bad-utf8-in-string"],
)
def test_invalid_json(value: str | bytes | None) -> None:
    assert parse_error(value).code is ErrorCode.INVALID_JSON


@pytest.mark.parametrize("value", ["[]", '["schema"]', "42", '"a string"', "null", "true"])
def test_json_that_is_not_an_object(value: str) -> None:
    assert parse_error(value).code is ErrorCode.NOT_AN_OBJECT


@pytest.mark.parametrize("missing", ["schema", "event_id", "uri"])
def test_missing_required_field(missing: str) -> None:
    error = parse_error(message(**{missing: _DROP}))
    assert error.code is ErrorCode.MISSING_FIELD
    assert missing in error.reason


@pytest.mark.parametrize("field", ["event_id", "uri"])
def test_required_field_null_is_missing(field: str) -> None:
    assert parse_error(message(**{field: None})).code is ErrorCode.MISSING_FIELD


@pytest.mark.parametrize("schema", ["cxr.reference/v2", "cxr.result/v1", "", 1])
def test_unsupported_schema(schema: object) -> None:
    assert parse_error(message(schema=schema)).code is ErrorCode.UNSUPPORTED_SCHEMA


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_id", 42),
        ("event_id", ""),
        ("event_id", "   "),
        ("event_id", ["a"]),
        ("uri", {"path": "/x"}),
        ("uri", " \t"),
        ("uri", "x" * (MAX_FIELD_CHARS + 1)),
        ("study_uid", 1.5),
        ("modality", True),
        ("accession", "a" * (MAX_FIELD_CHARS + 1)),
        ("sent_at", "yesterday"),
        ("sent_at", "2024-13-01T00:00:00Z"),
        ("sent_at", ""),
        ("sent_at", 1714557600),
    ],
)
def test_invalid_field(field: str, value: object) -> None:
    error = parse_error(message(**{field: value}))
    assert error.code is ErrorCode.INVALID_FIELD
    assert field in error.reason


def test_field_of_exactly_the_maximum_length_is_accepted() -> None:
    uri = "file:///" + "a" * (MAX_FIELD_CHARS - len("file:///"))
    assert parse_reference(message(uri=uri)).uri == uri


@pytest.mark.parametrize("field", ["event_id", "uri", "study_uid", "accession"])
def test_lone_surrogate_is_an_invalid_field(field: str) -> None:
    """A JSON escape of half a surrogate pair is valid JSON but not encodable text: it must fail its own row
    here instead of failing the whole batch later, when the result is written as UTF-8."""
    raw = message(**{field: "PLACEHOLDER"}).replace("PLACEHOLDER", "x\\ud800y")
    assert parse_error(raw).code is ErrorCode.INVALID_FIELD


def test_parse_error_reason_does_not_echo_field_values() -> None:
    secret = "Doe^Jane-PID-0042"
    for raw in (message(event_id=123, uri=secret), message(sent_at=secret), message(schema=secret)):
        assert secret not in parse_error(raw).reason


# ----------------------------------------------------------------------------------------- salvage_event_id


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{"event_id": "ev-9", "uri": 3}', "ev-9"),
        (b'{"event_id": "ev-9"}', "ev-9"),
        ('{"event_id": 9}', None),
        ('{"event_id": "  "}', None),
        ('{"uri": "file:///x"}', None),
        ('["ev-9"]', None),
        ("{broken", None),
        (b"\xff\xfe", None),
        (None, None),
        ('{"event_id": "\\ud800"}', None),
    ],
)
def test_salvage_event_id(value: str | bytes | None, expected: str | None) -> None:
    assert salvage_event_id(value) == expected


def test_salvage_event_id_truncates_overlong_ids() -> None:
    salvaged = salvage_event_id(json.dumps({"event_id": "e" * (MAX_FIELD_CHARS + 50)}))
    assert salvaged is not None and len(salvaged) == MAX_FIELD_CHARS


# ------------------------------------------------------------------------------------------------ Reference


def test_key_is_the_study_when_known_else_the_event() -> None:
    assert Reference(event_id="ev", uri=URI, study_uid="1.2.3").key == "1.2.3"
    assert Reference(event_id="ev", uri=URI).key == "ev"
    assert Reference(event_id="ev", uri=URI, study_uid="").key == "ev"


def test_to_json_round_trips_and_omits_nulls() -> None:
    ref = Reference(event_id="ev-2", uri=URI, study_uid="1.2", modality="DX", sent_at="2024-01-01T00:00:00.000Z")
    text = ref.to_json()
    body = json.loads(text)
    assert body == {
        "schema": REFERENCE_SCHEMA,
        "event_id": "ev-2",
        "uri": URI,
        "study_uid": "1.2",
        "modality": "DX",
        "sent_at": "2024-01-01T00:00:00.000Z",
    }
    assert parse_reference(text) == ref


def test_to_json_keeps_non_ascii_as_utf8() -> None:
    ref = Reference(event_id="ev-ü", uri="file:///data/röntgen.jpeg")
    assert "ü" in ref.to_json()
    assert parse_reference(ref.to_json().encode("utf-8")) == ref


def test_dumps_refuses_nan() -> None:
    with pytest.raises(ValueError):
        dumps({"score": float("nan")})


# --------------------------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC), "2024-05-01T10:00:00.123Z"),
        (datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone(timedelta(hours=2))), "2024-05-01T10:00:00.000Z"),
        (datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "1999-12-31T23:59:59.999Z"),
    ],
)
def test_rfc3339_is_utc_milliseconds_with_z(moment: datetime, text: str) -> None:
    assert rfc3339(moment) == text


def test_parse_timestamp_reads_z_and_offsets_and_rejects_zoneless_times() -> None:
    expected = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    assert parse_timestamp("2024-05-01T10:00:00Z") == expected
    assert parse_timestamp("2024-05-01T10:00:00z") == expected
    assert parse_timestamp("2024-05-01T12:00:00+02:00") == expected
    assert parse_timestamp(rfc3339(expected)) == expected
    for text in ("2024-05-01T10:00:00", "2024-05-01", "2024-05-01T10:00"):
        with pytest.raises(ValueError):
            parse_timestamp(text)


# ------------------------------------------------------------------------------------------- build_result


def test_build_result_echoes_the_reference_and_computes_latency() -> None:
    ref = Reference(event_id="ev-3", uri=URI, **{**OPTIONAL, "sent_at": None})
    sent = datetime(2024, 5, 1, 10, 0, 0, tzinfo=UTC)
    scored = sent + timedelta(seconds=1, microseconds=234_500)
    body = build_result(
        ref,
        model={"name": "m", "version": "1"},
        scores={"NORMAL": 0.25, "PNEUMONIA": 0.75},
        top_finding="PNEUMONIA",
        priority="URGENT",
        sent_at=sent,
        scored_at=scored,
    )
    assert body == {
        "schema": RESULT_SCHEMA,
        "event_id": "ev-3",
        "uri": URI,
        "study_uid": "1.2.3",
        "series_uid": "1.2.3.4",
        "sop_instance_uid": "1.2.3.4.5",
        "accession": "ACC1",
        "model": {"name": "m", "version": "1"},
        "scores": {"NORMAL": 0.25, "PNEUMONIA": 0.75},
        "top_finding": "PNEUMONIA",
        "priority": "URGENT",
        "sent_at": "2024-05-01T10:00:00.000Z",
        "scored_at": "2024-05-01T10:00:01.234Z",
        "latency_ms": 1234.5,
    }
    # modality and view_position are reference-only; they are not echoed.
    assert "modality" not in body and "view_position" not in body
    assert json.loads(dumps(body)) == body


def test_build_result_keeps_missing_identifiers_as_null_and_scores_as_floats() -> None:
    import numpy as np

    now = datetime(2024, 1, 1, tzinfo=UTC)
    body = build_result(
        Reference(event_id="e", uri=URI),
        model={"name": "m", "version": "1"},
        scores={"A": np.float32(0.5)},  # type: ignore[dict-item]
        top_finding=None,
        priority="ROUTINE",
        sent_at=now,
        scored_at=now,
    )
    assert body["study_uid"] is None and body["accession"] is None and body["top_finding"] is None
    assert type(body["scores"]["A"]) is float
    assert body["latency_ms"] == 0.0
    dumps(body)  # serialisable


# -------------------------------------------------------------------------------------- build_dead_letter


def test_build_dead_letter_fields() -> None:
    payload = '{"schema": "cxr.reference/v1", "event_id": "ev-4", "uri": "ftp://x"}'
    failed = datetime(2024, 5, 1, 10, 0, 0, 5000, tzinfo=UTC)
    body = build_dead_letter(
        FetchError(ErrorCode.UNSUPPORTED_URI, "only file:// and DICOMweb URIs are supported"),
        payload=payload,
        source=Source("cxr.references", 3, 1234),
        event_id="ev-4",
        failed_at=failed,
    )
    assert body == {
        "schema": DEAD_LETTER_SCHEMA,
        "event_id": "ev-4",
        "stage": "fetch",
        "error": "unsupported_uri",
        "reason": "only file:// and DICOMweb URIs are supported",
        "payload": payload,
        "source": {"topic": "cxr.references", "partition": 3, "offset": 1234},
        "failed_at": "2024-05-01T10:00:00.005Z",
    }


def test_dead_letter_for_an_unparseable_message_has_null_event_id_and_null_payload() -> None:
    body = build_dead_letter(
        ParseError(ErrorCode.INVALID_JSON, "the message has no value"),
        payload=None,
        source=Source("t", 0, 0),
        event_id=None,
        failed_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    assert body["event_id"] is None and body["payload"] is None
    assert (body["stage"], body["error"]) == ("parse", "invalid_json")
    assert json.loads(dumps(body))["payload"] is None
