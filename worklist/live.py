"""Server-sent events, so that every open page sees a change as it happens and a page that reconnects misses
none."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from anyio import to_thread
from fastapi.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from worklist.store import Change, WorklistStore
from worklist.views import ConsumerStatus, scoring_view

log = logging.getLogger("cxr.worklist.api")

#: A page that has not taken an event for this long (its connection's buffers are full) is hung up on: it
#: would otherwise hold one of the feed's places for as long as its connection stays open.
WRITE_TIMEOUT_S = 30.0


def sse(event: str | None, data: Any, event_id: int | None = None) -> str:
    """One server-sent event. JSON data holds no raw newlines, so it is always a single `data:` line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


class EventFeed:
    """Server-sent events from the store's change log, so a page that reconnects resumes without gaps.

    Each change is sent once with its id; EventSource sends the last id back when it reconnects. A resume
    point older than the oldest kept change (pruned) or newer than the newest (another database) gets an
    `event: reset`: the page reconciles from /api/snapshot. Every client polls the store (cheap indexed reads);
    a rendered change is cached so that many clients cost one study lookup per change, and the number of
    clients is bounded, and a client that stops reading is hung up on after `write_timeout_s`
    (`EventStreamResponse`), so that it cannot keep its place for ever.
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
        write_timeout_s: float = WRITE_TIMEOUT_S,
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
        self.write_timeout_s = write_timeout_s
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
        """The events for some changes, each with the study's view as it is now (blocking). The queue is
        ordered once for the whole batch, not once per study."""
        with self._rendered_lock:
            missing = [c for c in changes if c.id not in self._rendered]
        keys = {c.study_key for c in missing if c.study_key is not None}
        views = self.store.studies(keys, datetime.now(UTC)) if keys else {}
        out = []
        for change in changes:
            with self._rendered_lock:
                text = self._rendered.get(change.id)
            if text is None:
                study = views.get(change.study_key) if change.study_key is not None else None
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


class _Stalled(Exception):
    """The client took nothing for the whole write timeout."""


class EventStreamResponse(StreamingResponse):
    """An event stream that gives the client's place back however it ends (even if it never started), and
    ends when one write waits longer than `write_timeout_s`: a client that stops reading (a suspended laptop,
    a stuck proxy) leaves its connection open, and the server would wait on it for ever."""

    def __init__(
        self, content: AsyncIterator[str], release: Callable[[], None], *, write_timeout_s: float = WRITE_TIMEOUT_S
    ) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._content = content
        self._release = release
        self.write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            try:
                with anyio.fail_after(self.write_timeout_s):
                    await send(message)
            except TimeoutError:
                raise _Stalled from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except _Stalled:
            # Returning with the response unfinished makes the server close the connection.
            log.warning("a page took no live update for %g s; its event stream was ended", self.write_timeout_s)
        finally:
            self._release()
            close = getattr(self._content, "aclose", None)
            if close is not None:
                with anyio.CancelScope(shield=True):
                    await close()
