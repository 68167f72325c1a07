"""What the PACS feeds share, without Kafka, Orthanc or Spark: the chest filter, instances from Orthanc's tags
and from DICOM JSON, WADO-RS URLs and deterministic event ids, the HTTP client's sorting of failures, retries,
the strict cursor store, and the rule that a cursor moves only after Kafka acknowledged."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import SecretStr

from fake_publisher import FakePublisher
from producers.pacs import (
    EVENT_NAMESPACE,
    ChestFilter,
    CursorStore,
    Instance,
    InstanceGone,
    InstanceUnreadable,
    PacsError,
    PacsHttp,
    PacsUnavailable,
    Stopped,
    Tally,
    check_url,
    decide,
    event_id_for,
    http_session,
    instance_from_dicom_json,
    instance_from_simplified_tags,
    instance_url,
    pause,
    prefer,
    publish_then_commit,
    reference_for,
    retrying,
    tag_text,
    valid_uid,
    wado_rs_url,
    warn_unless_allowed,
)
from producers.state import StateError, state_file
from streaming.backoff import Backoff
from streaming.contracts import Reference, parse_reference
from streaming.settings import Settings

ROOT = "http://pacs.example:8042/dicom-web"
STUDY, SERIES, SOP = "1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
CHEST = ChestFilter(frozenset({"CR", "DX"}), frozenset({"1.2.840.10008.5.1.4.1.1.1", DX}))


def chest_instance(**changes: str | None) -> Instance:
    fields: dict[str, str | None] = {
        "study_uid": STUDY,
        "series_uid": SERIES,
        "sop_instance_uid": SOP,
        "sop_class_uid": DX,
        "modality": "DX",
        "accession": "ACC0001",
        "view_position": "PA",
        "study_date": "20240102",
        "study_time": "101500",
    }
    fields.update(changes)
    return Instance(**fields)


# ------------------------------------------------------------------------------------------ reading the tags


def test_tag_text_is_the_text_without_padding_or_none() -> None:
    assert tag_text(" DX \x00") == "DX"
    for nothing in (None, "", " \x00", 7, ["DX"], {"Alphabetic": "Doe^Jane"}, b"DX"):
        assert tag_text(nothing) is None


def test_simplified_tags_give_the_instance_without_padding_sequences_or_pixels() -> None:
    tags = {
        "StudyInstanceUID": STUDY,
        "SeriesInstanceUID": SERIES,
        "SOPInstanceUID": SOP + "\x00",
        "SOPClassUID": DX,
        "Modality": "DX ",
        "AccessionNumber": "",
        "ViewPosition": "PA",
        "StudyDate": "20240102",
        "PatientName": "Doe^Jane",
        "PixelData": None,
        "ReferencedImageSequence": [{"ReferencedSOPInstanceUID": "9.9"}],
    }
    instance = instance_from_simplified_tags(tags)
    assert instance == Instance(STUDY, SERIES, SOP, DX, "DX", None, "PA", "20240102", None)


def test_dicom_json_gives_the_first_value_of_each_tag() -> None:
    dataset = {
        "0020000D": {"vr": "UI", "Value": [STUDY]},
        "0020000E": {"vr": "UI", "Value": [SERIES]},
        "00080018": {"vr": "UI", "Value": [SOP, "ignored"]},
        "00080016": {"vr": "UI", "Value": [DX]},
        "00080060": {"vr": "CS", "Value": ["CR"]},
        "00080050": {"vr": "SH"},  # present, empty
        "00185101": {"vr": "CS", "Value": []},
        "00080020": {"vr": "DA", "Value": ["20240102"]},
        "00080030": {"vr": "TM", "Value": ["101500.123"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "7fe00010": {"vr": "OB", "BulkDataURI": "http://x/bulk"},
    }
    assert instance_from_dicom_json(dataset) == Instance(
        STUDY, SERIES, SOP, DX, "CR", None, None, "20240102", "101500.123"
    )
    assert instance_from_dicom_json({"0020000d": {"vr": "UI", "Value": [STUDY]}}).study_uid == STUDY
    assert instance_from_dicom_json({"00080060": {"vr": "CS", "Value": [7]}}).modality is None
    assert instance_from_dicom_json({}) == Instance()


def test_prefer_fills_only_what_the_first_lacks() -> None:
    search = Instance(study_uid=STUDY, modality="DX", view_position=None)
    metadata = Instance(study_uid="9.9", modality="CR", view_position="AP", accession="A1")
    merged = prefer(search, metadata)
    assert (merged.study_uid, merged.modality, merged.view_position, merged.accession) == (STUDY, "DX", "AP", "A1")


# ------------------------------------------------------------------------------------------------ the filter


@pytest.mark.parametrize(
    ("modality", "sop_class", "admitted"),
    [
        ("DX", DX, True),
        ("cr", "1.2.840.10008.5.1.4.1.1.1", True),
        ("CT", CT, False),
        ("DX", CT, False),  # a chest modality storing something else (a secondary capture, a CT class)
        ("CT", DX, False),
        (None, DX, False),
        ("DX", None, False),
    ],
)
def test_a_chest_x_ray_needs_both_a_chest_modality_and_a_chest_storage_class(
    modality: str | None, sop_class: str | None, admitted: bool
) -> None:
    assert CHEST.admits(chest_instance(modality=modality, sop_class_uid=sop_class)) is admitted


def test_the_filter_comes_from_the_settings() -> None:
    default = ChestFilter.from_settings(Settings.load())
    assert default.modalities == {"CR", "DX"} and DX in default.sop_classes and CT not in default.sop_classes
    custom = ChestFilter.from_settings(Settings.load(chest_modalities="dx, MG", chest_sop_classes=f"{CT}"))
    assert custom.modalities == {"DX", "MG"} and custom.sop_classes == {CT}
    assert custom.admits(chest_instance(sop_class_uid=CT))


# ------------------------------------------------------------------------------------- references and ids


@pytest.mark.parametrize("uid", ["1", "1.2.840.10008", "0.1", "1." + "2" * 62])
def test_valid_uids(uid: str) -> None:
    assert valid_uid(uid)


@pytest.mark.parametrize("uid", [None, "", "1..2", ".1", "1.", "1.2/../x", "1.2?a=b", "abc", "1 2", "1." + "2" * 63])
def test_invalid_uids_never_reach_a_url(uid: str | None) -> None:
    assert not valid_uid(uid)
    assert instance_url(ROOT, chest_instance(series_uid=uid)) is None
    assert reference_for(chest_instance(sop_instance_uid=uid), ROOT) is None


@pytest.mark.parametrize("value", [12, 1.2, b"1.2", ["1.2"], object()])
def test_what_is_not_a_string_is_not_a_uid(value: object) -> None:
    assert valid_uid(value) is False


def test_event_ids_are_uuid5_of_the_service_root_and_the_sop_instance_uid() -> None:
    event_id = event_id_for(ROOT, SOP)
    assert uuid.UUID(event_id).version == 5
    assert event_id == str(uuid.uuid5(EVENT_NAMESPACE, f"{ROOT}\n{SOP}"))
    assert event_id == event_id_for(ROOT + "/", SOP)  # one service, however its root is spelled
    assert event_id != event_id_for("http://other:8042/dicom-web", SOP)
    assert event_id != event_id_for(ROOT, SOP + ".1")


def test_the_reference_points_at_the_wado_rs_url_and_carries_the_identifiers() -> None:
    ref = reference_for(chest_instance(), ROOT + "/")
    assert ref is not None
    assert ref.uri == f"{ROOT}/studies/{STUDY}/series/{SERIES}/instances/{SOP}" == wado_rs_url(ROOT, STUDY, SERIES, SOP)
    assert ref.event_id == event_id_for(ROOT, SOP)
    assert (ref.study_uid, ref.series_uid, ref.sop_instance_uid) == (STUDY, SERIES, SOP)
    assert (ref.accession, ref.modality, ref.view_position) == ("ACC0001", "DX", "PA")
    assert ref.key == STUDY and ref.sent_at is not None and ref.sent_at.endswith("Z")
    assert parse_reference(ref.to_json()) == ref  # what the scorer reads


def test_decide_publishes_chest_x_rays_and_counts_the_rest() -> None:
    tally = Tally()
    assert decide(chest_instance(), CHEST, ROOT, tally) is not None
    assert decide(chest_instance(modality="CT", sop_class_uid=CT), CHEST, ROOT, tally) is None
    assert decide(chest_instance(study_uid=None), CHEST, ROOT, tally) is None
    assert tally == Tally(published=1, not_chest=1, unusable=1)
    assert tally.looked_at == 3
    other = Tally(gone=2)
    tally.add(other)
    assert tally.gone == 2
    assert tally.summary() == (
        "published 1, skipped 1 not a chest X-ray, 2 deleted before they were read, 1 unreadable"
    )


# ------------------------------------------------------------------------------------------------------ HTTP


@pytest.mark.parametrize(
    "url", ["ftp://pacs/x", "pacs:8042", "http:///path", "http://user:pw@pacs:8042", "http://pacs/?a=1"]
)
def test_server_urls_are_refused_when_they_cannot_be_a_root_or_carry_credentials(url: str) -> None:
    with pytest.raises(PacsError) as info:
        check_url(url)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://cxr:s3cret-pw@pacs.example/x",
        "http//cxr:s3cret-pw@pacs.example",  # a colon short: no scheme, no host, the password in the path
        "pacs.example://cxr:s3cret-pw@x",
        "//cxr:s3cret-pw@pacs.example",
        "https://cxr:s3cret-pw@pacs.example:8042/dicom-web",
        "http://cxr:s3cret-pw@[pacs.example",  # cannot even be parsed
        "https://pacs.example/dicom-web?token=s3cret-pw",
        "http://pacs.example:s3cret-pw/dicom-web",  # a port that is no number
    ],
)
def test_a_refused_server_url_is_never_quoted(url: str) -> None:
    with pytest.raises(PacsError) as info:
        check_url(url)
    assert "s3cret-pw" not in str(info.value) and "pacs.example" not in str(info.value)


def test_a_server_url_loses_its_trailing_slashes() -> None:
    assert check_url("https://pacs.example/dicom-web//") == "https://pacs.example/dicom-web"


def test_a_host_the_scorer_would_refuse_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "producers.pacs"):
        assert warn_unless_allowed(ROOT, ["pacs.example:8042"])
        assert warn_unless_allowed(ROOT, ["PACS.example"])  # the host alone admits any of its ports
        assert not caplog.records
        assert not warn_unless_allowed(ROOT, ["pacs.example:80", "other:8042"])
    assert "CXR_DICOMWEB_ALLOWED_HOSTS" in caplog.text and "forbidden_uri" in caplog.text


@pytest.mark.parametrize(
    ("root", "allowed", "reason"),
    [
        ("http://010.0.0.1:8042/dicom-web", "010.0.0.1:8042", "without leading zeros"),
        ("http://pacs.example:08042/dicom-web", "pacs.example", "port"),
        ("http://cxr:s3cret@pacs.example:8042/dicom-web", "pacs.example", "credentials"),
        ("http://pacs.example:8042/dicom web", "pacs.example", "percent-encoded"),
    ],
)
def test_whatever_the_scorer_refuses_is_warned_about_with_its_reason(
    caplog: pytest.LogCaptureFixture, root: str, allowed: str, reason: str
) -> None:
    """The scorer's own check decides: an allowed host spelt in a way it refuses is warned about too."""
    with caplog.at_level(logging.WARNING, "producers.pacs"):
        assert not warn_unless_allowed(root, [allowed])
    assert reason in caplog.text and "s3cret" not in caplog.text


