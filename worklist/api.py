"""The worklist's HTTP face: the JSON API (with its OpenAPI schema), live updates as server-sent events,
thumbnails, Prometheus metrics and the page.

Thin on purpose: ordering, state and the rules for what a reader may do live in `store` and `ordering`; this
module translates HTTP to store calls and back. The store is synchronous SQLite, so every call to it runs in a
worker thread (plain `def` endpoints, `anyio.to_thread` elsewhere) and the event loop stays free for the
event streams. Nothing here logs a study key, a URI or anything else that could identify a patient.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote_to_bytes

import anyio
from anyio import to_thread
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streaming.contracts import rfc3339
from streaming.decode import DecodeLimits, decode_image
from streaming.errors import CxrError, ErrorCode, FetchError
from streaming.fetch import FetchPolicy, fetch
from streaming.pipeline import scoring_config
from streaming.settings import Settings
from streaming.triage import Priority
from worklist.store import CLOSED, OPEN, Change, Status, StoreError, Verdict, WorklistStore

log = logging.getLogger("cxr.worklist.api")

STATIC_DIR = Path(__file__).parent / "static"
#: The most studies one page of the queue returns.
MAX_PAGE = 500
PRIORITY_FILTERS = ("STAT", "URGENT", "ROUTINE", "UNSCORED")
_STUDIES_PREFIX = "/api/studies/"
_RAW_KEY = "cxr.raw_study_key"

ConsumerStatus = Callable[[], dict[str, Any]]

# ------------------------------------------------------------------------------------------- request bodies

#: A reader's name as typed into the page: short, printable, trimmed.
ReaderName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]
PriorityName = Literal["STAT", "URGENT", "ROUTINE"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReaderBody(_Body):
    reader: ReaderName | None = Field(default=None, description="who does it (shown to other readers)")


class ClaimBody(_Body):
    reader: ReaderName = Field(description="who claims the study; another reader's claim is a 409 until released")


class DismissBody(ReaderBody):
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=200)] | None = None


class PriorityBody(ReaderBody):
    priority: PriorityName | None = Field(description="the study's class set by a person; null hands it back to the AI")


class FeedbackBody(ReaderBody):
    verdict: Verdict = Field(description="whether the reader agrees with the AI's finding for the study")


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


_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such study"},
    409: {"model": ErrorBody, "description": "the study's state does not allow it"},
}

# ------------------------------------------------------------------------------------------- pure helpers


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


def sse(event: str | None, data: Any, event_id: int | None = None) -> str:
    """One server-sent event. JSON data holds no raw newlines, so it is always a single `data:` line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


def thumbnail_png(image: Image.Image, size: int) -> bytes:
    """A PNG whose longest side is at most `size`: small enough for a list, enough to recognise the film."""
    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def refusal_status(exc: CxrError) -> int:
    """404 for an image that is not there or not allowed or not decodable; 502 for a server that failed us."""
    failed_upstream = {ErrorCode.FETCH_FAILED, ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT}
    return 502 if isinstance(exc, FetchError) and exc.code in failed_upstream else 404


# ----------------------------------------------------------------------------------------------- thumbnails


class Thumbnails:
    """Small PNGs of the studies' images, fetched and decoded by the scorer's own code under the scorer's own
    policy (allowed roots, allowed DICOMweb hosts, size limits): the page can never make the worklist fetch
    what the scorer would refuse. Bounded in time, in concurrency, and in memory (an LRU of recent ones)."""

    def __init__(
        self,
        policy: FetchPolicy,
        limits: DecodeLimits,
        *,
        size: int = 256,
        deadline_s: float = 10.0,
        concurrency: int = 4,
        cache_entries: int = 128,
    ) -> None:
        self.policy = policy
        self.limits = limits
        self.size = size
        self.deadline_s = deadline_s
        self.concurrency = concurrency
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None

    def cached(self, uri: str) -> bytes | None:
        with self._lock:
            png = self._cache.get(uri)
            if png is not None:
                self._cache.move_to_end(uri)
            return png

    def render(self, uri: str) -> bytes:
        """Fetch, decode and shrink one image (blocking: run it in a worker thread). Raises `CxrError`."""
        png = self.cached(uri)
        if png is not None:
            return png
        data = fetch(uri, self.policy, time.monotonic() + self.deadline_s)
        png = thumbnail_png(decode_image(data, self.limits, draft_size=(self.size, self.size)), self.size)
        with self._lock:
            self._cache[uri] = png
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return png

    async def get(self, uri: str) -> bytes:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        return await to_thread.run_sync(self.render, uri, limiter=self._limiter)


