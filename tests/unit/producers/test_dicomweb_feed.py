"""The QIDO-RS poller against a fake DICOMweb server (no server, no Kafka): dates and windows, the bounded
cursor, de-duplication on SOP instance UID, where a first run begins, what it can miss by design, and a cursor
that moves only after Kafka acknowledged."""

from __future__ import annotations

import json
import logging
import re
import time as clock_time
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from fake_publisher import FakePublisher
from producers import pacs
from producers.dicomweb import (
    CURSOR_SCHEMA,
    DicomwebCursor,
    DicomwebFeed,
    day_key,
    parse_da,
    parse_matches,
    parse_tm,
    qido_params,
    store_for,
    study_moment,
    window_start,
)
from producers.pacs import (
    Backoff,
    ChestFilter,
    CursorStore,
    Instance,
    InstanceGone,
    PacsError,
    PacsUnavailable,
    event_id_for,
)
from producers.publish import ReferencePublisher
from producers.state import StateError
from streaming.settings import Settings

ROOT = "http://pacs.example:8080/dicom-web"
CR, DX, CT = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.2"
CHEST = ChestFilter(frozenset({"CR", "DX"}), frozenset({CR, DX}))
DAY = 24 * 3600.0
NOW = datetime(2024, 1, 2, 12, 0, 0)
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-0042-SECRET"


def element(vr: str, value: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value is not None else {"vr": vr}


class FakeDicomweb:
    """QIDO-RS over instances (Modality exact, StudyDate `YYYYMMDD-` ranges, limit/offset) and WADO-RS metadata."""

    def __init__(self, *, undated_match_ranges: bool = False) -> None:
        self.datasets: dict[str, dict[str, Any]] = {}
        self.deleted: set[str] = set()
        self.down = 0
        self.undated_match_ranges = undated_match_ranges
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def add(
        self, i: int, *, modality: str = "DX", sop_class: str = DX, day: str | None = "20240102", at: str = "101500"
    ) -> str:
        sop = f"1.2.826.0.2.{i}.3"
        self.datasets[sop] = {
            "0020000D": element("UI", f"1.2.826.0.2.{i}.1"),
            "0020000E": element("UI", f"1.2.826.0.2.{i}.2"),
            "00080018": element("UI", sop),
            "00080016": element("UI", sop_class),
            "00080060": element("CS", modality),
            "00080050": element("SH", f"ACC{i:04d}"),
            "00080020": element("DA", day),
            "00080030": element("TM", at),
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": PATIENT_NAME}]},
            "00100020": element("LO", PATIENT_ID),
            "00185101": element("CS", "AP"),  # metadata only: not a default QIDO-RS return key
        }
        return sop

    def _matches(self, dataset: dict[str, Any], params: dict[str, Any]) -> bool:
        if dataset["00080060"]["Value"][0] != params["Modality"]:
            return False
        wanted = params.get("StudyDate")
        if wanted is None:
            return True
        day = dataset["00080020"].get("Value", [None])[0]
        if day is None:
            return self.undated_match_ranges
        return bool(day >= wanted.rstrip("-"))

    def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
        params = dict(params or {})
        self.requests.append((url, params))
        assert accept == "application/dicom+json"
        if self.down > 0:
            self.down -= 1
            raise PacsUnavailable("HTTP 503")
        if url == f"{ROOT}/instances":
            found = [d for sop, d in self.datasets.items() if sop not in self.deleted and self._matches(d, params)]
            page = found[int(params["offset"]) : int(params["offset"]) + int(params["limit"])]
            return [{k: v for k, v in d.items() if k != "00185101"} for d in page] or None  # 204 when none
        match = re.fullmatch(re.escape(ROOT) + r"/studies/([0-9.]+)/series/([0-9.]+)/instances/([0-9.]+)/metadata", url)
        assert match, url
        sop = match.group(3)
        if sop in self.deleted or sop not in self.datasets:
            raise InstanceGone()
        return [self.datasets[sop]]

    def metadata_requests(self) -> int:
        return sum(1 for url, _ in self.requests if url.endswith("/metadata"))

    def searches(self) -> list[dict[str, Any]]:
        return [params for url, params in self.requests if url.endswith("/instances")]


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_feed(server: FakeDicomweb, state: Path, clock: Clock | None = None, **options: Any) -> DicomwebFeed:
    store = CursorStore.for_source(state, "dicomweb", ROOT, CURSOR_SCHEMA)
    options.setdefault("overlap_s", DAY)
    options.setdefault("poll_interval_s", 0.01)
    options.setdefault("backoff", Backoff(first_s=0.01, max_s=0.02))
    return DicomwebFeed(server, ROOT, store, CHEST, clock=clock or Clock(), **options)


def start(feed: DicomwebFeed, publisher: FakePublisher, begin: str = "now") -> DicomwebFeed:
    feed.load()
    feed.begin(begin)
    return feed


def sops(publisher: FakePublisher) -> list[str | None]:
    return sorted(ref.sop_instance_uid for ref in publisher.sent if ref.sop_instance_uid)


def saved(feed: DicomwebFeed) -> dict[str, Any]:
    return dict(json.loads(feed.store.path.read_text()))


# ------------------------------------------------------------------------------------------ dates, windows


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20240102", date(2024, 1, 2)), ("2024.01.02", date(2024, 1, 2)), (" 20240102 ", date(2024, 1, 2))]
    + [(bad, None) for bad in (None, "", "2024010", "20241302", "2024-01-02x", "abcdefgh")],
)
def test_study_dates(text: str | None, expected: date | None) -> None:
    assert parse_da(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("101500", time(10, 15)),
        ("101500.123456", time(10, 15)),
        ("1015", time(10, 15)),
        ("10", time(10)),
        ("10:15:00", time(10, 15)),
        ("235960", time(23, 59, 59)),  # a leap second
    ]
    + [(bad, None) for bad in (None, "", "1", "246000", "10a500", "106000")],
)
def test_study_times(text: str | None, expected: time | None) -> None:
    assert parse_tm(text) == expected