def test_the_session_carries_the_configured_credentials_and_nothing_from_the_environment() -> None:
    basic = http_session(Settings.load(dicomweb_username="cxr", dicomweb_password=SecretStr("s3cret")))
    assert basic.headers["Authorization"] == "Basic Y3hyOnMzY3JldA=="
    assert basic.trust_env is False  # no proxies, no ~/.netrc credentials
    bearer = http_session(Settings.load(dicomweb_token=SecretStr("tok")))
    assert bearer.headers["Authorization"] == "Bearer tok"
    assert "Authorization" not in http_session(Settings.load()).headers


class FakeSession:
    """Answers every GET with one canned response, or raises; records the keyword arguments it was given."""

    def __init__(self, status: int = 200, body: bytes = b"{}", error: Exception | None = None) -> None:
        self.status, self.body, self.error = status, body, error
        self.calls: list[dict[str, Any]] = []

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append({"url": url, **kwargs})
        if self.error is not None:
            raise self.error
        response = requests.Response()
        response.status_code = self.status
        response._content = self.body
        response.raw = io.BytesIO(self.body)
        return response


def client(session: FakeSession) -> PacsHttp:
    return PacsHttp(session, 7.5)  # type: ignore[arg-type]


def test_every_request_has_the_timeout_and_follows_no_redirect() -> None:
    session = FakeSession(body=b'{"a": 1}')
    assert client(session).get_json(f"{ROOT}/instances", {"Modality": "DX"}, accept="application/dicom+json") == {
        "a": 1
    }
    (call,) = session.calls
    assert call["timeout"] == 7.5 and call["allow_redirects"] is False
    assert call["params"] == {"Modality": "DX"} and call["headers"] == {"Accept": "application/dicom+json"}