# ------------------------------------------------------------------------------------------- event stream


class EventFeed:
    """Server-sent events from the store's change log, so a page that reconnects resumes without gaps.

    Each change is sent once with its id; EventSource sends the last id back when it reconnects. A resume
    point older than the oldest kept change (pruned) or newer than the newest (another database) gets an
    `event: reset`: the page reconciles from /api/snapshot. Every client polls the store (cheap indexed reads);
    a rendered change is cached so that many clients cost one study lookup per change, and the number of
    clients is bounded.
    """

    def __init__(
        self,
        store: WorklistStore,
        consumer_status: ConsumerStatus,
        stale_after: timedelta,
        *,
        poll_s: float = 0.4,
        heartbeat_s: float = 15.0,
        scoring_every_s: float = 2.0,
        retry_ms: int = 3000,
        max_clients: int = 64,
        batch: int = 200,
    ) -> None:
        self.store = store
        self.consumer_status = consumer_status
        self.stale_after = stale_after
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.scoring_every_s = scoring_every_s
        self.retry_ms = retry_ms
        self.max_clients = max_clients
        self.batch = batch
        self.clients = 0
        self._clients_lock = threading.Lock()
        self._rendered: OrderedDict[int, str] = OrderedDict()
        self._rendered_lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None
        self._closed = threading.Event()

    def close(self) -> None:
        """End every stream at its next poll: a server stopping gracefully otherwise waits for pages that never
        hang up. New streams end at once (their pages retry, and find the next server)."""
        self._closed.set()

    def join(self) -> bool:
        with self._clients_lock:
            if self.clients >= self.max_clients:
                return False
            self.clients += 1
            return True

    def leave(self) -> None:
        with self._clients_lock:
            self.clients = max(0, self.clients - 1)

    def start_point(self, requested: int | None) -> tuple[int, bool]:
        """(the id to send changes after, whether the client must reconcile from the snapshot first).
        `requested` -1 stands for a resume point that could not be read."""
        first, last = self.store.change_range()
        if requested is None:
            return last, False
        if requested < 0 or requested > last or requested + 1 < first:
            return last, True
        return requested, False

    def render(self, changes: list[Change]) -> list[str]:
        """The events for some changes, each with the study's view as it is now (blocking)."""
        now = datetime.now(UTC)
        views: dict[str, dict[str, Any] | None] = {}
        out = []
        for change in changes:
            with self._rendered_lock:
                text = self._rendered.get(change.id)
            if text is None:
                study = None
                if change.study_key is not None:
                    if change.study_key not in views:
                        try:
                            views[change.study_key] = self.store.study(change.study_key, now)
                        except StoreError:  # forgotten since (pruned)
                            views[change.study_key] = None
                    study = views[change.study_key]
                data = {"id": change.id, "what": change.what, "study_key": change.study_key, "study": study}
                text = sse(change.what, data, change.id)
                with self._rendered_lock:
                    self._rendered[change.id] = text
                    while len(self._rendered) > 4 * self.batch:
                        self._rendered.popitem(last=False)
            out.append(text)
        return out

    def scoring(self) -> dict[str, Any]:
        return scoring_view(self.store, self.consumer_status, self.stale_after, datetime.now(UTC))

    async def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        # A limiter of its own: clients polling can never take every worker thread from the API's requests.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(8)
        return await to_thread.run_sync(func, *args, limiter=self._limiter)

    async def stream(self, requested: int | None) -> AsyncIterator[str]:
        """The event stream for one client, from after `requested` (None: from now); ends when cancelled."""
        cursor, reset = await self._call(self.start_point, requested)
        yield f"retry: {self.retry_ms}\n\n"
        if reset:
            yield sse("reset", {"last_event_id": cursor}, cursor)
        scoring_seen: tuple[Any, ...] | None = None
        next_scoring = 0.0
        last_sent = time.monotonic()
        while not self._closed.is_set():
            now = time.monotonic()
            if now >= next_scoring:
                scoring = await self._call(self.scoring)
                seen = (scoring["state"], scoring["kafka"]["connected"])
                if seen != scoring_seen:
                    yield sse("scoring", scoring)
                    scoring_seen, last_sent = seen, now
                next_scoring = now + self.scoring_every_s
            changes: list[Change] = await self._call(self.store.changes_since, cursor, self.batch)
            if changes and changes[0].id != cursor + 1:
                cursor, reset = await self._call(self.start_point, cursor)
                if reset:  # what came between was pruned while this client was behind
                    yield sse("reset", {"last_event_id": cursor}, cursor)
                    last_sent = now
                    continue
            if changes:
                for text in await self._call(self.render, changes):
                    yield text
                cursor, last_sent = changes[-1].id, now
                if len(changes) == self.batch:
                    continue  # more waiting: no pause
            elif now - last_sent >= self.heartbeat_s:
                yield ": keep-alive\n\n"
                last_sent = now
            await anyio.sleep(self.poll_s)


