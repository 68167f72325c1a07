"""The wire contracts: references in, results and dead letters out (see DESIGN.md, "Messages").

Pure functions only. Parsing is strict about what the contract requires and lenient about the rest: unknown
fields are ignored, optional fields may be missing or null. Every failure is a `ParseError` with a stable code.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from streaming.errors import CxrError, ErrorCode, ParseError

REFERENCE_SCHEMA = "cxr.reference/v1"
RESULT_SCHEMA = "cxr.result/v1"
DEAD_LETTER_SCHEMA = "cxr.dead-letter/v1"

_OPTIONAL_TEXT = (
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "accession",
    "modality",
    "view_position",
    "sent_at",
)
#: Reference fields echoed into every result.
_ECHOED = ("event_id", "uri", "study_uid", "series_uid", "sop_instance_uid", "accession")
MAX_FIELD_CHARS = 8192


@dataclass(frozen=True, slots=True)
class Reference:
    """One announced image."""

    event_id: str
    uri: str
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    accession: str | None = None
    modality: str | None = None
    view_position: str | None = None
    sent_at: str | None = None

    @property
    def key(self) -> str:
        """Kafka key of the reference and its result: the study when known, so a study stays in order."""
        return self.study_uid or self.event_id

    def to_json(self) -> str:
        body: dict[str, Any] = {"schema": REFERENCE_SCHEMA}
        body.update({k: v for k, v in _as_dict(self).items() if v is not None})
        return dumps(body)


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message was read from, so a dead letter can point back at it."""

    topic: str
    partition: int
    offset: int


def _as_dict(ref: Reference) -> dict[str, Any]:
    return {name: getattr(ref, name) for name in Reference.__slots__}