@pytest.mark.parametrize(
    ("status", "body", "outcome"),
    [
        (200, b"[1]", [1]),
        (204, b"", None),
        (404, b"{}", InstanceGone),
        (401, b"", PacsError),
        (403, b"", PacsError),
        (400, b"", PacsError),
        (302, b"", PacsError),
        (429, b"", PacsUnavailable),
        (500, b"", PacsUnavailable),  # answered: one instance's read gives up after a few
        (503, b"", PacsUnavailable),
        (200, b"<html>proxy error</html>", PacsUnavailable),
    ],
)
def test_answers_are_sorted_into_data_skip_retry_and_stop(status: int, body: bytes, outcome: Any) -> None:
    http = client(FakeSession(status, body))
    if isinstance(outcome, type) and issubclass(outcome, BaseException):
        with pytest.raises(outcome):
            http.get_json(ROOT)
    else:
        assert http.get_json(ROOT) == outcome


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectionError(f"HTTPConnectionPool: Max retries exceeded with url: /studies/{STUDY}/metadata"),
        requests.ReadTimeout(f"read timed out: {SOP}"),
    ],
)
def test_a_server_that_is_away_is_unavailable_and_the_error_does_not_quote_the_url(error: Exception) -> None:
    with pytest.raises(PacsUnavailable) as info:
        client(FakeSession(error=error)).get_json(f"{ROOT}/studies/{STUDY}/metadata")
    assert STUDY not in str(info.value) and SOP not in str(info.value)