def test_the_study_moment_and_its_day() -> None:
    assert study_moment(Instance(study_date="20240102", study_time="101500")) == datetime(2024, 1, 2, 10, 15)
    assert study_moment(Instance(study_date="20240102", study_time="garbage")) == datetime(2024, 1, 2)
    assert study_moment(Instance(study_time="101500")) is None
    assert day_key(Instance(study_date="2024.01.02")) == "20240102" and day_key(Instance()) == ""


def test_the_window_starts_at_midnight_of_the_day_an_overlap_before_the_high_water_mark() -> None:
    assert window_start(None, DAY) is None  # no mark yet: every date
    assert window_start(datetime(2024, 1, 2, 10, 15), DAY) == date(2024, 1, 1)
    assert window_start(datetime(2024, 1, 2, 0, 30), 3600) == date(2024, 1, 1)
    assert window_start(datetime(2024, 1, 2, 10, 15), 3600) == date(2024, 1, 2)


def test_search_parameters() -> None:
    assert qido_params("DX", date(2024, 1, 1), 500, 1000) == {
        "Modality": "DX",
        "StudyDate": "20240101-",
        "limit": 500,
        "offset": 1000,
    }
    assert "StudyDate" not in qido_params("CR", None, 500, 0)


def test_search_answers() -> None:
    assert parse_matches(None) == []
    assert parse_matches([{"a": 1}, "junk", 3]) == [{"a": 1}]
    for body in ({"error": "x"}, "text"):
        with pytest.raises(PacsUnavailable):
            parse_matches(body)


# ---------------------------------------------------------------------------------------------------- cursor


