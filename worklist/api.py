"""The worklist's HTTP face: routes that translate HTTP to store calls and back, and nothing else.

Ordering, state and the rules for what a reader may do live in `store` and `ordering`. The store is synchronous
SQLite, so every call to it runs in a worker thread (plain `def` endpoints, `anyio.to_thread` elsewhere) and the
event loop stays free for the event streams. Nothing here logs a study key, a URI or anything else that could
identify a patient.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote_to_bytes, urlsplit

from anyio import to_thread
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streaming.contracts import rfc3339
from streaming.errors import CxrError
from streaming.scoring import scoring_config
from streaming.settings import Settings
from streaming.triage import Priority
from worklist.live import EventFeed, EventStreamResponse
from worklist.metrics import WorklistCollector
from worklist.store import CLOSED, OPEN, Status, StoreError, Verdict, WorklistStore
from worklist.thumbnails import Thumbnails, refusal_status
from worklist.views import (
    ConsumerStatus,
    DeadLetterPage,
    ErrorBody,
    FeedbackSummary,
    PriorityName,
    QueuePage,
    ReadyView,
    SnapshotView,
    StatsView,
    StudyDetail,
    consumer_view,
    local_midnight,
    parse_priorities,
    scoring_view,
)

log = logging.getLogger("cxr.worklist.api")

STATIC_DIR = Path(__file__).parent / "static"
#: The most studies one page of the queue returns.
MAX_PAGE = 500
#: The largest `offset` a paged list accepts (SQLite's integers end at 2**63; a page that far is empty anyway).
MAX_OFFSET = 10**9
#: The largest change id a page may resume after.
MAX_EVENT_ID = 2**62
_STUDIES_PREFIX = "/api/studies/"
_RAW_KEY = "cxr.raw_study_key"

# ------------------------------------------------------------------------------------------- request bodies

#: A reader's name as typed into the page: short, printable, trimmed.
ReaderName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]


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


#: What a study's routes may refuse, as the schema shows it.
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such study"},
    409: {"model": ErrorBody, "description": "the study's state does not allow it"},
}

# ---------------------------------------------------------------------------------------------- middleware


#: Paths a probe or Prometheus reaches without credentials (they carry no study data), and by any host name (a
#: kubelet probes the pod's address).
_OPEN_PATHS = ("/healthz", "/readyz", "/metrics")
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: Names that reach a loopback address only: no other site can rebind them.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_WRONG_SITE = "changes are accepted from the worklist's own page only"
_WRONG_HOST = "the worklist does not answer to this host name (its operator can add it to CXR_WORKLIST_ALLOWED_HOSTS)"


def host_name(value: str) -> str:
    """The host part of a Host header (or of a configured name), lower case, without port or trailing dot;
    an IPv6 address in brackets ("[::1]"). "" when there is none."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else ""
    if text.count(":") > 1:  # a bare IPv6 address, as a setting may give it
        return f"[{text}]"
    return text.partition(":")[0].rstrip(".")


def _is_loopback(host: str) -> bool:
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def accepted_hosts(settings: Settings) -> frozenset[str] | None:
    """The host names the worklist answers to (Host, and X-Forwarded-Host when present); None: any.

    A browser sends a page's own host name in Host, and another site cannot change it: a site that rebinds its
    name to 127.0.0.1 still sends its own name, so checking Host keeps such a site from reading the queue or
    changing it. CXR_WORKLIST_ALLOWED_HOSTS names the hosts besides loopback names; without it a worklist on
    loopback answers to loopback names only, and one listening elsewhere to any name (the service warns)."""
    configured = {name for name in (host_name(h) for h in settings.worklist_allowed_hosts) if name}
    if configured:
        return frozenset(configured | LOOPBACK_NAMES)
    if _is_loopback(settings.worklist_host):
        return LOOPBACK_NAMES | {host_name(settings.worklist_host)}
    return None


