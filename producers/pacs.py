"""What the two PACS feeds (`cxr produce orthanc`, `cxr produce dicomweb`) share.

Pure functions in the middle: which instances are chest X-rays, the tags of an instance from Orthanc's
simplified tags or from DICOM JSON (PS3.18 F.2), its WADO-RS URL, its deterministic event id and its
reference. Thin I/O at the edges: one HTTP client (a `requests` session with the configured credentials,
a timeout on every request, no redirects, no credentials or proxies taken from the environment or `.netrc`),
retries with backoff while the PACS is away, a small strict cursor store on `producers.state`, and the
publish-then-commit step.

The HTTP layer is `requests` rather than dicomweb-client's `DICOMwebClient`: both feeds need the same
credentials, timeouts, redirect rule and mapping of failures (away: retry; refused: stop; gone: skip), and
QIDO-RS and WADO-RS metadata are plain GETs of JSON, so a second client would add nothing but its defaults.

Event ids are a uuid5 of the DICOMweb service root and the SOP instance UID, so every announcement of one
instance at one place carries the same id: after a crash, a restart, `--from-start`, or when both feeds
follow the same Orthanc. Consumers de-duplicate on it.

Logs carry counts, change numbers and server addresses, never patient data: no names, IDs, UIDs, dates or
instance URLs (a `requests` exception quotes its URL, so only its class is logged).
"""

from __future__ import annotations

import enum
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeGuard, TypeVar
from urllib.parse import urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection

from producers.publish import Publisher, ReferencePublisher
from producers.state import StateError, read_json, state_file, write_atomic
from streaming.backoff import Backoff
from streaming.contracts import Reference, now_utc, rfc3339
from streaming.errors import FetchError
from streaming.fetch import Watchdog, dicomweb_target
from streaming.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
#: A feed's cursor, as it holds it in memory.
C = TypeVar("C")

#: uuid5 namespace of PACS event ids; fixed forever, or every instance would get a new id.
EVENT_NAMESPACE = uuid.UUID("3fc7fdc6-8102-405c-8630-90cee16dee35")
DICOM_JSON = "application/dicom+json"
#: Reads of one instance that the server answers with an error (HTTP 500, garbage) before it is skipped.
INSTANCE_ATTEMPTS = 3
#: A DICOM UID (PS3.5 9.1): digits and dots, at most 64 characters. Anything else never goes into a URL.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX = 64


# -------------------------------------------------------------------------------------------- instance tags


@dataclass(frozen=True)
class Instance:
    """What a feed knows of one stored instance (each field None when the PACS did not say)."""

    study_uid: str | None = None
    series_uid: str | None = None
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None
    modality: str | None = None
    accession: str | None = None
    view_position: str | None = None
    study_date: str | None = None
    study_time: str | None = None


#: Instance field → (keyword in Orthanc's simplified tags, tag in DICOM JSON).
_TAGS: dict[str, tuple[str, str]] = {
    "study_uid": ("StudyInstanceUID", "0020000D"),
    "series_uid": ("SeriesInstanceUID", "0020000E"),
    "sop_instance_uid": ("SOPInstanceUID", "00080018"),
    "sop_class_uid": ("SOPClassUID", "00080016"),
    "modality": ("Modality", "00080060"),
    "accession": ("AccessionNumber", "00080050"),
    "view_position": ("ViewPosition", "00185101"),
    "study_date": ("StudyDate", "00080020"),
    "study_time": ("StudyTime", "00080030"),
}


def tag_text(value: object) -> str | None:
    """A tag's text, without DICOM's padding (spaces, NULs); None for absent, empty or non-text values."""
    if not isinstance(value, str):
        return None
    value = value.strip(" \x00")
    return value or None


def instance_from_simplified_tags(tags: Mapping[str, Any]) -> Instance:
    """From Orthanc's `GET /instances/{id}/simplified-tags` (keyword → string; sequences and bulk data ignored)."""
    return Instance(**{name: tag_text(tags.get(keyword)) for name, (keyword, _) in _TAGS.items()})


