"""`cxr produce dicomweb URL`: polls any DICOMweb server (QIDO-RS) for new chest X-rays and announces each.

QIDO-RS can search for instances but not for "received since": no standard attribute says when an instance
arrived. So each poll asks, per chest modality (`CXR_CHEST_MODALITIES`, CR and DX by default), for the
instances whose StudyDate falls in a window, `GET {root}/instances?Modality=DX&StudyDate=YYYYMMDD-` (paged
with `limit`/`offset`), and announces those it has not announced before, de-duplicated on SOP instance UID.
The window starts at midnight of the day `CXR_DICOMWEB_POLL_OVERLAP_S` (24 h by default) before the newest
study date and time seen so far (the high-water mark), and is open towards the future. For each new match the
feed reads the instance's metadata (WADO-RS `…/instances/I/metadata`: the tags, never the pixels) for what
the search does not return (the view position) and publishes a reference to its WADO-RS URL when its SOP class
is a chest class (`CXR_CHEST_SOP_CLASSES`); anything else is skipped and counted.

The cursor (`CXR_STATE_DIR/dicomweb/<hash of URL>.json`) holds the high-water mark and the SOP instance UIDs
announced (or skipped) whose study date is inside the window, each with its study date. It stays bounded: at
the end of every complete poll the mark moves to the newest study seen (never past this machine's clock, so a
modality whose clock runs years ahead cannot drag the window away from today), and a UID is forgotten once its
study date is before the window and the last poll no longer returned it.

Nothing announced is lost, and a repeat has the same event id: UIDs are recorded only after Kafka
acknowledged their references (page by page, in memory; the file is written once per modality searched and
when a poll is cut short), and the high-water mark moves only after a whole poll, so a feed killed mid-poll
searches the same window again and announces only what it had not recorded (again, under the same event id,
what Kafka had acknowledged since the last cursor write: at most one modality's worth). `--from-now` on a
first run records what the window holds now as seen and announces none of it; `--from-start` searches without
a date and announces every chest X-ray the server holds. An existing cursor always wins.

What it can miss, and why. The window is about study dates, not arrival, so an instance is missed when it
arrives with a study date before the window:

- a prior or an archive migration (old studies loaded into the PACS), by design: they are not new images;
- a late send: a modality or a router that holds images for longer than the overlap before sending them;
- a modality whose clock is behind by more than the overlap;
- an instance without a StudyDate: a date-range search does not match it (unless the server returns such
  instances anyway, in which case they are announced). Only a `--from-start` first run, which searches
  without a date, sees them; afterwards they are missed. Checking the modality's set-up is the cure.

A longer overlap narrows these gaps at the price of larger searches (every poll returns the whole window);
raise `CXR_FEED_POLL_INTERVAL_S` for a busy server. Servers that cap search results below the page size are
read only up to their cap. Where the PACS is Orthanc, `cxr produce orthanc` follows its change feed instead
and misses none of these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any

from producers.pacs import (
    DICOM_JSON,
    SKIPPED,
    ChestFilter,
    CursorStore,
    Instance,
    InstanceGone,
    JsonGetter,
    PacsError,
    PacsFeed,
    PacsUnavailable,
    Stopped,
    Tally,
    cursor_store,
    decide,
    follow_feed,
    instance_from_dicom_json,
    instance_url,
    prefer,
    publish_then_commit,
    service_root,
    valid_uid,
)
from producers.publish import Publisher
from streaming.backoff import Backoff
from streaming.contracts import Reference
from streaming.settings import Settings

log = logging.getLogger(__name__)
#: Matches asked for per QIDO-RS request.
PAGE_SIZE = 500
_MOMENT_FORMAT = "%Y-%m-%dT%H:%M:%S"


# --------------------------------------------------------------------------------------- dates and windows


def parse_da(text: str | None) -> date | None:
    """A DICOM DA value (`YYYYMMDD`, or the old `YYYY.MM.DD`); None when absent or not a date."""
    if not text:
        return None
    digits = text.strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def parse_tm(text: str | None) -> time | None:
    """A DICOM TM value (`HH`, `HHMM`, `HHMMSS`, `HHMMSS.F…`, or the old `HH:MM:SS`); None when not a time."""
    if not text:
        return None
    whole = text.strip().replace(":", "").split(".", 1)[0]
    if len(whole) not in (2, 4, 6) or not whole.isdigit():
        return None
    parts = [int(whole[i : i + 2]) for i in range(0, len(whole), 2)] + [0, 0]
    hour, minute, second = parts[0], parts[1], min(parts[2], 59)  # 60: a leap second
    try:
        return time(hour, minute, second)
    except ValueError:
        return None


def study_moment(instance: Instance) -> datetime | None:
    """When the study was made, as the modality's clock said (no time: midnight); None without a date."""
    day = parse_da(instance.study_date)
    if day is None:
        return None
    return datetime.combine(day, parse_tm(instance.study_time) or time())