# ------------------------------------------------------------------------------------------ waiting, retries


def test_pause_wakes_promptly_on_stop() -> None:
    started = time.monotonic()
    assert pause(30.0, lambda: time.monotonic() - started > 0.2) is True
    assert time.monotonic() - started < 2.0
    assert pause(0.05, lambda: False) is False


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(first_s=1.0, max_s=5.0)
    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.failing
    backoff.reset()
    assert not backoff.failing and backoff.next_delay() == 1.0


def test_retrying_rides_out_an_outage_and_says_so_without_patient_data(caplog: pytest.LogCaptureFixture) -> None:
    answers: list[Any] = [PacsUnavailable("ConnectionError"), PacsUnavailable("HTTP 503"), {"ok": True}]

    def call() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with caplog.at_level(logging.INFO, "producers.pacs"):
        result = retrying(call, stop=lambda: False, backoff=Backoff(first_s=0.01), what="the PACS at http://pacs")
    assert result == {"ok": True}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "ConnectionError" in warnings[0].getMessage()
    assert "answers again" in caplog.records[-1].getMessage()


def test_reads_of_one_instance_give_up_on_a_server_that_answers_with_errors_never_on_one_that_is_away() -> None:
    errors = iter([PacsUnavailable("HTTP 500", answered=True), PacsUnavailable("HTTP 500", answered=True)])

    def broken() -> Any:
        raise next(errors, PacsUnavailable("an answer that is not JSON", answered=True))

    with pytest.raises(InstanceUnreadable):
        retrying(broken, stop=lambda: False, backoff=Backoff(first_s=0.001), what="x", give_up_after=3)

    away = iter([*(PacsUnavailable("ConnectionError") for _ in range(5)), PacsUnavailable("HTTP 500", answered=True)])

    def flaky() -> Any:
        error = next(away, None)
        if error is None:
            return "tags"
        raise error

    assert retrying(flaky, stop=lambda: False, backoff=Backoff(first_s=0.001), what="x", give_up_after=3) == "tags"


