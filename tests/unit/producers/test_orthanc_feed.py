"""The Orthanc change-feed follower against a fake Orthanc (no server, no Kafka): where a first run begins, what
it publishes and skips, a cursor that moves only after Kafka acknowledged, outages ridden out, a prompt stop,
and logs without patient data."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fake_publisher import FakePublisher
from producers import pacs
from producers.orthanc import CURSOR_SCHEMA, OrthancFeed, parse_changes, store_for
from producers.pacs import (
    ChestFilter,
    CursorStore,
    InstanceGone,
    PacsError,
    PacsUnavailable,
    event_id_for,
)
from producers.publish import ReferencePublisher
from producers.state import StateError
from streaming.backoff import Backoff
from streaming.settings import Settings

URL = "http://orthanc.example:8042"
DX, CT = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.2"
CHEST = ChestFilter(frozenset({"CR", "DX"}), frozenset({"1.2.840.10008.5.1.4.1.1.1", DX}))
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-0042-SECRET"


def uids(i: int) -> tuple[str, str, str]:
    return f"1.2.826.0.1.{i}.1", f"1.2.826.0.1.{i}.2", f"1.2.826.0.1.{i}.3"


def tags(i: int, modality: str = "DX", sop_class: str = DX) -> dict[str, Any]:
    study, series, sop = uids(i)
    return {
        "StudyInstanceUID": study,
        "SeriesInstanceUID": series,
        "SOPInstanceUID": sop,
        "SOPClassUID": sop_class,
        "Modality": modality,
        "AccessionNumber": f"ACC{i:04d}",
        "ViewPosition": "PA",
        "PatientName": PATIENT_NAME,
        "PatientID": PATIENT_ID,
        "PixelData": None,
    }


def orthanc_id(text: str) -> str:
    digest = hashlib.sha1(text.encode()).hexdigest()[:40]
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


class FakeOrthanc:
    """Orthanc's change feed and simplified tags, in memory; `down` fails that many requests first."""

    def __init__(self) -> None:
        self.url = URL
        self.changes: list[dict[str, Any]] = []
        self.tags: dict[str, dict[str, Any]] = {}
        self.down = 0
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.on_tags: Callable[[], None] = lambda: None

    @property
    def last(self) -> int:
        return self.changes[-1]["Seq"] if self.changes else 0

    def change(self, change_type: str, resource_id: str) -> None:
        self.changes.append({"ChangeType": change_type, "ID": resource_id, "Seq": self.last + 1, "Path": "/x"})

    def store(self, instance_tags: dict[str, Any], *, deleted: bool = False, resource_id: str | None = None) -> str:
        """An instance arrives (and, like Orthanc, a new series and study); `deleted`: gone before it is read."""
        rid = resource_id or orthanc_id(instance_tags.get("SOPInstanceUID", str(len(self.changes))))
        if not deleted:
            self.tags[rid] = instance_tags
        self.change("NewInstance", rid)
        self.change("NewSeries", orthanc_id(f"series{rid}"))
        return rid

    def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "application/json") -> Any:
        params = dict(params or {})
        self.requests.append((url, params))
        if url.endswith("/simplified-tags"):
            self.on_tags()
        if self.down > 0:
            self.down -= 1
            raise PacsUnavailable("ConnectionError")
        assert url.startswith(self.url)
        path = url[len(self.url) :]
        if path == "/changes" and "last" in params:
            return {"Changes": self.changes[-1:], "Done": True, "Last": self.last}
        if path == "/changes":
            since, limit = int(params["since"]), int(params["limit"])
            after = [c for c in self.changes if c["Seq"] > since]
            page = after[:limit]
            return {"Changes": page, "Done": len(after) <= limit, "Last": page[-1]["Seq"] if page else self.last}
        match = re.fullmatch(r"/instances/([^/]+)/simplified-tags", path)
        assert match, path
        if match.group(1) not in self.tags:
            raise InstanceGone()
        return self.tags[match.group(1)]


def make_feed(server: FakeOrthanc, state: Path, **options: Any) -> OrthancFeed:
    store = CursorStore.for_source(state, "orthanc", server.url, CURSOR_SCHEMA)
    options.setdefault("poll_interval_s", 0.01)
    options.setdefault("backoff", Backoff(first_s=0.01, max_s=0.02))
    return OrthancFeed(server, server.url, store, CHEST, **options)