def day_key(instance: Instance) -> str:
    """The study date as the cursor keeps it (`YYYYMMDD`, sortable), or "" when there is none."""
    day = parse_da(instance.study_date)
    return f"{day:%Y%m%d}" if day is not None else ""


def window_start(high_water: datetime | None, overlap_s: float) -> date | None:
    """The first study date searched: the day `overlap_s` before the high-water mark; None: search all dates."""
    if high_water is None:
        return None
    return (high_water - timedelta(seconds=overlap_s)).date()


def qido_params(modality: str, start: date | None, limit: int, offset: int) -> dict[str, str | int]:
    params: dict[str, str | int] = {"Modality": modality, "limit": limit, "offset": offset}
    if start is not None:
        params["StudyDate"] = f"{start:%Y%m%d}-"
    return params


def parse_matches(body: Any) -> list[dict[str, Any]]:
    """A QIDO-RS answer: a JSON array of datasets (204, no content: none). `PacsUnavailable` for anything else."""
    if body is None:
        return []
    if not isinstance(body, list):
        raise PacsUnavailable("a search answer that is not a JSON array")
    return [item for item in body if isinstance(item, dict)]


# ---------------------------------------------------------------------------------------------------- cursor


@dataclass
class DicomwebCursor:
    """The high-water mark and the UIDs already handled inside the window (UID → study date `YYYYMMDD` or "")."""

    high_water: datetime | None = None
    seen: dict[str, str] = field(default_factory=dict)

    def knows(self, uid: str) -> bool:
        return uid in self.seen

    def record(self, uid: str, day: str) -> None:
        self.seen[uid] = day

    def advance(self, moments: Iterable[datetime], now: datetime) -> bool:
        """Move the mark to the newest study moment seen, never past `now`; True if it moved."""
        newest = max((min(m, now) for m in moments), default=None)
        if newest is None or (self.high_water is not None and newest <= self.high_water):
            return False
        self.high_water = newest.replace(microsecond=0)
        return True

    def forget(self, start: date | None, returned: set[str]) -> int:
        """Drop UIDs that no search can return again: dated before the window start (or undated), and absent
        from the last complete poll. With no window yet (every date searched) nothing is dropped."""
        if start is None:
            return 0
        before = f"{start:%Y%m%d}"
        stale = [uid for uid, day in self.seen.items() if day < before and uid not in returned]
        for uid in stale:
            del self.seen[uid]
        return len(stale)

    def to_body(self) -> dict[str, Any]:
        mark = self.high_water.strftime(_MOMENT_FORMAT) if self.high_water is not None else None
        return {"high_water": mark, "seen": dict(sorted(self.seen.items()))}

    @classmethod
    def from_body(cls, store: CursorStore, body: dict[str, Any]) -> DicomwebCursor:
        """Strict: anything but exactly what `to_body` writes is corrupt."""
        if set(body) != {"high_water", "seen"}:
            raise store.corrupt("it needs exactly 'high_water' and 'seen'")
        mark, seen = body["high_water"], body["seen"]
        high_water = None
        if mark is not None:
            try:
                high_water = datetime.strptime(mark, _MOMENT_FORMAT) if isinstance(mark, str) else None
            except ValueError:
                high_water = None
            if high_water is None:
                raise store.corrupt("'high_water' is not a date and time")
        if not isinstance(seen, dict) or not all(
            valid_uid(uid) and isinstance(day, str) and (day == "" or parse_da(day) is not None)
            for uid, day in seen.items()
        ):
            raise store.corrupt("'seen' must map UIDs to study dates (YYYYMMDD or empty)")
        return cls(high_water, dict(seen))