def test_retrying_passes_other_errors_through_and_stops_on_request() -> None:
    def gone() -> Any:
        raise InstanceGone()

    with pytest.raises(InstanceGone):
        retrying(gone, stop=lambda: False, backoff=Backoff(first_s=0.01), what="x")

    def away() -> Any:
        raise PacsUnavailable("away")

    stop_at = time.monotonic() + 0.3
    with pytest.raises(Stopped):
        retrying(away, stop=lambda: time.monotonic() > stop_at, backoff=Backoff(first_s=60), what="x")
    with pytest.raises(Stopped):
        retrying(lambda: 1, stop=lambda: True, backoff=Backoff(), what="x")


# ---------------------------------------------------------------------------------------------------- cursor


def test_the_cursor_store_round_trips_and_names_its_file_by_feed_and_source(tmp_path: Path) -> None:
    store = CursorStore.for_source(tmp_path, "orthanc", "http://pacs:8042", "cxr.test-cursor/v1")
    assert store.path == state_file(tmp_path, "orthanc", "http://pacs:8042")
    assert store.load() is None
    store.save({"last_seq": 12})
    assert store.load() == {"last_seq": 12}
    saved = json.loads(store.path.read_text())
    assert saved == {"schema": "cxr.test-cursor/v1", "source": "http://pacs:8042", "last_seq": 12}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{ half", "corrupt"),
        ('{"schema": "cxr.other/v1", "source": "http://pacs:8042"}', "not a cxr.test-cursor/v1 cursor"),
        ('{"schema": "cxr.test-cursor/v1", "source": "http://elsewhere"}', "belongs to"),
    ],
)
def test_a_cursor_that_is_not_exactly_ours_is_refused(tmp_path: Path, content: str, match: str) -> None:
    store = CursorStore.for_source(tmp_path, "orthanc", "http://pacs:8042", "cxr.test-cursor/v1")
    store.path.parent.mkdir(parents=True)
    store.path.write_text(content)
    with pytest.raises(StateError, match=match) as info:
        store.load()
    assert str(store.path) in str(info.value)
    assert isinstance(store.corrupt("x"), StateError) and "remove it" in str(store.corrupt("x"))


# ------------------------------------------------------------------------------------- publish, then commit


def test_the_cursor_moves_only_after_kafka_acknowledged() -> None:
    refs = [Reference(event_id=f"e{i}", uri=f"{ROOT}/studies/1/series/2/instances/{i}") for i in range(3)]
    commits: list[int] = []
    ok = FakePublisher()
    assert publish_then_commit(ok, refs, lambda: commits.append(1)) == 3
    assert ok.flushes == 1 and commits == [1]

    failing = FakePublisher(fail_flush=1)
    with pytest.raises(RuntimeError, match="not acknowledged"):
        publish_then_commit(failing, refs, lambda: commits.append(2))
    assert len(failing.sent) == 3 and commits == [1]  # sent, never acknowledged: not committed

    nothing = FakePublisher()
    assert publish_then_commit(nothing, [], lambda: commits.append(3)) == 0
    assert nothing.flushes == 0 and commits == [1, 3]  # skipped changes still move the cursor


# ------------------------------------------------------------------------------- a PACS that drips its answer


@pytest.mark.parametrize("stage", ["headers", "body"])
def test_a_pacs_dripping_its_answer_is_cut_off_at_the_request_timeout(stage: str) -> None:
    """`requests`' timeout bounds each read; a server sending one byte every 0.2 s would hold the feed for ever
    without the watchdog that `http_session` arms."""
    import socket
    import threading

    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    if stage == "headers":
        answer = head + b"X-Slow: " + b"a" * 200
    else:
        answer = head + b"Content-Length: 200\r\n\r\n" + b" " * 200
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def drip() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            start = answer.index(b"\r\n\r\n") + 4 if stage == "body" else len(head)
            conn.sendall(answer[:start])
            for byte in answer[start:]:
                try:
                    conn.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    threading.Thread(target=drip, daemon=True).start()
    http = PacsHttp(http_session(Settings.load()), 1.0)
    started = time.monotonic()
    with pytest.raises(PacsUnavailable, match="took longer than 1 s"):
        http.get_json(f"http://127.0.0.1:{port}/changes")
    assert time.monotonic() - started < 3.0
    server.close()