def drain(feed: OrthancFeed, publisher: FakePublisher, begin: str = "now") -> OrthancFeed:
    """Start (as `run` does) and handle pages until Orthanc says it is caught up."""
    feed.load()
    feed.begin(begin)
    while not feed.step(publisher):
        pass
    return feed


def run(feed: OrthancFeed, publisher: FakePublisher, begin: str = "now") -> int:
    """Start and follow, as `follow` does."""
    feed.load()
    feed.begin(begin)
    return feed.run(publisher)


def sops(publisher: FakePublisher) -> list[str | None]:
    return [ref.sop_instance_uid for ref in publisher.sent]


def saved_seq(feed: OrthancFeed) -> int:
    return int(json.loads(feed.store.path.read_text())["last_seq"])


# ------------------------------------------------------------------------------------------- the change feed


def test_a_page_of_changes_is_parsed_and_ordered() -> None:
    body = {
        "Changes": [
            {"ChangeType": "NewSeries", "ID": "b", "Seq": 4},
            {"ChangeType": "NewInstance", "ID": "a", "Seq": 3},
        ],
        "Done": False,
        "Last": 4,
    }
    page = parse_changes(body)
    assert [(c.seq, c.change_type, c.resource_id) for c in page.changes] == [
        (3, "NewInstance", "a"),
        (4, "NewSeries", "b"),
    ]
    assert (page.done, page.last) == (False, 4)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"Changes": []},
        {"Changes": {}, "Last": 1},
        {"Changes": [{"Seq": "3"}], "Last": 3},
        {"Changes": [], "Last": -1},
    ],
)
def test_an_answer_that_is_not_a_change_feed_is_treated_as_the_server_being_away(body: Any) -> None:
    with pytest.raises(PacsUnavailable):
        parse_changes(body)


# ------------------------------------------------------------------------------------------------ first runs


def test_from_start_publishes_every_chest_x_ray_and_counts_the_rest(tmp_path: Path) -> None:
    server = FakeOrthanc()
    server.store(tags(1))
    server.store(tags(2, "CT", CT))  # not a chest X-ray
    server.store(tags(3, "CR", "1.2.840.10008.5.1.4.1.1.1"))
    server.store(tags(4), deleted=True)  # deleted before its tags were read
    server.store(tags(5), resource_id="../../system")  # not an Orthanc id: never put in a path
    server.store({**tags(6), "SeriesInstanceUID": "1.2/../../x"})  # not a UID: never put in a URL
    server.store(tags(7, "DX", CT))  # a chest modality, another storage class
    publisher = FakePublisher()
    feed = drain(make_feed(server, tmp_path), publisher, "start")

    assert sops(publisher) == [uids(1)[2], uids(3)[2]]
    first = publisher.sent[0]
    study, series, sop = uids(1)
    assert first.uri == f"{URL}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    assert (first.study_uid, first.series_uid, first.accession, first.modality, first.view_position) == (
        study,
        series,
        "ACC0001",
        "DX",
        "PA",
    )
    assert first.event_id == event_id_for(f"{URL}/dicom-web", sop)
    assert (feed.tally.published, feed.tally.not_chest, feed.tally.gone, feed.tally.unusable) == (2, 2, 1, 2)
    assert saved_seq(feed) == server.last and feed.cursor == server.last
    assert not any("system" in url for url, _ in server.requests)


def test_from_now_starts_at_the_latest_change_and_saves_it_at_once(tmp_path: Path) -> None:
    server = FakeOrthanc()
    server.store(tags(1))
    feed = make_feed(server, tmp_path)
    feed.load()
    assert feed.begin("now") == server.last
    assert saved_seq(feed) == server.last  # a crash now must not move "now" on
    server.store(tags(2))
    publisher = FakePublisher()
    while not feed.step(publisher):
        pass
    assert sops(publisher) == [uids(2)[2]]