def test_the_cursor_round_trips(tmp_path: Path) -> None:
    store = CursorStore.for_source(tmp_path, "dicomweb", ROOT, CURSOR_SCHEMA)
    cursor = DicomwebCursor(datetime(2024, 1, 2, 10, 15, 0), {"1.2.3": "20240102", "1.2.4": ""})
    store.save(cursor.to_body())
    assert DicomwebCursor.from_body(store, store.load() or {}) == cursor
    assert DicomwebCursor.from_body(store, DicomwebCursor().to_body()) == DicomwebCursor()


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"high_water": None},
        {"high_water": None, "seen": {}, "extra": 1},
        {"high_water": "yesterday", "seen": {}},
        {"high_water": 3, "seen": {}},
        {"high_water": None, "seen": []},
        {"high_water": None, "seen": {"1.2/3": "20240102"}},
        {"high_water": None, "seen": {"1.2.3": "2024-01-02"}},
        {"high_water": None, "seen": {"1.2.3": None}},
    ],
)
def test_a_cursor_that_is_not_exactly_ours_is_refused(tmp_path: Path, body: dict[str, Any]) -> None:
    store = CursorStore.for_source(tmp_path, "dicomweb", ROOT, CURSOR_SCHEMA)
    with pytest.raises(StateError, match="corrupt"):
        DicomwebCursor.from_body(store, body)


def test_the_high_water_mark_only_rises_and_never_past_the_clock() -> None:
    cursor = DicomwebCursor()
    assert not cursor.advance([], NOW)
    assert cursor.advance([datetime(2024, 1, 1, 9), datetime(2024, 1, 2, 8)], NOW)
    assert cursor.high_water == datetime(2024, 1, 2, 8)
    assert not cursor.advance([datetime(2023, 6, 1)], NOW)
    assert cursor.advance([datetime(2031, 1, 1)], NOW)  # a modality whose clock is years ahead
    assert cursor.high_water == NOW


def test_forgetting_keeps_what_a_search_can_still_return() -> None:
    seen = {"old": "20231230", "returned-old": "20231230", "undated": "", "in": "20240101", "future": "20310101"}
    cursor = DicomwebCursor(NOW, dict(seen))
    assert cursor.forget(None, set()) == 0  # every date is searched: nothing can be dropped
    assert cursor.forget(date(2024, 1, 1), {"returned-old"}) == 2
    assert set(cursor.seen) == {"returned-old", "in", "future"}


def test_the_cursor_file_is_per_service(tmp_path: Path) -> None:
    settings = Settings.load(state_dir=tmp_path)
    assert store_for(settings, ROOT + "/").path == store_for(settings, ROOT).path
    assert store_for(settings, ROOT).path.parent == tmp_path / "dicomweb"


# ------------------------------------------------------------------------------------------------ first runs


def test_from_now_records_what_is_there_and_announces_only_what_comes(tmp_path: Path) -> None:
    server = FakeDicomweb()
    before = [server.add(i) for i in range(3)]
    publisher = FakePublisher()
    feed = start(make_feed(server, tmp_path), publisher, "now")
    assert publisher.sent == [] and server.metadata_requests() == 0
    assert set(saved(feed)["seen"]) == set(before)
    assert saved(feed)["high_water"] == "2024-01-02T12:00:00"
    assert all(s.get("StudyDate") == "20240101-" for s in server.searches())  # the window, not the archive

    later = server.add(7, modality="CR", sop_class=CR)
    feed.poll(publisher)
    assert sops(publisher) == [later]