# ------------------------------------------------------------------------------------------------------ feed


class DicomwebFeed(PacsFeed[DicomwebCursor]):
    """The polling loop, its I/O injected (an HTTP client, a cursor store, a publisher, a clock); `root` comes
    checked (`check_url`)."""

    NAME = "dicomweb"
    CURSOR_SCHEMA = "cxr.dicomweb-cursor/v1"

    def __init__(
        self,
        http: JsonGetter,
        root: str,
        store: CursorStore,
        chest: ChestFilter,
        *,
        overlap_s: float,
        poll_interval_s: float = 1.0,
        stop: Callable[[], bool] = lambda: False,
        backoff: Backoff | None = None,
        clock: Callable[[], datetime] = datetime.now,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.root = service_root(root)
        super().__init__(
            http,
            store,
            chest,
            f"the DICOMweb server at {self.root}",
            self.root,
            poll_interval_s=poll_interval_s,
            stop=stop,
            backoff=backoff,
        )
        self.overlap_s = overlap_s
        self.clock = clock
        self.page_size = page_size
        #: The cursor in memory holds what the file does not yet (UIDs Kafka acknowledged, a new mark).
        self._unsaved = False

    def parse_cursor(self, body: dict[str, Any]) -> DicomwebCursor:
        return DicomwebCursor.from_body(self.store, body)

    def position(self) -> str:
        return f"with {len(self.cursor.seen) if self.cursor else 0} instance(s) remembered"

    def first_run(self, begin: str) -> DicomwebCursor:
        """From the start: no mark, every date searched. From now: the mark at this moment, and what the window
        holds now recorded as seen (announced never), saved at once."""
        if begin == "start":
            return DicomwebCursor()
        cursor = self.cursor = DicomwebCursor(high_water=self.clock().replace(microsecond=0))
        self._unsaved = True  # the mark is saved even when the window is empty
        self.poll(None)
        log.info(
            "first run: %d instance(s) already there recorded as seen, not announced (--from-now)", len(cursor.seen)
        )
        return cursor

    def step(self, publisher: Publisher) -> bool:
        """One poll; a poll always ends caught up."""
        self.poll(publisher)
        return True

    def poll(self, publisher: Publisher | None) -> Tally:
        """One search of the window, every modality and page; then the high-water mark moves and old UIDs go.
        Without a publisher it records what the window holds as seen and announces nothing (`--from-now`).

        Each page is published, and its UIDs recorded in memory once Kafka acknowledged them; the cursor file is
        written after each modality and when a poll is cut short (a stop, Kafka failing), not after each page:
        every write holds all the UIDs remembered, so a first run over a big archive would cost O(N²). A feed
        killed in between announces again, under the same event ids, at most what one modality brought."""
        cursor = self.cursor
        assert cursor is not None
        start = window_start(cursor.high_water, self.overlap_s)
        returned: set[str] = set()
        moments: list[datetime] = []
        tally = Tally()
        try:
            for modality in sorted(self.chest.modalities):
                self._modality(publisher, modality, start, returned, moments, tally)
                self._save()
        except BaseException:
            self._save()  # what Kafka acknowledged before the poll was cut short stays recorded
            raise
        moved = cursor.advance(moments, self.clock())
        dropped = cursor.forget(window_start(cursor.high_water, self.overlap_s), returned)
        self._unsaved = self._unsaved or moved or dropped > 0
        self._save()
        news = tally.published + tally.not_chest + tally.gone
        log.log(
            logging.INFO if news and publisher is not None else logging.DEBUG,
            "poll: %s (%d published in all; %d instance(s) remembered)",
            tally.summary(),
            self.tally.published,
            len(cursor.seen),
        )
        return tally

    def _modality(
        self,
        publisher: Publisher | None,
        modality: str,
        start: date | None,
        returned: set[str],
        moments: list[datetime],
        tally: Tally,
    ) -> None:
        """Every page of one modality's matches. The last page is a short one; a longer one, or a full one that
        brings no valid UID this poll has not seen, is a server ignoring limit or offset (or returning junk):
        paging stops there, so it ends after at most one page per instance the server holds, plus one."""
        offset = 0
        while True:
            matches = self._search(qido_params(modality, start, self.page_size, offset))
            instances = [instance_from_dicom_json(m) for m in matches]
            fresh = any(valid_uid(i.sop_instance_uid) and i.sop_instance_uid not in returned for i in instances)
            self._page(publisher, instances, returned, moments, tally)
            if len(matches) != self.page_size or not fresh:
                return
            offset += len(matches)

    def _save(self) -> None:
        cursor = self.cursor
        if self._unsaved and cursor is not None:
            self.store.save(cursor.to_body())
            self._unsaved = False

    def _page(
        self,
        publisher: Publisher | None,
        instances: list[Instance],
        returned: set[str],
        moments: list[datetime],
        total: Tally,
    ) -> None:
        """Handle one page of matches; publish what is new, then record it (only once Kafka acknowledged)."""
        cursor = self.cursor
        assert cursor is not None
        refs: list[Reference] = []
        handled: dict[str, str] = {}  # UID → study date, in order
        tally = Tally()
        stopped = False
        for instance in instances:
            uid = instance.sop_instance_uid
            if not valid_uid(uid):
                tally.unusable += 1
                continue
            returned.add(uid)
            moment = study_moment(instance)
            if moment is not None:
                moments.append(moment)
            if cursor.knows(uid) or uid in handled:
                continue
            if publisher is not None:
                try:
                    ref = self._announce(instance, tally)
                except Stopped:
                    stopped = True
                    break
                if ref is not None:
                    refs.append(ref)
            handled[uid] = day_key(instance)

        def commit() -> None:
            for uid, day in handled.items():
                cursor.record(uid, day)
            self._unsaved = True

        if handled:
            if publisher is None:
                commit()
            else:
                publish_then_commit(publisher, refs, commit)
        self.tally.add(tally)
        total.add(tally)
        if stopped:
            raise Stopped()

    def _search(self, params: dict[str, str | int]) -> list[dict[str, Any]]:
        """One page of QIDO-RS matches (instances across all studies), retried while the server is away."""
        url = f"{self.root}/instances"
        try:
            return self.get(lambda: parse_matches(self.http.get_json(url, params, accept=DICOM_JSON)))
        except InstanceGone:
            raise PacsError(f"{url} is not there (HTTP 404): is {self.root} a DICOMweb service root?") from None

    def _announce(self, match: Instance, tally: Tally) -> Reference | None:
        """The reference for a new match, or None (counted): SOP class first, then its metadata (one request)."""
        if match.sop_class_uid is not None and not self.chest.sop_class_ok(match):
            tally.not_chest += 1
            return None
        url = instance_url(self.root, match)
        if url is None:
            tally.unusable += 1
            return None
        metadata = self.get_instance(lambda: self.http.get_json(f"{url}/metadata", accept=DICOM_JSON), tally)
        if metadata is SKIPPED:
            return None
        datasets = parse_matches(metadata) if isinstance(metadata, list) else []
        details = instance_from_dicom_json(datasets[0]) if datasets else Instance()
        # The metadata is the instance's whole header, so it wins; a QIDO-RS match may hold only some
        # attributes, or trimmed values. The UIDs stay the match's: they are what the cursor records and what
        # the metadata was read by, so the reference names the very URL that answered.
        found = replace(
            details, study_uid=match.study_uid, series_uid=match.series_uid, sop_instance_uid=match.sop_instance_uid
        )
        return decide(prefer(found, match), self.chest, self.root, tally)


#: The schema of this feed's cursor files.
CURSOR_SCHEMA = DicomwebFeed.CURSOR_SCHEMA


def store_for(settings: Settings, url: str) -> CursorStore:
    """The cursor store of the DICOMweb service root `url` under `CXR_STATE_DIR`."""
    return cursor_store(settings, DicomwebFeed, url)


def follow(
    settings: Settings,
    url: str,
    *,
    begin: str,
    stop: Callable[[], bool],
    watch: Callable[[PacsFeed[Any]], None] | None = None,
) -> int:
    """`cxr produce dicomweb`: poll the service root `url` until `stop()`; how many references were published.
    `watch` gets the running feed (for `producers.health`)."""
    return follow_feed(
        settings, url, begin, stop, DicomwebFeed, watch=watch, overlap_s=settings.dicomweb_poll_overlap_s
    )
