"""The API's answers as typed models, so that its OpenAPI schema is the contract the page and other clients
read; and the helpers that shape the store's and the consumer's state into them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from streaming.contracts import rfc3339
from worklist.store import Status, Verdict, WorklistStore

log = logging.getLogger("cxr.worklist.views")

PRIORITY_FILTERS = ("STAT", "URGENT", "ROUTINE", "UNSCORED")
PriorityName = Literal["STAT", "URGENT", "ROUTINE"]

ConsumerStatus = Callable[[], dict[str, Any]]

# ------------------------------------------------------------------------------------------ response models


class _View(BaseModel):
    # Fields the store adds later pass through rather than vanish.
    model_config = ConfigDict(extra="allow")


class ModelRef(_View):
    name: str | None
    version: str | None


class ImageCounts(_View):
    total: int
    scored: int
    failed: int
    pending: int


class StudyItem(_View):
    """One study: the contract's fields (study_uid, priority, top_finding, score, arrived_at, overdue, status,
    event_ids, model) and what the page shows. `key` is the study UID, or the event id of a study without one."""

    key: str
    study_uid: str | None
    accession: str | None
    priority: PriorityName | None
    ai_priority: PriorityName | None
    person_priority: PriorityName | None
    person_priority_by: str | None = None
    top_finding: str | None
    score: float | None
    arrived_at: str
    due_at: str
    overdue: bool
    status: Status
    claimed_by: str | None
    closed_at: str | None
    closed_by: str | None
    event_ids: list[str]
    model: ModelRef | None
    images: ImageCounts
    position: int | None = Field(description="place in the whole open queue (1 is read next); null when closed")


class ImageErrorView(_View):
    stage: str | None
    code: str | None
    reason: str | None


class ImageView(_View):
    event_id: str
    state: Literal["announced", "scored", "failed"]
    uri: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    arrived_at: str | None
    priority: PriorityName | None
    top_finding: str | None
    score: float | None
    scores: dict[str, float] | None
    model: ModelRef | None
    error: ImageErrorView | None


class FeedbackView(_View):
    verdict: Verdict
    finding: str | None
    reader: str | None
    at: str | None
    model: ModelRef


class StudyDetail(StudyItem):
    image_list: list[ImageView]
    feedback: list[FeedbackView]


class KafkaStatus(_View):
    connected: bool
    last_poll_at: str | None = None
    records: int | None = None
    unreadable: int | None = None
    error: str | None = None


class ScoringView(_View):
    state: Literal["live", "idle", "stalled"]
    pending: int
    oldest_pending_at: str | None
    last_scored_at: str | None
    kafka: KafkaStatus


class QueuePage(_View):
    items: list[StudyItem]
    total: int
    offset: int
    limit: int
    now: str
    last_event_id: int = Field(description="the change id this page is current to: follow /api/events after it")
    scoring: ScoringView


class SourceView(_View):
    topic: str
    partition: int
    offset: int


class DeadLetterView(_View):
    event_id: str | None
    study_key: str | None
    stage: str
    error: str
    reason: str
    failed_at: str | None
    source: SourceView


class DeadLetterPage(_View):
    items: list[DeadLetterView]
    total: int
    offset: int
    limit: int


class AgreementView(_View):
    model: ModelRef
    agree: int
    disagree: int
    agreement: float | None


class FeedbackSummary(_View):
    items: list[AgreementView]


class WaitView(_View):
    count: int
    mean: float | None
    median: float | None
    p95: float | None
    max: float | None


class StatsView(_View):
    since: str = Field(description="today's local midnight: the figures cover studies that arrived since")
    now: str
    waits: dict[str, WaitView] = Field(description="seconds waited per class, until read or until now if open")
    counts: dict[str, int]


class SnapshotView(_View):
    last_event_id: int
    now: str
    total: int
    items: list[StudyItem]
    dead_letters: list[DeadLetterView]
    scoring: ScoringView


class ReadyView(_View):
    ready: bool
    store: bool
    kafka: KafkaStatus


class ErrorBody(BaseModel):
    detail: str


# ------------------------------------------------------------------------------------------------- helpers


def local_midnight(now: datetime) -> datetime:
    """The start of the server's local day containing `now` (with the offset in force at midnight, not now)."""
    day = now.astimezone().date()
    return datetime.combine(day, clock_time()).astimezone()


def parse_priorities(values: Iterable[str] | None) -> list[str] | None:
    """`?priority=STAT&priority=urgent,routine` as a list of class names; ValueError names a wrong one."""
    names = [p.strip().upper() for v in values or () for p in v.split(",") if p.strip()]
    wrong = [n for n in names if n not in PRIORITY_FILTERS]
    if wrong:
        raise ValueError(f"unknown priority {wrong[0][:20]!r}: expected any of {', '.join(PRIORITY_FILTERS)}")
    return names or None


def consumer_view(consumer_status: ConsumerStatus) -> dict[str, Any]:
    """The consumer's status as JSON; a consumer that cannot say counts as not connected."""
    try:
        status = dict(consumer_status())
    except Exception:
        log.exception("the consumer's status could not be read")
        return {"connected": False, "error": "the consumer's status is unavailable"}
    last = status.get("last_poll_at")
    if isinstance(last, datetime):
        last = rfc3339(last)
    elif isinstance(last, int | float) and not isinstance(last, bool):
        last = rfc3339(datetime.fromtimestamp(last, UTC))
    elif not isinstance(last, str):
        last = None
    error = status.get("error")
    return {
        "connected": bool(status.get("connected")),
        "last_poll_at": last,
        "records": status.get("records") if isinstance(status.get("records"), int) else None,
        "unreadable": status.get("unreadable") if isinstance(status.get("unreadable"), int) else None,
        "error": str(error)[:300] if error else None,
    }


def scoring_view(
    store: WorklistStore, consumer_status: ConsumerStatus, stale_after: timedelta, now: datetime
) -> dict[str, Any]:
    """What the page's banner needs: whether results still come (store) and whether Kafka is reachable."""
    view = store.scoring_status(now, stale_after).as_dict()
    view["kafka"] = consumer_view(consumer_status)
    return view