def instance_from_dicom_json(dataset: Mapping[str, Any]) -> Instance:
    """From one DICOM JSON dataset (a QIDO-RS match or WADO-RS metadata): the first value of each tag."""
    found: dict[str, str | None] = {}
    for name, (_, tag) in _TAGS.items():
        element = dataset.get(tag) or dataset.get(tag.lower())
        values = element.get("Value") if isinstance(element, Mapping) else None
        found[name] = tag_text(values[0]) if isinstance(values, list) and values else None
    return Instance(**found)


def prefer(primary: Instance, fallback: Instance) -> Instance:
    """`primary`, with the fields it lacks taken from `fallback`.

    The DICOMweb feed puts an instance's WADO-RS metadata (its whole header) first and its QIDO-RS match (which
    may carry only some attributes, or trimmed values) second."""
    return replace(
        primary, **{f.name: getattr(fallback, f.name) for f in fields(Instance) if getattr(primary, f.name) is None}
    )


@dataclass(frozen=True)
class ChestFilter:
    """Chest radiographs: a chest modality AND a chest storage class (`CXR_CHEST_MODALITIES`, `_SOP_CLASSES`)."""

    modalities: frozenset[str]
    sop_classes: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> ChestFilter:
        return cls(
            frozenset(m.strip().upper() for m in settings.chest_modalities),
            frozenset(s.strip() for s in settings.chest_sop_classes),
        )

    def modality_ok(self, instance: Instance) -> bool:
        return instance.modality is not None and instance.modality.upper() in self.modalities

    def sop_class_ok(self, instance: Instance) -> bool:
        return instance.sop_class_uid is not None and instance.sop_class_uid in self.sop_classes

    def admits(self, instance: Instance) -> bool:
        return self.modality_ok(instance) and self.sop_class_ok(instance)


# ------------------------------------------------------------------------------------------------ references


def valid_uid(text: object) -> TypeGuard[str]:
    """A DICOM UID (digits and dots, at most 64 characters); False for anything else, non-strings included."""
    return isinstance(text, str) and len(text) <= _UID_MAX and _UID.fullmatch(text) is not None


def service_root(url: str) -> str:
    """A service root as given, without trailing slashes (so `…/dicom-web` and `…/dicom-web/` are one source)."""
    return url.rstrip("/")


def event_id_for(dicomweb_root: str, sop_instance_uid: str) -> str:
    """The event id of one instance at one DICOMweb service: the same however often it is announced."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{service_root(dicomweb_root)}\n{sop_instance_uid}"))


def wado_rs_url(dicomweb_root: str, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    return f"{service_root(dicomweb_root)}/studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}"


def instance_url(dicomweb_root: str, instance: Instance) -> str | None:
    """The instance's WADO-RS URL; None unless its three UIDs are real UIDs (nothing else goes into a URL)."""
    uids = (instance.study_uid, instance.series_uid, instance.sop_instance_uid)
    if not all(valid_uid(uid) for uid in uids):
        return None
    study, series, sop = (str(uid) for uid in uids)
    return wado_rs_url(dicomweb_root, study, series, sop)


def instance_reference(instance: Instance, uri: str, event_id: str, *, sent_at: str | None = None) -> Reference:
    """A reference to `uri` carrying the instance's identifiers (whatever the feed: WADO-RS URL or stored file)."""
    return Reference(
        event_id=event_id,
        uri=uri,
        study_uid=instance.study_uid,
        series_uid=instance.series_uid,
        sop_instance_uid=instance.sop_instance_uid,
        accession=instance.accession,
        modality=instance.modality,
        view_position=instance.view_position,
        sent_at=sent_at or rfc3339(now_utc()),
    )