def test_from_start_announces_everything_once_and_skips_what_is_not_a_chest_x_ray(tmp_path: Path) -> None:
    server = FakeDicomweb()
    dx = server.add(1)
    cr = server.add(2, modality="CR", sop_class=CR, day="20200315")
    undated = server.add(3, day=None)
    server.add(4, modality="DX", sop_class=CT)  # a chest modality, another storage class
    server.add(5, modality="CT", sop_class=CT)  # never even searched for
    publisher = FakePublisher()
    feed = start(make_feed(server, tmp_path), publisher, "start")
    tally = feed.poll(publisher)

    assert sops(publisher) == sorted([dx, cr, undated])
    assert (tally.published, tally.not_chest, tally.gone, tally.unusable) == (3, 1, 0, 0)
    assert server.metadata_requests() == 3  # the skipped one was skipped on its search match alone
    assert {s["Modality"] for s in server.searches()} == {"CR", "DX"}
    assert all("StudyDate" not in s for s in server.searches())

    ref = next(r for r in publisher.sent if r.sop_instance_uid == dx)
    assert ref.uri == f"{ROOT}/studies/1.2.826.0.2.1.1/series/1.2.826.0.2.1.2/instances/{dx}"
    assert ref.event_id == event_id_for(ROOT, dx)
    assert (ref.accession, ref.modality, ref.view_position) == ("ACC0001", "DX", "AP")  # the view from metadata

    server.requests.clear()
    assert feed.poll(publisher).published == 0  # de-duplicated on SOP instance UID
    assert server.metadata_requests() == 0
    assert all(s["StudyDate"] == "20240101-" for s in server.searches())  # the mark exists now: a window


def test_an_existing_cursor_wins_over_either_flag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = FakeDicomweb()
    server.add(1)
    start(make_feed(server, tmp_path), FakePublisher(), "now")
    for begin in ("start", "now"):
        publisher = FakePublisher()
        with caplog.at_level(logging.INFO):
            feed = start(make_feed(server, tmp_path), publisher, begin)
            feed.poll(publisher)
        assert "flag is ignored" in caplog.text and publisher.sent == []


def test_a_corrupt_cursor_stops_the_feed_before_anything_is_asked(tmp_path: Path) -> None:
    server = FakeDicomweb()
    feed = make_feed(server, tmp_path)
    feed.store.path.parent.mkdir(parents=True)
    feed.store.path.write_text(json.dumps({"schema": CURSOR_SCHEMA, "source": ROOT, "high_water": None}))
    with pytest.raises(StateError, match="corrupt"):
        feed.load()
    assert server.requests == []


# ------------------------------------------------------------------------------------ the window, bounded


def test_late_arrivals_inside_the_window_are_caught_and_older_ones_missed_by_design(tmp_path: Path) -> None:
    server = FakeDicomweb()
    publisher = FakePublisher()
    feed = start(make_feed(server, tmp_path), publisher, "now")
    inside = server.add(1, day="20240101", at="0800")  # a day late: inside the 24 h overlap
    before = server.add(2, day="20231231", at="2359")  # a prior, a migration, a clock far behind
    feed.poll(publisher)
    assert sops(publisher) == [inside]
    assert before not in feed.cursor.seen  # type: ignore[union-attr]


def test_a_modality_clock_years_ahead_does_not_drag_the_window_away(tmp_path: Path) -> None:
    server = FakeDicomweb()
    publisher = FakePublisher()
    clock = Clock()
    feed = start(make_feed(server, tmp_path, clock), publisher, "now")
    future = server.add(1, day="20310101")
    feed.poll(publisher)
    today = server.add(2, day="20240102", at="115900")
    feed.poll(publisher)
    assert sops(publisher) == sorted([future, today])
    assert saved(feed)["high_water"] == "2024-01-02T12:00:00"
    feed.poll(publisher)
    assert len(publisher.sent) == 2  # the future one is still returned, and still remembered


def test_the_cursor_stays_bounded_as_days_pass_and_nothing_comes_twice(tmp_path: Path) -> None:
    server = FakeDicomweb()
    publisher = FakePublisher()
    clock = Clock()
    feed = start(make_feed(server, tmp_path, clock), publisher, "start")
    for n in range(10):  # ten days, two instances a day
        day = NOW.date() + timedelta(days=n)
        clock.now = datetime.combine(day, time(18))
        server.add(2 * n, day=f"{day:%Y%m%d}", at="0900")
        server.add(2 * n + 1, day=f"{day:%Y%m%d}", at="1700")
        feed.poll(publisher)
        feed.poll(publisher)
    assert len(publisher.sent) == 20 and len({r.event_id for r in publisher.sent}) == 20
    remembered = saved(feed)["seen"]
    assert len(remembered) == 4  # the last two days: the window, not the history
    assert min(remembered.values()) >= f"{NOW.date() + timedelta(days=8):%Y%m%d}"