class _EventStreamResponse(StreamingResponse):
    """Gives the client's place back however the stream ends (even if it never started)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


# -------------------------------------------------------------------------------------------------- metrics


class WorklistCollector(Collector):
    """The worklist's gauges, read from the store at scrape time (nothing to keep in step)."""

    def __init__(self, store: WorklistStore, feed: EventFeed) -> None:
        self.store = store
        self.feed = feed

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not touch the store

    def collect(self) -> Iterable[Metric]:
        now = datetime.now(UTC)
        studies = GaugeMetricFamily("cxr_worklist_studies", "Studies on the worklist, by status.", labels=["status"])
        for status, count in sorted(self.store.counts().items()):
            studies.add_metric([status], count)
        yield studies
        _, items = self.store.queue(now, limit=1_000_000)
        open_by = GaugeMetricFamily(
            "cxr_worklist_open_studies", "Open (unread or claimed) studies, by priority.", labels=["priority"]
        )
        oldest = GaugeMetricFamily(
            "cxr_worklist_oldest_wait_seconds",
            "How long the longest-waiting open study has waited.",
            labels=["priority"],
        )
        for name in PRIORITY_FILTERS:
            mine = [i for i in items if (i["priority"] or "UNSCORED") == name]
            open_by.add_metric([name], len(mine))
            arrived = [datetime.fromisoformat(i["arrived_at"]) for i in mine]
            oldest.add_metric([name], max(((now - a).total_seconds() for a in arrived), default=0.0))
        yield open_by
        yield oldest
        overdue = sum(1 for i in items if i["overdue"])
        yield GaugeMetricFamily("cxr_worklist_overdue_studies", "Open studies past their maximum wait.", value=overdue)
        scoring = self.feed.scoring()
        stalled = 1.0 if scoring["state"] == "stalled" else 0.0
        yield GaugeMetricFamily(
            "cxr_worklist_scoring_stalled", "1 while images wait for results and none arrive.", value=stalled
        )
        yield GaugeMetricFamily(
            "cxr_worklist_pending_images", "Images announced but not yet scored.", value=scoring["pending"]
        )
        connected = 1.0 if scoring["kafka"]["connected"] else 0.0
        yield GaugeMetricFamily("cxr_worklist_kafka_connected", "1 while the consumer reaches Kafka.", value=connected)
        total_letters, _ = self.store.dead_letters(limit=0)
        yield GaugeMetricFamily("cxr_worklist_dead_letters", "Dead letters kept for the page.", value=total_letters)
        feedback = GaugeMetricFamily(
            "cxr_worklist_feedback",
            "Readers' verdicts on the AI's finding (latest per reader and study), by model version.",
            labels=["model", "version", "verdict"],
        )
        for item in self.store.feedback_summary():
            for verdict in Verdict:
                model = item["model"]
                feedback.add_metric([model["name"] or "", model["version"] or "", verdict.value], item[verdict.value])
        yield feedback
        yield GaugeMetricFamily("cxr_worklist_event_clients", "Pages following live updates.", value=self.feed.clients)