def reference_for(instance: Instance, dicomweb_root: str, *, sent_at: str | None = None) -> Reference | None:
    """The reference announcing `instance` by its WADO-RS URL; None when its UIDs cannot make one."""
    uri = instance_url(dicomweb_root, instance)
    if uri is None or instance.sop_instance_uid is None:
        return None
    return instance_reference(instance, uri, event_id_for(dicomweb_root, instance.sop_instance_uid), sent_at=sent_at)


@dataclass
class Tally:
    """What became of the instances a feed looked at: the counts its summary lines show (no patient data)."""

    published: int = 0
    not_chest: int = 0
    #: Deleted between the announcement and the read of its tags (404).
    gone: int = 0
    #: No usable UIDs (nothing to build a URL from), or the server failed on every read of it.
    unusable: int = 0

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def looked_at(self) -> int:
        return self.published + self.not_chest + self.gone + self.unusable

    def summary(self) -> str:
        return (
            f"published {self.published}, skipped {self.not_chest} not a chest X-ray, {self.gone} deleted before "
            f"they were read, {self.unusable} unreadable"
        )


def decide(instance: Instance, chest: ChestFilter, dicomweb_root: str, tally: Tally) -> Reference | None:
    """The reference to publish for `instance`, or None (counted in `tally` as skipped, either way)."""
    if not chest.admits(instance):
        tally.not_chest += 1
        return None
    ref = reference_for(instance, dicomweb_root)
    if ref is None:
        tally.unusable += 1
        return None
    tally.published += 1
    return ref


# ------------------------------------------------------------------------------------------------------ HTTP


class PacsError(RuntimeError):
    """The PACS refused us in a way waiting will not fix (credentials, a wrong URL): stop, loudly."""


class PacsUnavailable(Exception):
    """The PACS is away or overloaded (refused, reset, timed out, 429/5xx, a garbled answer): retry later.

    `answered` says the server did answer (an HTTP 500, an answer that is not JSON): for one instance, that
    can be the instance rather than the server, so reads of one instance give up after a few of those."""

    def __init__(self, reason: str, *, answered: bool = False) -> None:
        super().__init__(reason)
        self.answered = answered


class InstanceUnreadable(Exception):
    """The server keeps failing on one instance (HTTP 500, garbage) while it answers: skip it, count it."""


class InstanceGone(Exception):
    """404 for one instance: deleted between the announcement and our read."""


class Stopped(Exception):
    """The feed was asked to stop while it waited."""


class JsonGetter(Protocol):
    """What the feeds need of the HTTP client (tests give them a fake)."""

    def get_json(self, url: str, params: Mapping[str, Any] | None = None, *, accept: str = ...) -> Any: ...