def test_an_existing_cursor_wins_over_either_flag(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = FakeOrthanc()
    server.store(tags(1))
    drain(make_feed(server, tmp_path), FakePublisher(), "now")
    server.store(tags(2))
    for begin in ("start", "now"):
        publisher = FakePublisher()
        with caplog.at_level(logging.INFO):
            drain(make_feed(server, tmp_path), publisher, begin)
        assert "flag is ignored" in caplog.text
        if begin == "start":
            assert sops(publisher) == [uids(2)[2]]  # not instance 1: the cursor is past it
        else:
            assert publisher.sent == []


def test_a_corrupt_cursor_stops_the_feed_before_anything_is_read(tmp_path: Path) -> None:
    server = FakeOrthanc()
    feed = make_feed(server, tmp_path)
    feed.store.path.parent.mkdir(parents=True)
    for content in ("{ half", json.dumps({"schema": CURSOR_SCHEMA, "source": URL, "last_seq": "7"})):
        feed.store.path.write_text(content)
        with pytest.raises(StateError, match="corrupt"):
            feed.load()
    assert server.requests == []


def test_the_cursor_file_is_per_server(tmp_path: Path) -> None:
    settings = Settings.load(state_dir=tmp_path)
    assert store_for(settings, URL + "/").path == store_for(settings, URL).path
    assert store_for(settings, URL).path.parent == tmp_path / "orthanc"
    assert store_for(settings, "http://other:8042").path != store_for(settings, URL).path


# --------------------------------------------------------------------------------------- commit after ack


def test_the_cursor_moves_only_after_kafka_acknowledged_and_a_rerun_repeats_the_same_event_ids(
    tmp_path: Path,
) -> None:
    server = FakeOrthanc()
    feed = drain(make_feed(server, tmp_path), FakePublisher())
    start = saved_seq(feed)
    for i in range(3):
        server.store(tags(i))
    failing = FakePublisher(fail_flush=1)
    with pytest.raises(RuntimeError, match="did not acknowledge"):
        drain(make_feed(server, tmp_path), failing)
    assert saved_seq(feed) == start  # sent, not acknowledged: the cursor did not move
    assert len(failing.sent) == 3

    retry = FakePublisher()
    drain(make_feed(server, tmp_path), retry)
    assert [r.event_id for r in retry.sent] == [r.event_id for r in failing.sent]
    assert saved_seq(feed) == server.last


def test_each_page_is_committed_on_its_own(tmp_path: Path) -> None:
    server = FakeOrthanc()
    for i in range(4):  # two changes per instance, two per page: one instance per page
        server.store(tags(i))
    failing = FakePublisher(fail_flush=3)
    feed = make_feed(server, tmp_path, page_size=2)
    with pytest.raises(RuntimeError):
        drain(feed, failing, "start")
    assert saved_seq(feed) == 4  # pages 1 and 2 acknowledged and committed; page 3 not
    retry = FakePublisher()
    drain(make_feed(server, tmp_path, page_size=2), retry)
    assert sops(retry) == [uids(2)[2], uids(3)[2]]


# ---------------------------------------------------------------------------------------- outages and stops


def test_orthanc_away_at_start_and_mid_run_is_waited_for_and_the_cursor_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = FakeOrthanc()
    server.store(tags(1))
    server.down = 3  # away when the first run asks for its latest change
    publisher = FakePublisher()
    with caplog.at_level(logging.INFO, "producers.pacs"):
        feed = drain(make_feed(server, tmp_path), publisher)
        before = saved_seq(feed)
        server.store(tags(2))
        server.store(tags(3))
        calls = 0

        def flaky() -> None:  # away again while the second instance's tags are read
            nonlocal calls
            calls += 1
            if calls == 2:
                server.down = 2

        server.on_tags = flaky
        while not feed.step(publisher):
            pass
    assert before == 2
    assert sops(publisher) == [uids(2)[2], uids(3)[2]]
    assert saved_seq(feed) == server.last
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 5 and all("does not answer" in w for w in warnings)
    assert "answers again" in caplog.text


def test_refused_credentials_stop_the_feed(tmp_path: Path) -> None:
    class Refusing(FakeOrthanc):
        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            raise PacsError("the server refused our credentials (HTTP 401)")

    with pytest.raises(PacsError, match="401"):
        run(make_feed(Refusing(), tmp_path), FakePublisher())


def test_a_stop_mid_page_commits_what_was_handled(tmp_path: Path) -> None:
    server = FakeOrthanc()
    for i in range(3):
        server.store(tags(i))
    reads = 0

    def stop() -> bool:
        return reads >= 2

    def count() -> None:
        nonlocal reads
        reads += 1

    server.on_tags = count
    publisher = FakePublisher()
    feed = make_feed(server, tmp_path, stop=stop)
    assert run(feed, publisher, "start") == 2
    assert sops(publisher) == [uids(0)[2], uids(1)[2]]
    assert saved_seq(feed) == 4  # up to the second instance's series change; the third instance waits


def test_run_follows_until_stopped_and_sleeps_between_polls(tmp_path: Path) -> None:
    server = FakeOrthanc()
    started = time.monotonic()
    arrived = False

    def stop() -> bool:
        nonlocal arrived
        if not arrived and time.monotonic() - started > 0.2:
            server.store(tags(9))
            arrived = True
        return time.monotonic() - started > 0.6

    feed = make_feed(server, tmp_path, poll_interval_s=0.05, stop=stop)
    publisher = FakePublisher()
    assert run(feed, publisher) == 1
    assert sops(publisher) == [uids(9)[2]]
    polls = sum(1 for url, params in server.requests if "since" in params)
    assert 4 <= polls <= 20  # caught up: one request per interval, not a busy loop


def test_a_broken_change_feed_that_is_never_done_is_asked_once_per_interval(tmp_path: Path) -> None:
    """Changes at or before the cursor, or none, with `Done: false`: nothing to read, so no busy loop."""

    class NeverDone(FakeOrthanc):
        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            answer = super().get_json(url, params, accept=accept)
            if "since" in (params or {}):
                answer = {"Changes": self.changes[:1], "Done": False, "Last": self.last}
            return answer

    for stored in (0, 1):  # no change at all; one change, already handled
        server = NeverDone()
        for i in range(stored):
            server.store(tags(i))
        deadline = time.monotonic() + 0.5
        feed = make_feed(
            server, tmp_path / str(stored), poll_interval_s=0.05, stop=lambda d=deadline: time.monotonic() > d
        )
        assert run(feed, FakePublisher()) == 0
        assert sum(1 for _, params in server.requests if "since" in params) <= 15


def test_logs_carry_counts_never_patient_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = FakeOrthanc()
    server.store(tags(1))
    server.store(tags(2, "CT", CT))
    server.store(tags(3), deleted=True)
    server.down = 1
    with caplog.at_level(logging.DEBUG):
        drain(make_feed(server, tmp_path), FakePublisher(), "start")
    text = caplog.text
    assert "published 1, skipped 1 not a chest X-ray, 1 deleted" in text
    for secret in [PATIENT_NAME, PATIENT_ID, "ACC000", "1.2.826.0.1", *server.tags]:
        assert secret not in text


# -------------------------------------------------------------------------------------------- the command


def test_follow_fixes_now_before_kafka_is_reached_and_stops_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from producers import orthanc as module

    server = FakeOrthanc()
    server.store(tags(1))
    cursor_when_kafka_answered: list[bool] = []
    publisher = FakePublisher()

    class Connecting:
        def __enter__(self) -> FakePublisher:
            cursor_when_kafka_answered.append(store_for(settings, URL).path.exists())
            server.store(tags(2))  # arrives while Kafka is being reached: after "now", so announced
            return publisher

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(pacs, "PacsHttp", lambda session, timeout_s: server)
    monkeypatch.setattr(ReferencePublisher, "for_settings", lambda settings: Connecting())
    settings = Settings.load(state_dir=tmp_path, feed_poll_interval_s=0.01, dicomweb_allowed_hosts="elsewhere:8042")
    deadline = time.monotonic() + 5
    with caplog.at_level(logging.WARNING):
        count = module.follow(
            settings, URL, begin="now", stop=lambda: bool(publisher.sent) or time.monotonic() > deadline
        )
    assert cursor_when_kafka_answered == [True]
    assert count == 1 and sops(publisher) == [uids(2)[2]]
    assert "not in CXR_DICOMWEB_ALLOWED_HOSTS" in caplog.text


def test_follow_refuses_a_corrupt_cursor_before_asking_anyone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from producers import orthanc as module

    settings = Settings.load(state_dir=tmp_path)
    path = store_for(settings, URL).path
    path.parent.mkdir(parents=True)
    path.write_text("[]")
    asked = FakeOrthanc()
    monkeypatch.setattr(pacs, "PacsHttp", lambda session, timeout_s: asked)
    monkeypatch.setattr(ReferencePublisher, "for_settings", lambda s: pytest.fail("Kafka was reached"))
    with pytest.raises(StateError, match="corrupt"):
        module.follow(settings, URL, begin="now", stop=lambda: False)
    with pytest.raises(PacsError, match="credentials in the URL"):
        module.follow(settings, "http://cxr:secret@orthanc:8042", begin="now", stop=lambda: False)
    assert asked.requests == []


def test_follow_stopped_while_orthanc_is_away_at_start_exits_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from producers import orthanc as module

    server = FakeOrthanc()
    server.down = 10**6
    monkeypatch.setattr(pacs, "PacsHttp", lambda session, timeout_s: server)
    monkeypatch.setattr(ReferencePublisher, "for_settings", lambda s: pytest.fail("Kafka was reached"))
    settings = Settings.load(state_dir=tmp_path, feed_poll_interval_s=0.01)
    deadline = time.monotonic() + 0.3
    assert module.follow(settings, URL, begin="now", stop=lambda: time.monotonic() > deadline) == 0
    assert not store_for(settings, URL).path.exists()


def test_a_garbled_answer_is_retried_and_a_url_without_a_change_feed_stops_the_feed(tmp_path: Path) -> None:
    class Garbling(FakeOrthanc):
        garbled = 2

        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            if url.endswith("/changes") and self.garbled:
                self.garbled -= 1
                return "<html>a proxy's error page</html>"
            return super().get_json(url, params, accept=accept)

    server = Garbling()
    server.store(tags(1))
    publisher = FakePublisher()
    drain(make_feed(server, tmp_path), publisher, "start")
    assert sops(publisher) == [uids(1)[2]]

    class NotOrthanc(FakeOrthanc):
        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            raise InstanceGone()

    with pytest.raises(PacsError, match=r"HTTP 404.*REST root"):
        run(make_feed(NotOrthanc(), tmp_path / "other"), FakePublisher())


def test_an_instance_orthanc_keeps_failing_on_is_skipped_not_waited_for_forever(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = "1.2.826.0.1.2.3"

    class Failing(FakeOrthanc):
        def get_json(self, url: str, params: dict[str, Any] | None = None, *, accept: str = "") -> Any:
            if url.endswith(f"{orthanc_id(broken)}/simplified-tags"):
                raise PacsUnavailable("HTTP 500", answered=True)  # a file Orthanc cannot parse
            return super().get_json(url, params, accept=accept)

    server = Failing()
    for i in (1, 2, 3):
        server.store(tags(i))
    publisher = FakePublisher()
    with caplog.at_level(logging.WARNING):
        feed = drain(make_feed(server, tmp_path), publisher, "start")
    assert sops(publisher) == [uids(1)[2], uids(3)[2]]
    assert feed.tally.unusable == 1 and saved_seq(feed) == server.last
    assert "skipping it" in caplog.text and broken not in caplog.text


def test_an_orthanc_whose_database_was_reset_is_followed_from_its_new_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Restarting on old state: Orthanc numbers its changes afresh after its database was replaced, so a cursor
    ahead of its last change must not wait for it to catch up (every image stored meanwhile would be lost)."""
    before = FakeOrthanc()
    for n in (1, 2, 3):
        before.store(tags(n))
    first = FakePublisher()
    drain(make_feed(before, tmp_path), first, "start")
    restored = FakeOrthanc()  # the same URL, a new database: instance 2 restored from a backup, 4 is new
    restored.store(tags(2))
    restored.store(tags(4))
    again = FakePublisher()
    with caplog.at_level(logging.WARNING):
        drain(make_feed(restored, tmp_path), again)
    assert "database was replaced or reset" in caplog.text
    assert sops(again) == [uids(2)[2], uids(4)[2]]
    repeated = {ref.sop_instance_uid: ref.event_id for ref in first.sent}
    assert again.sent[0].event_id == repeated[uids(2)[2]]  # a repeat under the id it had: consumers drop it