# ---------------------------------------------------------------------------------------------- middleware


class _Edge:
    """Two things every request needs before routing and after answering.

    Study keys are DICOM UIDs or event ids, and an event id may hold any printable character, '/' included.
    Routing sees the path percent-decoded, where an encoded '/' would split the key in two; so under
    /api/studies/ routing gets the path as sent, and `study_key` decodes the key itself.
    Answers get headers that keep study data out of caches and the page out of frames and foreign scripts.
    """

    _PAGE_HEADERS = (
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self';"
            b" frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        raw = scope.get("raw_path")
        if path.startswith(_STUDIES_PREFIX) and raw:
            sent = raw.split(b"?", 1)[0].decode("latin-1")
            if sent.startswith(_STUDIES_PREFIX):
                scope = {**scope, "path": sent, _RAW_KEY: True}
        extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
        if path == "/" or path.startswith("/static/"):
            extra.extend(self._PAGE_HEADERS)
        elif path.startswith("/api/"):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in extra if name not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def study_key(request: Request, key: str) -> str:
    """The study key from the path, percent-decoded exactly once (see `_Edge`)."""
    if request.scope.get(_RAW_KEY):
        return unquote_to_bytes(key.encode("latin-1")).decode("utf-8", "replace")
    return key


StudyKey = Annotated[str, Depends(study_key)]

# ------------------------------------------------------------------------------------------------------ app


def create_app(
    store: WorklistStore,
    settings: Settings,
    consumer_status: ConsumerStatus,
    *,
    feed: EventFeed | None = None,
    thumbnails: Thumbnails | None = None,
) -> FastAPI:
    """The worklist's ASGI app over `store`. `consumer_status` says whether Kafka is reachable (/readyz, the
    page's banner). `feed` and `thumbnails` replace the defaults (tests use a faster poll)."""
    stale_after = timedelta(seconds=settings.worklist_scoring_stale_after_s)
    feed = feed or EventFeed(store, consumer_status, stale_after)
    if thumbnails is None:
        config = scoring_config(settings)
        thumbnails = Thumbnails(config.fetch, config.limits)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorklistCollector(store, feed))

    app = FastAPI(
        title="cxr-stream triage worklist",
        version="1",
        description="The queue of chest X-rays in reading order, what readers do with it, and its live updates.",
    )
    app.state.events = feed  # `app.state.events.close()` before stopping the server ends the open streams
    app.add_middleware(_Edge)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(StoreError)
    async def store_refused(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def scoring(now: datetime) -> dict[str, Any]:
        return scoring_view(store, consumer_status, stale_after, now)

    # The page -------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    # The queue and one study ----------------------------------------------------------------------------

    @app.get("/api/studies", response_model=QueuePage, tags=["queue"])
    def list_studies(
        status: Literal["open", "read", "dismissed", "all"] = "open",
        priority: Annotated[
            list[str] | None, Query(max_length=8, description="STAT, URGENT, ROUTINE, UNSCORED")
        ] = None,
        finding: Annotated[str | None, Query(max_length=128, description="the top finding, exactly")] = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    ) -> Any:
        """The queue in reading order (open studies), or closed studies most recently closed first."""
        try:
            priorities = parse_priorities(priority)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        statuses = {"open": OPEN, "read": (Status.READ,), "dismissed": (Status.DISMISSED,), "all": (*OPEN, *CLOSED)}
        now = datetime.now(UTC)
        _, last = store.change_range()  # before the read: whatever changes after it is sent as an event
        total, items = store.queue(
            now, statuses=statuses[status], priorities=priorities, finding=finding, offset=offset, limit=limit
        )
        return {
            "items": items,
            "total": total,
            "offset": offset,
            "limit": limit,
            "now": rfc3339(now),
            "last_event_id": last,
            "scoring": scoring(now),
        }

    @app.get("/api/studies/{key}", response_model=StudyDetail, responses=_ERRORS, tags=["queue"])
    def get_study(key: StudyKey) -> Any:
        """One study with its images (each one's scores, or why it could not be scored) and its feedback."""
        return store.study(key, datetime.now(UTC))

    @app.get(
        "/api/studies/{key}/thumbnail",
        responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorBody}, 502: {"model": ErrorBody}},
        response_class=Response,
        tags=["queue"],
    )
    async def get_thumbnail(key: StudyKey) -> Response:
        """A small PNG of the study's deciding image, fetched under the scorer's rules (allowed roots and hosts)."""
        uri = await to_thread.run_sync(store.image_uri, key)
        if uri is None:
            return JSONResponse({"detail": "the study has no image to show"}, status_code=404)
        try:
            png = await thumbnails.get(uri)
        except CxrError as exc:
            return JSONResponse({"detail": exc.reason, "code": exc.code.value}, status_code=refusal_status(exc))
        except Exception as exc:  # a decoder's surprise: say so without the image's details
            log.warning("a thumbnail could not be made (%s)", type(exc).__name__)
            return JSONResponse({"detail": "the image could not be made into a thumbnail"}, status_code=502)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    # What readers do ------------------------------------------------------------------------------------

    def after(key: str) -> dict[str, Any]:
        return store.study(key, datetime.now(UTC))

    @app.post("/api/studies/{key}/claim", response_model=StudyDetail, responses=_ERRORS, tags=["actions"])
    def claim(key: StudyKey, body: ClaimBody) -> Any:
        """Claim the study for reading; a study another reader holds is a 409 until they release it."""
        store.claim(key, body.reader)
        return after(key)

    @app.post("/api/studies/{key}/release", response_model=StudyDetail, responses=_ERRORS, tags=["actions"])
    def release(key: StudyKey, body: ReaderBody | None = None) -> Any:
        """Give a claimed study back to the queue."""
        store.release(key)
        return after(key)

    @app.post("/api/studies/{key}/read", response_model=StudyDetail, responses=_ERRORS, tags=["actions"])
    def mark_read(key: StudyKey, body: ReaderBody | None = None) -> Any:
        """Mark the study read: it leaves the queue (a new image of it brings it back)."""
        store.mark_read(key, body.reader if body else None)
        return after(key)

    @app.post("/api/studies/{key}/dismiss", response_model=StudyDetail, responses=_ERRORS, tags=["actions"])
    def dismiss(key: StudyKey, body: DismissBody | None = None) -> Any:
        """Take the study off the queue without a read (e.g. a duplicate or a test image)."""
        store.dismiss(key, body.reader if body else None, body.reason if body else None)
        return after(key)

    @app.post("/api/studies/{key}/reopen", response_model=StudyDetail, responses=_ERRORS, tags=["actions"])
    def reopen(key: StudyKey, body: ReaderBody | None = None) -> Any:
        """Put a read or dismissed study back on the queue."""
        store.reopen(key)
        return after(key)

    @app.post("/api/studies/{key}/priority", response_model=StudyDetail, responses=_ERRORS, tags=["actions"])
    def set_priority(key: StudyKey, body: PriorityBody) -> Any:
        """Set the study's class by hand (the AI never lowers it); null gives the decision back to the AI."""
        store.set_priority(key, Priority(body.priority) if body.priority else None, body.reader)
        return after(key)

    @app.post("/api/studies/{key}/feedback", response_model=StudyDetail, responses=_ERRORS, tags=["actions"])
    def add_feedback(key: StudyKey, body: FeedbackBody) -> Any:
        """Agree or disagree with the AI's finding; counted per model version (/api/feedback)."""
        store.add_feedback(key, body.verdict, body.reader)
        return after(key)

    # The rest of the picture ----------------------------------------------------------------------------

    @app.get("/api/feedback", response_model=FeedbackSummary, tags=["figures"])
    def feedback_summary() -> Any:
        """Readers' agreement with the AI, per model version (each reader's latest verdict on a study)."""
        return {"items": store.feedback_summary()}

    @app.get("/api/dead-letters", response_model=DeadLetterPage, tags=["figures"])
    def dead_letters(
        offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100
    ) -> Any:
        """Images that could not be scored and why, newest first."""
        total, items = store.dead_letters(offset=offset, limit=limit)
        return {"items": items, "total": total, "offset": offset, "limit": limit}

    @app.get("/api/stats", response_model=StatsView, tags=["figures"])
    def stats() -> Any:
        """Today's waits per class (median, 95th percentile, maximum) and the studies per status."""
        now = datetime.now(UTC)
        since = local_midnight(now)
        waits = store.wait_figures(now, since)
        return {
            "since": rfc3339(since),
            "now": rfc3339(now),
            "waits": {name: summary.as_dict() for name, summary in waits.items()},
            "counts": store.counts(),
        }

    @app.get("/api/snapshot", response_model=SnapshotView, tags=["queue"])
    def snapshot() -> Any:
        """The whole open queue, recent dead letters and the scoring status, with the change id they are current
        to: load it, then follow /api/events?last_event_id=that id."""
        now = datetime.now(UTC)
        view = store.snapshot(now, stale_after)
        view["scoring"]["kafka"] = consumer_view(consumer_status)
        return view

    @app.get(
        "/api/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 503: {"model": ErrorBody}},
        tags=["queue"],
    )
    async def events(
        last_event_id: Annotated[int | None, Query(ge=0, description="resume after this change id")] = None,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
    ) -> Response:
        """Server-sent events: each change of the store (`id`, `event`: what happened, `data`: the study now),
        `scoring` when the scoring status changes and `reset` when the page must reload /api/snapshot. The
        Last-Event-ID header a reconnecting EventSource sends wins over the query parameter."""
        requested = last_event_id
        if last_event_id_header is not None:
            try:
                requested = int(last_event_id_header.strip())
            except ValueError:
                requested = -1  # unknown: the page reconciles
        if not feed.join():
            return JSONResponse({"detail": "too many pages are following live updates"}, status_code=503)
        return _EventStreamResponse(feed.stream(requested), feed.leave)

    # Operations -----------------------------------------------------------------------------------------

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "alive"}

    @app.get("/readyz", response_model=ReadyView, responses={503: {"model": ReadyView}}, tags=["operations"])
    def readyz() -> Any:
        """Ready when the store answers and the consumer reaches Kafka; 503 otherwise."""
        try:
            store.counts()
            store_ok = True
        except Exception as exc:
            log.warning("the worklist store does not answer (%s)", type(exc).__name__)
            store_ok = False
        kafka = consumer_view(consumer_status)
        body = {"ready": store_ok and kafka["connected"], "store": store_ok, "kafka": kafka}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", response_class=Response, tags=["operations"])
    def metrics() -> Response:
        """Prometheus text, computed from the store at scrape time."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