def test_undated_instances_a_server_returns_anyway_are_announced_once(tmp_path: Path) -> None:
    server = FakeDicomweb(undated_match_ranges=True)
    publisher = FakePublisher()
    feed = start(make_feed(server, tmp_path), publisher, "now")
    undated = server.add(1, day=None)
    for _ in range(3):
        feed.poll(publisher)
    assert sops(publisher) == [undated]
    assert undated in saved(feed)["seen"]  # before the window, but still returned: remembered


def test_a_server_that_ignores_paging_is_read_once_per_poll(tmp_path: Path) -> None:
    class Unpaged(FakeDicomweb):
        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            if url.endswith("/instances") and params:
                params = {**params, "limit": 10**6, "offset": 0}
            return super().get_json(url, params, accept=accept)

    for count in (3, 4):  # exactly a page, and more than a page
        server = Unpaged()
        added = [server.add(i) for i in range(count)]
        publisher = FakePublisher()
        feed = start(make_feed(server, tmp_path / str(count), page_size=3), publisher, "start")
        feed.poll(publisher)
        feed.poll(publisher)
        assert sops(publisher) == sorted(added)
        assert len(server.searches()) <= 2 * 2 * 2  # two polls, two modalities, at most two pages each


def test_a_server_that_ignores_paging_and_returns_no_usable_uid_ends_the_poll(tmp_path: Path) -> None:
    """Full pages, whatever the offset, of matches without a SOP instance UID or with an invalid one: they are
    nothing new, so paging stops (it used to count them as new and page for ever)."""

    class Junk(FakeDicomweb):
        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            if url.endswith("/instances") and params:
                self.requests.append((url, dict(params)))
                assert len(self.searches()) <= 10, "paging does not end"
                missing = {"00080060": element("CS", params["Modality"])}
                invalid = {**missing, "00080018": element("UI", "not-a-uid")}
                return [missing, invalid, invalid]
            return super().get_json(url, params, accept=accept)

    server = Junk()
    feed = start(make_feed(server, tmp_path, page_size=3), FakePublisher(), "start")
    publisher = FakePublisher()
    tally = feed.poll(publisher)
    assert publisher.sent == [] and tally.unusable == 6
    assert len(server.searches()) == 2  # one page per modality


def test_the_cursor_file_is_written_once_per_modality_not_once_per_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write holds every UID remembered: one per page made a first run over a big archive quadratic."""
    server = FakeDicomweb()
    added = [server.add(i) for i in range(7)] + [server.add(10 + i, modality="CR", sop_class=CR) for i in range(4)]
    writes: list[dict[str, Any]] = []
    original = CursorStore.save

    def counting(store: CursorStore, body: dict[str, Any]) -> None:
        writes.append(dict(body["seen"]))
        original(store, body)

    monkeypatch.setattr(CursorStore, "save", counting)
    publisher = FakePublisher()
    feed = start(make_feed(server, tmp_path, page_size=3), publisher, "start")
    feed.poll(publisher)
    assert sops(publisher) == sorted(added) and publisher.flushes == 2 + 3  # still acknowledged page by page
    assert len(writes) <= 2 + 1  # CR, DX, and the mark at the end of the poll
    assert set(saved(feed)["seen"]) == set(added)
    writes.clear()
    feed.poll(publisher)
    assert writes == []  # nothing new: nothing written


def test_the_metadata_wins_over_the_search_match_but_not_on_the_uids(tmp_path: Path) -> None:
    class Trimming(FakeDicomweb):
        """Search matches with a trimmed accession and another modality's spelling; metadata names other UIDs."""

        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            answer = super().get_json(url, params, accept=accept)
            if url.endswith("/instances") and answer:
                return [{**d, "00080050": element("SH", "ACC"), "00080060": element("CS", "dx")} for d in answer]
            if url.endswith("/metadata"):
                return [{**answer[0], "0020000E": element("UI", "9.9.9")}]
            return answer

    server = Trimming()
    sop = server.add(1)
    publisher = FakePublisher()
    start(make_feed(server, tmp_path), publisher, "start").poll(publisher)
    (ref,) = publisher.sent
    assert (ref.accession, ref.modality, ref.view_position) == ("ACC0001", "DX", "AP")
    assert ref.uri == f"{ROOT}/studies/1.2.826.0.2.1.1/series/1.2.826.0.2.1.2/instances/{sop}"
    assert ref.series_uid == "1.2.826.0.2.1.2"


