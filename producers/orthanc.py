"""`cxr produce orthanc URL`: follows an Orthanc server's change feed and announces each new chest X-ray.

Orthanc numbers every change it makes (`GET /changes?since=N&limit=M`: the changes after N, `Last` the number
of the last one returned, `Done` once caught up). For each `NewInstance` the feed reads the instance's tags
without its pixels (`GET /instances/{id}/simplified-tags`), and publishes a reference to its WADO-RS URL on
Orthanc's DICOMweb plugin (`URL/dicom-web/studies/S/series/SE/instances/I`) when it is a chest radiograph
(`CXR_CHEST_MODALITIES` and `CXR_CHEST_SOP_CLASSES`, CR/DX by default). Other instances, and instances deleted
before their tags were read, are skipped and counted; a summary line per page of changes says how many.

Nothing is lost, across crashes and outages:

- The cursor (`CXR_STATE_DIR/orthanc/<hash of URL>.json`) is the number of the last change fully handled. It
  moves only after Kafka acknowledged every reference of the changes up to it, and is replaced atomically.
  A feed killed in between publishes those references again when it restarts, under the same event ids
  (uuid5 of the DICOMweb root and the SOP instance UID): at-least-once, consumers de-duplicate.
- `--from-start` / `--from-now` choose where a first run (no cursor yet) begins: the oldest change Orthanc
  still holds, or its current last change (saved at once, so what arrives while Kafka is being reached is
  not skipped). An existing cursor always wins.
- Orthanc down, slow or overloaded: a warning, retries with backoff, the cursor untouched. One instance it
  keeps failing on while it answers everything else (HTTP 500: a file it cannot parse) is skipped and counted
  after a few tries, so it cannot hold up the feed. Credentials it refuses or a URL that is not Orthanc stop
  the feed with one line that says so.

What it cannot see: changes Orthanc no longer holds (a cursor older than a pruned or replaced database: the
feed warns when Orthanc's last change is behind the cursor), and, with several Orthanc processes writing one
database, a change numbered below one already read but committed after it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from producers.pacs import (
    SKIPPED,
    ChestFilter,
    CursorStore,
    InstanceGone,
    JsonGetter,
    PacsError,
    PacsFeed,
    PacsUnavailable,
    Stopped,
    Tally,
    check_url,
    cursor_store,
    decide,
    follow_feed,
    instance_from_simplified_tags,
    publish_then_commit,
    service_root,
)
from producers.publish import Publisher
from streaming.backoff import Backoff
from streaming.contracts import Reference
from streaming.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Changes asked for per request (Orthanc answers at most 100 at a time anyway).
PAGE_SIZE = 100
#: Orthanc's resource ids (a SHA-1 of the DICOM identifiers, as five groups of eight hex digits); anything
#: else never goes into a request path.
_ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")


@dataclass(frozen=True)
class Change:
    seq: int
    change_type: str
    resource_id: str


@dataclass(frozen=True)
class ChangePage:
    changes: list[Change]
    done: bool
    last: int


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def parse_changes(body: Any) -> ChangePage:
    """One answer of `GET /changes`; `PacsUnavailable` when it is not one (a proxy's page, a half answer)."""
    if not isinstance(body, dict) or not isinstance(body.get("Changes"), list) or _int(body.get("Last")) is None:
        raise PacsUnavailable("an answer that is not Orthanc's change feed")
    changes = []
    for item in body["Changes"]:
        seq = _int(item.get("Seq")) if isinstance(item, dict) else None
        if seq is None:
            raise PacsUnavailable("a change without a number")
        changes.append(Change(seq, str(item.get("ChangeType", "")), str(item.get("ID", ""))))
    return ChangePage(sorted(changes, key=lambda c: c.seq), bool(body.get("Done", True)), int(body["Last"]))


def parse_last(body: Any) -> int:
    """`GET /changes?last`: the number of Orthanc's latest change."""
    last = _int(body.get("Last")) if isinstance(body, dict) else None
    if last is None:
        raise PacsUnavailable("an answer that is not Orthanc's change feed")
    return last


def cursor_body(seq: int) -> dict[str, Any]:
    return {"last_seq": seq}


def cursor_seq(store: CursorStore, body: dict[str, Any]) -> int:
    seq = _int(body.get("last_seq"))
    if seq is None or set(body) != {"last_seq"}:
        raise store.corrupt("it needs exactly a non-negative integer 'last_seq'")
    return seq


class OrthancFeed(PacsFeed[int]):
    """The change-feed follower, its I/O injected (an HTTP client, a cursor store, a publisher) so it is testable.

    `url` (Orthanc's REST root) and `dicomweb_root` come checked (`check_url`)."""

    NAME = "orthanc"
    CURSOR_SCHEMA = "cxr.orthanc-cursor/v1"

    def __init__(
        self,
        http: JsonGetter,
        url: str,
        store: CursorStore,
        chest: ChestFilter,
        *,
        dicomweb_root: str | None = None,
        poll_interval_s: float = 1.0,
        stop: Callable[[], bool] = lambda: False,
        backoff: Backoff | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.url = service_root(url)
        super().__init__(
            http,
            store,
            chest,
            f"Orthanc at {self.url}",
            dicomweb_root or f"{self.url}/dicom-web",
            poll_interval_s=poll_interval_s,
            stop=stop,
            backoff=backoff,
        )
        self.page_size = page_size

    def parse_cursor(self, body: dict[str, Any]) -> int:
        return cursor_seq(self.store, body)

    def position(self) -> str:
        return f"after change {self.cursor}"

    def first_run(self, begin: str) -> int:
        """From the start: after change 0. From now: after Orthanc's latest change, saved at once (a crash
        before the first page must not move "now" on)."""
        if begin == "start":
            return 0
        last = self._changes({"last": ""}, parse_last)
        self.store.save(cursor_body(last))
        log.info("first run: announcing what arrives from now on (--from-now), after change %d", last)
        return last

    def step(self, publisher: Publisher) -> bool:
        """Handle one page of changes; True when Orthanc said it was caught up."""
        assert self.cursor is not None
        since = self.cursor
        page = self._changes({"since": since, "limit": self.page_size}, parse_changes)
        if not page.changes:
            if page.last < since:
                # Orthanc numbers changes afresh after its database was replaced or reset: waiting for it to
                # pass the old cursor would skip every image stored until then. Follow the new feed from its
                # start; images announced before keep their event ids, so consumers drop the repeats.
                log.warning(
                    "Orthanc's last change is %d, before this cursor (%d): its database was replaced or reset; "
                    "following its change feed from the start",
                    page.last,
                    since,
                )
                self.cursor = 0
                return False
            return True  # nothing new, whatever `Done` says: wait a poll rather than ask again at once
        refs: list[Reference] = []
        tally = Tally()
        handled = since
        stopped = False
        for change in page.changes:
            if change.seq <= since:
                continue
            if change.change_type == "NewInstance":
                try:
                    ref = self._instance(change.resource_id, tally)
                except Stopped:
                    stopped = True
                    break
                if ref is not None:
                    refs.append(ref)
            handled = change.seq
        if handled != since:
            publish_then_commit(publisher, refs, lambda: self._commit(handled))
            self.tally.add(tally)
            if tally.looked_at:
                log.info(
                    "changes %d-%d: %s (%d published in all)", since + 1, handled, tally.summary(), self.tally.published
                )
        if stopped:
            raise Stopped()
        # A page with nothing after the cursor is a broken feed: waiting a poll beats asking again at once.
        return page.done or handled == since

    def _changes(self, params: dict[str, Any], parse: Callable[[Any], T]) -> T:
        """`GET /changes`, retried while Orthanc is away or answers garbage; no change feed there is an error."""
        url = f"{self.url}/changes"
        try:
            return self.get(lambda: parse(self.http.get_json(url, params)))
        except InstanceGone:
            raise PacsError(f"{url} is not there (HTTP 404): is {self.url} Orthanc's REST root?") from None

    def _instance(self, resource_id: str, tally: Tally) -> Reference | None:
        if not _ORTHANC_ID.fullmatch(resource_id):
            tally.unusable += 1
            return None
        tags = self.get_instance(
            lambda: self.http.get_json(f"{self.url}/instances/{resource_id}/simplified-tags"), tally
        )
        if tags is SKIPPED:
            return None
        if not isinstance(tags, dict):
            tally.unusable += 1
            return None
        return decide(instance_from_simplified_tags(tags), self.chest, self.dicomweb_root, tally)

    def _commit(self, seq: int) -> None:
        self.store.save(cursor_body(seq))
        self.cursor = seq


#: The schema of this feed's cursor files.
CURSOR_SCHEMA = OrthancFeed.CURSOR_SCHEMA


def store_for(settings: Settings, url: str) -> CursorStore:
    """The cursor store of the Orthanc at `url` under `CXR_STATE_DIR`."""
    return cursor_store(settings, OrthancFeed, url)


def follow(
    settings: Settings,
    url: str,
    *,
    begin: str,
    stop: Callable[[], bool],
    watch: Callable[[PacsFeed[Any]], None] | None = None,
) -> int:
    """`cxr produce orthanc`: follow `url`'s change feed until `stop()`; how many references were published.
    `watch` gets the running feed (for `producers.health`)."""
    root = settings.orthanc_dicomweb_root
    return follow_feed(
        settings, url, begin, stop, OrthancFeed, watch=watch, dicomweb_root=check_url(root) if root else None
    )