def check_url(url: str) -> str:
    """The server URL without trailing slashes; `PacsError` for one the feed cannot ask (not http(s), no host) or
    must not (credentials, a query or fragment it would append paths to).

    The messages never quote the URL, nor any part of it: whatever it is, it may hold a password."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for a port that is not a number up to 65535
    except ValueError:
        raise PacsError("the server URL cannot be parsed") from None
    if "@" in parts.netloc:
        raise PacsError(
            "credentials in the URL are refused (they would end up in logs and process lists): set "
            "CXR_DICOMWEB_USERNAME and CXR_DICOMWEB_PASSWORD, or CXR_DICOMWEB_TOKEN"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise PacsError("the server URL must start with http:// or https:// and name a host (and a port above 0)")
    if parts.query or parts.fragment:
        raise PacsError("the server URL must not carry a query or a fragment")
    return service_root(url)


def warn_unless_allowed(dicomweb_root: str, allowed_hosts: Sequence[str]) -> bool:
    """Warn (once, at start) when the scorer would refuse the references we publish; True when it would not.

    Asks the scorer's own check (`streaming.fetch.dicomweb_target`) about a WADO-RS URL under `dicomweb_root`,
    so whatever it refuses (a host not allowed, an IP spelt non-canonically, a port with a leading zero...)
    is warned about, with its reason."""
    try:
        dicomweb_target(wado_rs_url(dicomweb_root, "1.2", "1.2.3", "1.2.3.4"), tuple(allowed_hosts))
    except FetchError as exc:
        log.warning(
            "the scorer will dead-letter the references to %s as %s (%s); if that host is not in "
            "CXR_DICOMWEB_ALLOWED_HOSTS where the scorer runs, add it there as the URL spells it",
            _host(dicomweb_root),
            exc.code,
            exc.reason,
        )
        return False
    return True


def _host(url: str) -> str:
    """`host[:port]` of a URL, for a log line: never its credentials."""
    try:
        return urlsplit(url).netloc.rpartition("@")[2] or "a URL without a host"
    except ValueError:
        return "a URL that cannot be parsed"


_request_deadline = threading.local()


class _DeadlineArmed:
    """Arms `streaming.fetch.Watchdog` on the socket of each request sent while a deadline is set on this
    thread (`PacsHttp.get_json` sets it): the watchdog shuts the socket down when the time is up, which wakes
    a read stuck on a server that drips its headers or body a byte at a time."""

    sock: Any

    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]
        end = getattr(_request_deadline, "end", None)
        if end is not None and self.sock is not None:
            _request_deadline.watchdog = Watchdog(self.sock, end)


class _HTTPConnection(_DeadlineArmed, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineArmed, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def http_session(settings: Settings) -> requests.Session:
    """A session carrying the configured credentials, and nothing from the environment (no proxies, no .netrc),
    whose requests `PacsHttp` can bound as a whole."""
    session = requests.Session()
    session.trust_env = False
    for scheme in ("http://", "https://"):
        session.mount(scheme, _DeadlineAdapter())
    authorization = settings.dicomweb_authorization()
    if authorization is not None:
        session.headers["Authorization"] = authorization
    return session


#: The most one JSON answer may hold (a page of changes or of QIDO-RS matches is a few hundred kB at most).
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class PacsHttp:
    """GETs of JSON with a timeout, no redirects, and failures sorted into retry / skip / stop.

    `timeout_s` bounds the whole request, body included: `requests`' own timeout bounds each read only, so a
    server dripping a byte at a time would otherwise hold the feed forever; a session from `http_session`
    arms a watchdog for that. Answers are capped in size too."""

    def __init__(self, session: requests.Session, timeout_s: float, max_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.session = session
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    def get_json(self, url: str, params: Mapping[str, Any] | None = None, *, accept: str = "application/json") -> Any:
        """The decoded JSON body; None for 204 (a QIDO-RS search without matches)."""
        _request_deadline.end = time.monotonic() + self.timeout_s
        try:
            return self._get_json(url, params, accept)
        finally:
            watchdog = getattr(_request_deadline, "watchdog", None)
            _request_deadline.end = _request_deadline.watchdog = None
            if watchdog is not None:
                watchdog.close()
                if watchdog.fired.is_set():
                    raise PacsUnavailable(f"the answer took longer than {self.timeout_s:g} s") from None

    def _get_json(self, url: str, params: Mapping[str, Any] | None, accept: str) -> Any:
        try:
            response = self.session.get(
                url,
                params=params,
                headers={"Accept": accept},
                timeout=self.timeout_s,
                allow_redirects=False,
                stream=True,
            )
            with response:
                self._check_status(response)
                if response.status_code == 204:
                    return None
                body = self._read(response)
        except requests.Timeout:
            raise PacsUnavailable(f"no answer within {self.timeout_s:g} s") from None
        except requests.RequestException as exc:  # refused, reset, DNS: its text quotes the URL, so not kept
            raise PacsUnavailable(type(exc).__name__) from None
        try:
            return json.loads(body)
        except ValueError:
            raise PacsUnavailable("an answer that is not JSON", answered=True) from None

    def _read(self, response: requests.Response) -> bytes:
        """The body, within the size cap."""
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=64 * 1024):
            size += len(chunk)
            if size > self.max_bytes:
                raise PacsUnavailable(f"an answer larger than {self.max_bytes} bytes", answered=True)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _check_status(response: requests.Response) -> None:
        status = response.status_code
        if status == 404:
            raise InstanceGone()
        if status in (401, 403):
            raise PacsError(
                f"the server refused our credentials (HTTP {status}): check CXR_DICOMWEB_USERNAME and "
                "CXR_DICOMWEB_PASSWORD, or CXR_DICOMWEB_TOKEN"
            )
        if status == 429 or status >= 500:
            raise PacsUnavailable(f"HTTP {status}", answered=status == 500)
        if 300 <= status < 400:
            raise PacsError(f"the server redirects (HTTP {status}); give the URL it redirects to")
        if status not in (200, 204):
            raise PacsError(f"the server answered HTTP {status}")


# --------------------------------------------------------------------------------------------- waiting, retry


def pause(seconds: float, stop: Callable[[], bool], step_s: float = 0.1) -> bool:
    """Sleep up to `seconds`, waking promptly when `stop()` turns true; True if it did."""
    end = time.monotonic() + seconds
    while not stop():
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(step_s, left))
    return True


def retrying(
    call: Callable[[], T],
    *,
    stop: Callable[[], bool],
    backoff: Backoff,
    what: str,
    give_up_after: int | None = None,
) -> T:
    """`call()`, retried while the PACS is unavailable; `Stopped` if asked to stop. Other errors pass through.

    With `give_up_after`, that many failures in a row of a server that did answer (see `PacsUnavailable`)
    raise `InstanceUnreadable`: one broken instance must not hold up the feed. A server that is away is
    waited for however long it takes."""
    answered = 0
    while True:
        if stop():
            raise Stopped()
        try:
            result = call()
        except PacsUnavailable as exc:
            answered = answered + 1 if exc.answered else 0
            if give_up_after is not None and answered >= give_up_after:
                backoff.reset()
                raise InstanceUnreadable(str(exc)) from None
            delay = backoff.next_delay()
            log.warning("%s does not answer (%s); retrying in %.1f s", what, exc, delay)
            if pause(delay, stop):
                raise Stopped() from None
            continue
        if backoff.failing:
            log.info("%s answers again", what)
            backoff.reset()
        return result


# ---------------------------------------------------------------------------------------------------- cursor


@dataclass(frozen=True)
class CursorStore:
    """One feed's cursor for one source: `state_dir/<feed>/<hash of source>.json`, as `{schema, source, ...}`.

    Strict: a file with another schema or another source is refused with `StateError` (guessing would skip
    or re-announce images)."""

    path: Path
    schema: str
    source: str

    @classmethod
    def for_source(cls, state_dir: Path, feed: str, source: str, schema: str) -> CursorStore:
        return cls(state_file(state_dir, feed, source), schema, source)

    def load(self) -> dict[str, Any] | None:
        """The cursor's own fields; None when there is none yet."""
        try:
            data = read_json(self.path)
        except StateError as exc:
            raise StateError(f"{exc}. {self._way_out()}") from exc
        if data is None:
            return None
        if data.get("schema") != self.schema:
            raise StateError(
                f"the cursor {self.path} is not a {self.schema} cursor (schema {data.get('schema')!r}). "
                f"{self._way_out()}"
            )
        if data.get("source") != self.source:
            raise StateError(f"the cursor {self.path} belongs to {data.get('source')!r}, not to {self.source}")
        return {k: v for k, v in data.items() if k not in ("schema", "source")}

    def save(self, body: Mapping[str, Any]) -> None:
        data = {"schema": self.schema, "source": self.source, **body}
        write_atomic(self.path, (json.dumps(data, ensure_ascii=False, indent=0, sort_keys=True) + "\n").encode())

    def corrupt(self, what: str) -> StateError:
        return StateError(f"the cursor {self.path} is corrupt: {what}. {self._way_out()}")

    def _way_out(self) -> str:
        return (
            "Not guessing which images were announced: repair or remove it "
            "(without it the feed starts over as a first run, as --from-start or --from-now says)"
        )