def test_every_page_is_read(tmp_path: Path) -> None:
    server = FakeDicomweb()
    added = [server.add(i) for i in range(7)]
    publisher = FakePublisher()
    feed = start(make_feed(server, tmp_path, page_size=3), publisher, "start")
    feed.poll(publisher)
    assert sops(publisher) == sorted(added)
    assert [s["offset"] for s in server.searches() if s["Modality"] == "DX"] == [0, 3, 6]


# ------------------------------------------------------------------------------------------ commit after ack


def test_nothing_is_recorded_until_kafka_acknowledged_and_a_rerun_repeats_the_same_event_ids(
    tmp_path: Path,
) -> None:
    server = FakeDicomweb()
    start(make_feed(server, tmp_path), FakePublisher(), "now")
    cursor_before = saved(make_feed(server, tmp_path))
    for i in range(3):
        server.add(i)
    failing = FakePublisher(fail_flush=1)
    feed = start(make_feed(server, tmp_path), failing)
    with pytest.raises(RuntimeError, match="did not acknowledge"):
        feed.poll(failing)
    assert saved(feed) == cursor_before and len(failing.sent) == 3

    retry = FakePublisher()
    feed = start(make_feed(server, tmp_path), retry)
    feed.poll(retry)
    assert sorted(r.event_id for r in retry.sent) == sorted(r.event_id for r in failing.sent)


def test_a_poll_cut_short_keeps_the_mark_so_the_rest_is_searched_again(tmp_path: Path) -> None:
    server = FakeDicomweb()
    clock = Clock()
    start(make_feed(server, tmp_path, clock), FakePublisher(), "now")
    first = [server.add(i, day="20240102", at="1100") for i in range(2)]
    later = server.add(9, day="20240101", at="0100")  # within the window only as long as the mark stays
    clock.now = datetime(2024, 1, 4, 12)
    newer = server.add(8, day="20240104", at="1000")
    failing = FakePublisher(fail_flush=2)  # the second page of DX matches is never acknowledged
    feed = start(make_feed(server, tmp_path, clock, page_size=2), failing)
    with pytest.raises(RuntimeError):
        feed.poll(failing)
    state = saved(feed)
    assert state["high_water"] == "2024-01-02T12:00:00"  # the poll did not finish: the mark did not move
    assert set(first) <= set(state["seen"]) and later not in state["seen"]

    retry = FakePublisher()
    feed = start(make_feed(server, tmp_path, clock, page_size=2), retry)
    feed.poll(retry)
    assert sops(retry) == sorted([later, newer])
    assert saved(feed)["high_water"] == "2024-01-04T10:00:00"


# ---------------------------------------------------------------------------------------- outages, deletions