def dumps(body: Mapping[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def now_utc() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix: sortable and what every consumer parses."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 date-time: date, time and a zone (`Z` or an offset) are all required."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None or len(text) < len("2000-01-01T00:00Z"):
        raise ValueError(f"not an RFC 3339 date-time with a zone: {text[:40]!r}")
    return moment


def _text_field(body: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ParseError(ErrorCode.MISSING_FIELD, f"the reference has no '{name}' field")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ParseError(ErrorCode.INVALID_FIELD, f"the field '{name}' must be a non-empty string")
    if len(value) > MAX_FIELD_CHARS:
        raise ParseError(ErrorCode.INVALID_FIELD, f"the field '{name}' is longer than {MAX_FIELD_CHARS} characters")
    if not encodable(value):
        raise ParseError(ErrorCode.INVALID_FIELD, f"the field '{name}' is not valid Unicode text")
    return value


def encodable(text: str) -> bool:
    """False for text with lone surrogates (valid as JSON escapes, but not writable as UTF-8 downstream)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_json(value: str | bytes) -> Any:
    """JSON from text, or from bytes read strictly as UTF-8.

    `json.loads` would guess UTF-16 or UTF-32 from raw bytes; the contract says UTF-8, so the bytes are
    decoded here and anything else is invalid. Nesting deep enough to exhaust the parser's recursion is
    invalid too, never an exception that escapes and fails the batch.
    """
    text = value.decode("utf-8") if isinstance(value, bytes | bytearray | memoryview) else value
    return json.loads(text)


def parse_reference(value: str | bytes | None) -> Reference:
    """Validate one message value against `cxr.reference/v1`."""
    if value is None:
        raise ParseError(ErrorCode.INVALID_JSON, "the message has no value (a tombstone)")
    try:
        body = load_json(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ParseError(ErrorCode.INVALID_JSON, "the message value is not valid UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise ParseError(ErrorCode.NOT_AN_OBJECT, "the message value is JSON but not an object")
    schema = body.get("schema")
    if schema is None:
        raise ParseError(ErrorCode.MISSING_FIELD, "the reference has no 'schema' field")
    if schema != REFERENCE_SCHEMA:
        raise ParseError(ErrorCode.UNSUPPORTED_SCHEMA, f"the schema is not '{REFERENCE_SCHEMA}'")
    event_id = _text_field(body, "event_id", required=True)
    uri = _text_field(body, "uri", required=True)
    assert event_id is not None and uri is not None
    optional = {name: _text_field(body, name, required=False) for name in _OPTIONAL_TEXT}
    if optional["sent_at"] is not None:
        try:
            parse_timestamp(optional["sent_at"])
        except ValueError:
            raise ParseError(ErrorCode.INVALID_FIELD, "the field 'sent_at' is not an RFC 3339 timestamp") from None
    return Reference(event_id=event_id, uri=uri, **optional)


def salvage_event_id(value: str | bytes | None) -> str | None:
    """The event id of a message that failed to parse, when one can be read at all."""
    try:
        body = load_json(value) if value is not None else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    event_id = body.get("event_id") if isinstance(body, dict) else None
    if isinstance(event_id, str) and event_id.strip() and encodable(event_id):
        return event_id[:MAX_FIELD_CHARS]
    return None


def build_result(
    ref: Reference,
    *,
    model: Mapping[str, str],
    scores: Mapping[str, float],
    top_finding: str | None,
    priority: str,
    sent_at: datetime,
    scored_at: datetime,
) -> dict[str, Any]:
    """A `cxr.result/v1` body; `latency_ms` is scored_at - sent_at."""
    ref_fields = _as_dict(ref)
    body: dict[str, Any] = {"schema": RESULT_SCHEMA}
    body.update({name: ref_fields[name] for name in _ECHOED})
    body.update(
        model=dict(model),
        scores={label: float(score) for label, score in scores.items()},
        top_finding=top_finding,
        priority=priority,
        sent_at=rfc3339(sent_at),
        scored_at=rfc3339(scored_at),
        latency_ms=round((scored_at - sent_at).total_seconds() * 1000.0, 3),
    )
    return body


#: Above this, a dead letter carries the first part of the value only (the broker's default message limit is
#: 1 MiB: a value near it would make a dead letter that the broker refuses, and fail the whole micro-batch).
DEFAULT_PAYLOAD_MAX_BYTES = 256 * 1024


def payload_fields(value: str | bytes | None, max_bytes: int = DEFAULT_PAYLOAD_MAX_BYTES) -> dict[str, Any]:
    """The original value as the dead letter's `payload`, replayable where it can be.

    UTF-8 text goes as it is. Other bytes go base64-encoded, marked `payload_encoding: "base64"`. A payload
    whose JSON form would exceed `max_bytes` is cut to fit (escapes can make JSON text several times longer
    than the value), marked `payload_truncated: true` with the value's full size in `payload_bytes`; the dead
    letter's `source` still names the original message in full.
    """
    if value is None:
        return {"payload": None}
    raw = bytes(value) if not isinstance(value, str) else value.encode("utf-8", "surrogatepass")
    try:
        text = raw.decode("utf-8")
        encoding = None
    except UnicodeDecodeError:
        text = base64.b64encode(raw[: max_bytes * 3 // 4]).decode("ascii")
        encoding = "base64"
    cut = text
    while len(dumps({"p": cut})) - 8 > max_bytes:  # the JSON string's own size, quotes included
        cut = cut[: int(len(cut) * max_bytes / (len(dumps({"p": cut})) - 8) * 0.95)]
    fields: dict[str, Any] = {"payload": cut}
    if encoding is not None:
        fields["payload_encoding"] = encoding
    if cut != text or (encoding is not None and len(raw) > max_bytes * 3 // 4):
        fields.update(payload_truncated=True, payload_bytes=len(raw))
    return fields


def build_dead_letter(
    error: CxrError,
    *,
    payload: str | bytes | None,
    source: Source,
    event_id: str | None,
    failed_at: datetime,
    payload_max_bytes: int = DEFAULT_PAYLOAD_MAX_BYTES,
) -> dict[str, Any]:
    """A `cxr.dead-letter/v1` body carrying the original value (see `payload_fields`), so it can be replayed."""
    return {
        "schema": DEAD_LETTER_SCHEMA,
        "event_id": event_id,
        "stage": error.stage.value,
        "error": error.code.value,
        "reason": error.reason,
        **payload_fields(payload, payload_max_bytes),
        "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
        "failed_at": rfc3339(failed_at),
    }