class Skipped(enum.Enum):
    """What `PacsFeed.get_instance` returns for an instance it skipped (and counted)."""

    SKIPPED = "skipped"


SKIPPED = Skipped.SKIPPED


class PacsFeed(Generic[C]):
    """The loop both PACS feeds share: start where the cursor (or, on a first run, the flag) says, then step
    until `stop()`, sleeping `poll_interval_s` whenever the server is caught up and retrying with backoff while
    it is away. A feed says its name and cursor schema, how to read its cursor, where a first run begins, and
    what one step is. URLs reach it checked (`check_url`, done once by `follow_feed`)."""

    #: The feed's folder under `CXR_STATE_DIR` ("orthanc", "dicomweb").
    NAME: ClassVar[str]
    #: The `schema` its cursor files carry.
    CURSOR_SCHEMA: ClassVar[str]

    def __init__(
        self,
        http: JsonGetter,
        store: CursorStore,
        chest: ChestFilter,
        server: str,
        dicomweb_root: str,
        *,
        poll_interval_s: float,
        stop: Callable[[], bool],
        backoff: Backoff | None,
    ) -> None:
        self.http = http
        self.store = store
        self.chest = chest
        #: The server as log lines name it ("Orthanc at http://…"): an address, never patient data.
        self.server = server
        #: The DICOMweb service root the references' WADO-RS URLs start with.
        self.dicomweb_root = service_root(dicomweb_root)
        self.poll_interval_s = poll_interval_s
        self.stop = stop
        self.backoff = backoff or Backoff(first_s=poll_interval_s)
        self.tally = Tally()
        self.cursor: C | None = None
        #: When the server last answered (`time.monotonic()`), for the feed's `/readyz`; None until it has.
        self.answered_at: float | None = None

    # What each feed says.

    def parse_cursor(self, body: dict[str, Any]) -> C:
        """The cursor from its saved fields; `StateError` (via `store.corrupt`) for anything else."""
        raise NotImplementedError

    def position(self) -> str:
        """Where the cursor stands, for the log ("after change 12"): no patient data."""
        raise NotImplementedError

    def first_run(self, begin: str) -> C:
        """The cursor of a first run, from the start ('start') or from what is there now ('now')."""
        raise NotImplementedError

    def step(self, publisher: Publisher) -> bool:
        """Handle what is new (one page, one poll); True when the server is caught up."""
        raise NotImplementedError

    # What they share.

    def load(self) -> C | None:
        """The saved cursor, None on a first run; `StateError` when it is corrupt. Read before anything is asked."""
        body = self.store.load()
        self.cursor = None if body is None else self.parse_cursor(body)
        return self.cursor

    def begin(self, begin: str) -> C:
        """Where this run starts: an existing cursor always wins; a first run begins as `begin` says."""
        if begin not in ("start", "now"):
            raise ValueError(f"begin must be 'start' or 'now', not {begin!r}")
        if self.cursor is not None:
            log.info(
                "resuming %s (the cursor %s); --from-start/--from-now only choose where a first run begins, so the "
                "flag is ignored",
                self.position(),
                self.store.path,
            )
            return self.cursor
        if begin == "start":
            log.info("first run: announcing every chest X-ray %s holds (--from-start)", self.server)
        self.cursor = self.first_run(begin)
        return self.cursor

    def run(self, publisher: Publisher) -> int:
        """Follow the server from where `load()` and `begin()` put the cursor until `stop()`; returns how many
        references Kafka acknowledged."""
        if self.cursor is None:
            raise RuntimeError("load() and begin() the feed before it runs")
        try:
            while not self.stop():
                if self.step(publisher) and pause(self.poll_interval_s, self.stop):
                    break
        except Stopped:
            pass
        log.info("stopped: %s", self.tally.summary())
        return self.tally.published

    def get(self, call: Callable[[], T]) -> T:
        """`call()` (a request to the server), retried while the server is away; `Stopped` on request."""
        result = retrying(call, stop=self.stop, backoff=self.backoff, what=self.server)
        self.answered_at = time.monotonic()
        return result

    def get_instance(self, call: Callable[[], T], tally: Tally) -> T | Skipped:
        """`call()` for one instance: `SKIPPED`, counted in `tally`, when it is gone (404) or the server keeps
        failing on it (`INSTANCE_ATTEMPTS` answers that are errors) while it answers other requests."""
        result: T | Skipped = SKIPPED
        try:
            result = retrying(
                call, stop=self.stop, backoff=self.backoff, what=self.server, give_up_after=INSTANCE_ATTEMPTS
            )
        except InstanceGone:
            tally.gone += 1
        except InstanceUnreadable as exc:
            log.warning("%s failed %d times on one instance (%s); skipping it", self.server, INSTANCE_ATTEMPTS, exc)
            tally.unusable += 1
        self.answered_at = time.monotonic()  # a 404 or an error about one instance is an answer too
        return result