def test_a_server_away_is_waited_for_and_an_instance_deleted_meanwhile_is_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = FakeDicomweb()
    server.down = 2
    publisher = FakePublisher()
    with caplog.at_level(logging.INFO):
        feed = start(make_feed(server, tmp_path), publisher, "now")
        kept, gone = server.add(1), server.add(2)

        original = server.get_json

        def delete_before_metadata(url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            if url.endswith("/metadata"):
                server.deleted.add(gone)
            return original(url, params, accept=accept)

        server.get_json = delete_before_metadata  # type: ignore[method-assign]
        tally = feed.poll(publisher)
        server.down = 1
        feed.poll(publisher)
    assert sops(publisher) == [kept]
    assert (tally.published, tally.gone) == (1, 1)
    assert gone in saved(feed)["seen"]  # handled: never asked for again
    assert caplog.text.count("does not answer") == 3 and "answers again" in caplog.text
    for secret in (PATIENT_NAME, PATIENT_ID, "ACC000", "1.2.826.0.2", "2024", "20240102"):
        assert secret not in caplog.text


def test_run_polls_until_stopped(tmp_path: Path) -> None:
    server = FakeDicomweb()
    server.add(1)
    polls = 0
    original = server.get_json

    def counting(url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
        nonlocal polls
        if url.endswith("/instances") and params and params.get("Modality") == "CR":
            polls += 1
            if polls == 3:
                server.add(2)
        return original(url, params, accept=accept)

    server.get_json = counting  # type: ignore[method-assign]
    feed = make_feed(server, tmp_path, stop=lambda: polls >= 5)
    publisher = FakePublisher()
    feed.load()
    feed.begin("now")
    assert feed.run(publisher) == 1
    assert sops(publisher) == ["1.2.826.0.2.2.3"]


def test_an_instance_without_a_usable_uid_is_counted_not_announced(tmp_path: Path) -> None:
    server = FakeDicomweb()
    feed = start(make_feed(server, tmp_path), FakePublisher(), "now")
    sop = server.add(1)
    server.datasets[sop]["0020000E"] = element("UI", "1.2/../../x")
    broken = server.add(2)
    server.datasets[broken]["00080018"] = element("UI", "not-a-uid")
    publisher = FakePublisher()
    tally = feed.poll(publisher)
    assert publisher.sent == [] and tally.unusable == 2
    assert not any("../" in url for url, _ in server.requests)


# -------------------------------------------------------------------------------------------- the command


def test_follow_records_what_is_there_before_kafka_is_reached_and_stops_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producers import dicomweb as module

    server = FakeDicomweb()
    server.add(1, day=f"{datetime.now():%Y%m%d}")
    publisher = FakePublisher()
    seen_when_kafka_answered: list[int] = []

    class Connecting:
        def __enter__(self) -> FakePublisher:
            seen_when_kafka_answered.append(len(saved_at(store_for(settings, ROOT).path)["seen"]))
            server.add(2, day=f"{datetime.now():%Y%m%d}")
            return publisher

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(pacs, "PacsHttp", lambda session, timeout_s: server)
    monkeypatch.setattr(ReferencePublisher, "for_settings", lambda settings: Connecting())
    settings = Settings.load(state_dir=tmp_path, feed_poll_interval_s=0.01)
    deadline = clock_time.monotonic() + 5

    def stop() -> bool:
        return bool(publisher.sent) or clock_time.monotonic() > deadline

    assert module.follow(settings, ROOT, begin="now", stop=stop) == 1
    assert seen_when_kafka_answered == [1]
    assert sops(publisher) == ["1.2.826.0.2.2.3"]


def saved_at(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_a_garbled_answer_is_retried_and_a_url_without_qido_rs_stops_the_feed(tmp_path: Path) -> None:
    class Garbling(FakeDicomweb):
        garbled = 2

        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            if url.endswith("/instances") and self.garbled:
                self.garbled -= 1
                return {"error": "not a search answer"}
            return super().get_json(url, params, accept=accept)

    server = Garbling()
    added = server.add(1)
    publisher = FakePublisher()
    start(make_feed(server, tmp_path), publisher, "start").poll(publisher)
    assert sops(publisher) == [added]

    class NotDicomweb(FakeDicomweb):
        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            raise InstanceGone()

    with pytest.raises(PacsError, match=r"HTTP 404.*DICOMweb service root"):
        start(make_feed(NotDicomweb(), tmp_path / "other"), FakePublisher(), "start").run(FakePublisher())