def _forwarded_hosts(headers: Headers) -> list[str]:
    """X-Forwarded-Host's names (a chain of proxies may list several); none when it is absent."""
    value = headers.get("x-forwarded-host")
    return [] if value is None else [part.strip() for part in value.split(",")]


def refusal(scope: Scope, authorization: str | None, hosts: frozenset[str] | None = None) -> tuple[int, str] | None:
    """Why a request is refused before routing, if it is.

    A request must name a host the worklist answers to (`accepted_hosts`; the probes excepted), so that no
    other site reaches it through DNS rebinding. It needs the site's basic credentials when one is configured.
    A request that changes something must come from the page itself: a browser sends a logged-in reader's
    credentials to this host even from another site's form, and marking a study read takes it off the queue,
    so cross-site writes, and writes from an opaque origin (`Origin: null`: a sandboxed frame, a file), are
    refused.
    """
    path: str = scope["path"]
    headers = Headers(scope=scope)
    if hosts is not None and path not in _OPEN_PATHS:
        names = [headers.get("host", ""), *_forwarded_hosts(headers)]
        if any(host_name(name) not in hosts for name in names):
            return 400, _WRONG_HOST
    if authorization is not None and path not in _OPEN_PATHS:
        given = headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("latin-1"), authorization.encode("latin-1")):
            return 401, "credentials required"
    if scope["method"] not in _SAFE_METHODS:
        if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return 403, _WRONG_SITE
        origin = headers.get("origin")
        if origin is not None:
            # Behind a reverse proxy the page's host arrives as X-Forwarded-Host.
            own = {name.lower() for name in (headers.get("host", ""), *_forwarded_hosts(headers))}
            own.discard("")
            netloc = "" if origin.strip().lower() == "null" else urlsplit(origin.strip()).netloc.lower()
            if not netloc or netloc not in own:
                return 403, _WRONG_SITE
    return None


class _Edge:
    """What every request needs before routing and after answering.

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

    def __init__(self, app: ASGIApp, authorization: str | None = None, hosts: frozenset[str] | None = None) -> None:
        self.app = app
        self.authorization = authorization
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = refusal(scope, self.authorization, self.hosts)
        if refused is not None:
            status, detail = refused
            headers = {"WWW-Authenticate": 'Basic realm="cxr-stream worklist"'} if status == 401 else None
            await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)
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
        # No /docs or /redoc: their scripts come from a CDN, which neither a hospital network nor the page's
        # content security policy allows; /openapi.json is there for any OpenAPI viewer.
        docs_url=None,
        redoc_url=None,
        title="cxr-stream triage worklist",
        version="1",
        description="The queue of chest X-rays in reading order, what readers do with it, and its live updates.",
    )
    app.state.events = feed  # `app.state.events.close()` before stopping the server ends the open streams
    app.add_middleware(_Edge, authorization=settings.worklist_authorization(), hosts=accepted_hosts(settings))
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
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
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
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
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
    def snapshot(limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = MAX_PAGE) -> Any:
        """The head of the open queue (`total` says how long it is), recent dead letters and the scoring
        status, with the change id they are current to: load it, then follow /api/events?last_event_id=that id."""
        now = datetime.now(UTC)
        view = store.snapshot(now, stale_after, limit)
        view["scoring"]["kafka"] = consumer_view(consumer_status)
        return view

    @app.get(
        "/api/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 503: {"model": ErrorBody}},
        tags=["queue"],
    )
    async def events(
        last_event_id: Annotated[
            int | None, Query(ge=0, le=MAX_EVENT_ID, description="resume after this change id")
        ] = None,
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
            if not 0 <= requested <= MAX_EVENT_ID:
                requested = -1
        if not feed.join():
            return JSONResponse({"detail": "too many pages are following live updates"}, status_code=503)
        return EventStreamResponse(feed.stream(requested), feed.leave, write_timeout_s=feed.write_timeout_s)

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