def cursor_store(settings: Settings, feed: type[PacsFeed[Any]], url: str) -> CursorStore:
    """The cursor store of `feed` for the server at `url` (checked here) under `CXR_STATE_DIR`; its `source` is
    the checked URL."""
    return CursorStore.for_source(settings.state_dir, feed.NAME, check_url(url), feed.CURSOR_SCHEMA)


def follow_feed(
    settings: Settings,
    url: str,
    begin: str,
    stop: Callable[[], bool],
    feed: type[PacsFeed[Any]],
    watch: Callable[[PacsFeed[Any]], None] | None = None,
    **options: Any,
) -> int:
    """Run a feed as `cxr produce` does: cursor first, "now" fixed before Kafka is reached, then publish.

    `feed` is constructed with the HTTP client made here from the settings (credentials, timeout), the checked
    URL, its cursor store, the chest filter, the poll interval and `stop`; `options` are its own (e.g. the
    QIDO-RS overlap). `watch` is handed the feed once it exists (its `/readyz` and `/metrics`, `producers.health`)."""
    store = cursor_store(settings, feed, url)  # the one check of the URL, before anything is asked
    make: Callable[..., PacsFeed[Any]] = feed  # each feed's constructor takes these, and its own options
    with http_session(settings) as session:
        running = make(
            PacsHttp(session, settings.feed_request_timeout_s),
            store.source,
            store,
            ChestFilter.from_settings(settings),
            poll_interval_s=settings.feed_poll_interval_s,
            stop=stop,
            **options,
        )
        if watch is not None:
            watch(running)
        running.load()  # a corrupt cursor stops us before anything is asked of anyone
        warn_unless_allowed(running.dicomweb_root, settings.dicomweb_allowed_hosts)
        log.info("following %s; references to %s", running.server, settings.input_topic)
        try:
            running.begin(begin)  # "now" is when the command started, not when Kafka first answered
            with ReferencePublisher.for_settings(settings) as publisher:
                return running.run(publisher)
        except Stopped:
            return 0
        except KeyboardInterrupt:
            log.info("stopped: %s", running.tally.summary())
            return running.tally.published


def publish_then_commit(publisher: Publisher, refs: Sequence[Reference], commit: Callable[[], None]) -> int:
    """Send `refs`, wait until Kafka acknowledged every one, and only then `commit()` (move the cursor).

    A failed flush raises before the commit: the cursor stays put, and the next run publishes those
    references again under the same event ids (at-least-once, never lost)."""
    for ref in refs:
        publisher.send(ref)
    if refs:
        publisher.flush()
    commit()
    return len(refs)
