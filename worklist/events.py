"""Kafka messages as worklist records: every value becomes one frozen record, or `Unreadable` with a reason.

Three topics feed the worklist. A reference says an image arrived (so a study that scoring never answers is
still on the queue), a result scores it, a dead letter says why it could not be scored (the study stays on the
queue, unscored, and the letter goes to the page's panel). Everything here is pure and bounded: a message is
hostile until parsed, and a wrong clock must not move a study by days.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from streaming.contracts import (
    DEAD_LETTER_SCHEMA,
    MAX_FIELD_CHARS,
    RESULT_SCHEMA,
    ParseError,
    Reference,
    encodable,
    load_json,
    parse_reference,
    parse_timestamp,
)
from streaming.triage import Priority, finding_strength

log = logging.getLogger("cxr.worklist.events")

#: A producer's clock this far from the broker's is not believed: the broker's timestamp is used instead.
MAX_CLOCK_SKEW = timedelta(hours=24)
_MAX_TEXT = 512


class Unreadable(ValueError):
    """A message the worklist cannot use; the reason never quotes the message."""


@dataclass(frozen=True)
class NormalLabels:
    """The normal labels of one model (its bundle's `name` and `normal_labels`).

    They say which scores mean "no disease" for that model only: another model's labels may mean something
    else entirely, so a result from any other model is ordered by its own top finding instead.
    """

    model_name: str | None
    labels: tuple[str, ...] = ()

    def for_model(self, name: str | None) -> tuple[str, ...]:
        """The labels to score a result of model `name` with: these when it is this bundle's model, else none."""
        return self.labels if name is not None and name == self.model_name else ()

    @classmethod
    def of_bundle(cls, bundle_dir: Path) -> NormalLabels:
        """The bundle's; without a readable bundle, none (every result is then ordered by its top finding)."""
        from streaming.bundle import BundleError, read_descriptor  # numpy: not for every `cxr` command's parser

        try:
            descriptor = read_descriptor(bundle_dir)
        except (BundleError, OSError) as exc:
            log.warning("no model bundle to read normal labels from (%s); ordering ROUTINE by top finding only", exc)
            return cls(None)
        return cls(descriptor.name, tuple(descriptor.normal_labels))


class Kind(StrEnum):
    ANNOUNCED = "announced"
    SCORED = "scored"
    FAILED = "failed"


#: How far along an image is: a later kind replaces an earlier one, never the reverse.
KIND_RANK = {Kind.ANNOUNCED: 0, Kind.FAILED: 1, Kind.SCORED: 2}


@dataclass(frozen=True)
class ImageEvent:
    """One image's news: announced, scored or failed."""

    kind: Kind
    event_id: str
    #: the study's UID, or the event id for an image that came without one (the contract's study key)
    study_key: str
    #: when the image arrived: the producer's `sent_at` when believable, else the Kafka timestamp
    arrived_at: datetime
    #: when this news happened (scored_at, failed_at, or the arrival)
    at: datetime
    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    accession: str | None = None
    uri: str | None = None
    priority: Priority | None = None
    top_finding: str | None = None
    #: the strongest finding's probability (`streaming.triage.finding_strength`)
    score: float | None = None
    scores: Mapping[str, float] = field(default_factory=dict)
    model_name: str | None = None
    model_version: str | None = None
    #: for a failed image: the dead letter's stage, error code and reason
    stage: str | None = None
    error: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter for the page's panel, including those whose reference could not even be parsed."""

    topic: str
    partition: int
    offset: int
    stage: str
    error: str
    reason: str
    failed_at: datetime
    event_id: str | None = None
    study_key: str | None = None


def kafka_time(timestamp_ms: int | None) -> datetime:
    """The record's Kafka timestamp; now when it has none, one no calendar holds, or one in the future (a
    producer sets it, and a study that arrives "tomorrow" would never become overdue)."""
    now = datetime.now(UTC)
    if timestamp_ms is None or timestamp_ms <= 0:
        return now
    try:
        return min(datetime.fromtimestamp(timestamp_ms / 1000, UTC), now)
    except (ValueError, OverflowError, OSError):
        return now


def _object(value: bytes | str | None, what: str) -> dict[str, Any]:
    if value is None:
        raise Unreadable(f"the {what} has no value (a tombstone)")
    try:
        body = load_json(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Unreadable(f"the {what} is not valid UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise Unreadable(f"the {what} is not a JSON object")
    return body


def _text(body: Mapping[str, Any], name: str, *, required: bool = False, limit: int = MAX_FIELD_CHARS) -> str | None:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise Unreadable(f"the field '{name}' is missing")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Unreadable(f"the field '{name}' is not a string of at most {limit} characters")
    if not encodable(value):
        raise Unreadable(f"the field '{name}' is not valid Unicode text")
    return value


def _moment(text: str | None, fallback: datetime) -> datetime:
    """A timestamp from a message, unless it is missing, malformed or implausibly far from `fallback`."""
    if text is None:
        return fallback
    try:
        moment = parse_timestamp(text).astimezone(UTC)
    except (ValueError, OverflowError):  # malformed, or a zone that moves it past year 1 or 9999
        return fallback
    return moment if abs(moment - fallback) <= MAX_CLOCK_SKEW else fallback


def _reference_fields(ref: Reference, received: datetime) -> dict[str, Any]:
    arrived = _moment(ref.sent_at, received)
    return {
        "event_id": ref.event_id,
        "study_key": ref.key,
        "arrived_at": min(arrived, received),
        "study_uid": ref.study_uid,
        "series_uid": ref.series_uid,
        "sop_instance_uid": ref.sop_instance_uid,
        "accession": ref.accession,
        "uri": ref.uri,
    }


def read_reference(value: bytes | str | None, timestamp_ms: int | None) -> ImageEvent:
    received = kafka_time(timestamp_ms)
    try:
        ref = parse_reference(value)
    except ParseError as exc:
        raise Unreadable(f"not a reference: {exc.code}") from None
    fields = _reference_fields(ref, received)
    return ImageEvent(Kind.ANNOUNCED, at=fields["arrived_at"], **fields)


def _scores(body: Mapping[str, Any]) -> dict[str, float]:
    scores = body.get("scores")
    if not isinstance(scores, dict) or not scores or len(scores) > 1000:
        raise Unreadable("the field 'scores' is not a non-empty object")
    out: dict[str, float] = {}
    for label, value in scores.items():
        if (
            not isinstance(label, str)
            or len(label) > _MAX_TEXT
            or not encodable(label)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0.0 <= value <= 1.0
        ):
            raise Unreadable("the field 'scores' holds something other than labels with probabilities in [0, 1]")
        out[label] = float(value)
    return out


def read_result(
    value: bytes | str | None, timestamp_ms: int | None, normal_labels: NormalLabels | Sequence[str] = ()
) -> ImageEvent:
    """A `cxr.result/v1` message. `normal_labels` (from the model bundle) let ROUTINE studies be ordered too:
    as `NormalLabels`, only for results whose `model.name` is that bundle's name (any other model's result is
    scored by its top finding); a bare sequence of labels applies to every result."""
    received = kafka_time(timestamp_ms)
    body = _object(value, "result")
    if body.get("schema") != RESULT_SCHEMA:
        raise Unreadable(f"the schema is not '{RESULT_SCHEMA}'")
    event_id = _text(body, "event_id", required=True)
    uri = _text(body, "uri", required=True)
    assert event_id is not None and uri is not None
    ids = {name: _text(body, name) for name in ("study_uid", "series_uid", "sop_instance_uid", "accession")}
    try:
        priority = Priority(str(body.get("priority")))
    except ValueError:
        raise Unreadable("the field 'priority' is not STAT, URGENT or ROUTINE") from None
    scores = _scores(body)
    finding = _text(body, "top_finding", limit=_MAX_TEXT)
    if finding is not None and finding not in scores:
        raise Unreadable("the field 'top_finding' names no scored label")
    model = body.get("model")
    model = model if isinstance(model, dict) else {}
    model_name = _text(model, "name", limit=_MAX_TEXT)
    normal = normal_labels.for_model(model_name) if isinstance(normal_labels, NormalLabels) else tuple(normal_labels)
    arrived = min(_moment(_text(body, "sent_at", limit=64), received), received)
    scored_at = max(_moment(_text(body, "scored_at", limit=64), received), arrived)
    return ImageEvent(
        Kind.SCORED,
        event_id=event_id,
        study_key=ids["study_uid"] or event_id,
        arrived_at=arrived,
        at=scored_at,
        uri=uri,
        priority=priority,
        top_finding=finding,
        score=finding_strength({"scores": scores, "top_finding": finding}, normal),
        scores=scores,
        model_name=model_name,
        model_version=_text(model, "version", limit=_MAX_TEXT),
        **ids,
    )


def read_dead_letter(
    value: bytes | str | None, timestamp_ms: int | None, topic: str, partition: int, offset: int
) -> tuple[DeadLetter, ImageEvent | None]:
    """The letter for the panel, and, when its reference can be read, the failed image for the queue."""
    received = kafka_time(timestamp_ms)
    body = _object(value, "dead letter")
    if body.get("schema") != DEAD_LETTER_SCHEMA:
        raise Unreadable(f"the schema is not '{DEAD_LETTER_SCHEMA}'")
    stage = _text(body, "stage", required=True, limit=64)
    error = _text(body, "error", required=True, limit=64)
    # A reason is for people: an overlong one is cut, never a reason to lose the letter.
    reason = _text(body, "reason", limit=sys.maxsize) or ""
    reason = reason if len(reason) <= _MAX_TEXT else reason[: _MAX_TEXT - 1] + "…"
    event_id = _text(body, "event_id")
    failed_at = max(_moment(_text(body, "failed_at", limit=64), received), received - MAX_CLOCK_SKEW)
    assert stage is not None and error is not None
    image: ImageEvent | None = None
    payload = body.get("payload")
    if event_id is not None:
        try:
            ref = parse_reference(payload if isinstance(payload, str) else None)
        except ParseError:
            ref = None
        if ref is not None and ref.event_id == event_id:
            fields = _reference_fields(ref, received)
        else:  # the reference itself was the problem: the letter is all there is
            fields = {"event_id": event_id, "study_key": event_id, "arrived_at": received}
        image = ImageEvent(Kind.FAILED, at=failed_at, stage=stage, error=error, reason=reason, **fields)
    letter = DeadLetter(
        topic=topic,
        partition=partition,
        offset=offset,
        stage=stage,
        error=error,
        reason=reason,
        failed_at=failed_at,
        event_id=event_id,
        study_key=image.study_key if image is not None else None,
    )
    return letter, image
