"""The export sinks at their edge, without Orthanc or Kafka: URL redaction and checks, the FHIR server sink
against a real `http.server` on loopback (answers, OperationOutcome, redirects, credentials) and against servers
that misbehave on purpose (refused, silent, dripping), the STOW-RS answer rules, and the folder sink's atomic,
idempotent writes (the C-STORE sink's rules: test_cstore.py).

Every test that waits on a server asserts how long it waited: an attempt must end within its `timeout_s`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from exporters import folder as folder_module
from exporters.errors import ExportCode, ExportError
from exporters.fhir_server import FhirServerSink, fhir_outcome, operation_outcome_issues
from exporters.folder import FolderSink
from exporters.http import MAX_ANSWER_BYTES, redact_url
from exporters.sinks import SrSink
from exporters.stow import StowSink, stow_outcome
from hostile_servers import MisbehavingServer, drips_headers, never_answers
from xray_files import PATIENT_ID, PATIENT_NAME, dicom_bytes, new_dataset

SECRET = "Bearer s3cret-token-do-not-log"
TIMEOUT_S = 1.0
#: What an attempt may take beyond its timeout (thread wake-ups, a loaded CI machine).
SLACK_S = 0.75
BUNDLE = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []}).encode()


# ------------------------------------------------------------------------------------ a recording server


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class Recorder(ThreadingHTTPServer):
    """Answers each POST with the next scripted `Answer` (200 when none is left) and records what came."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers: list[Answer] = []
        self.seen: list[Seen] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Recorder

    def do_POST(self) -> None:
        self.server.seen.append(Seen(self.path, dict(self.headers.items()), self._body()))
        answer = self.server.answers.pop(0) if self.server.answers else Answer()
        self.send_response(answer.status)
        for name, value in {"Content-Length": str(len(answer.body)), **answer.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(answer.body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Recorder]:
    recorder = Recorder()
    thread = threading.Thread(target=recorder.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield recorder
    recorder.shutdown()
    recorder.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def failure(call: Any, *args: Any) -> tuple[ExportError, float]:
    """The ExportError `call(*args)` raises, and how long it took."""
    start = time.monotonic()
    with pytest.raises(ExportError) as caught:
        call(*args)
    return caught.value, time.monotonic() - start


def assert_hidden(secret: str, *things: object) -> None:
    for thing in things:
        assert secret not in str(thing)
        assert secret not in repr(thing)


# ------------------------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://orthanc:8042/dicom-web", "http://orthanc:8042/dicom-web"),
        ("https://user:pa55word@fhir.example/r4?_format=json#x", "https://fhir.example/r4"),
        ("http://user:pa55word@[::1]:8080/dicom-web", "http://[::1]:8080/dicom-web"),
        ("http://only-user@host/fhir", "http://host/fhir"),
        ("http://host/path?token=pa55word", "http://host/path"),
        # An unescaped `/` in a password ends the authority early: never shown as a host and port.
        ("http://user:pa55/word@host/fhir", "http://(redacted)"),
    ],
)
def test_redact_url_drops_userinfo_query_and_fragment(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "pa55" not in redact_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/fhir",
        "http://",
        "http:///fhir",
        "host:8080/fhir",
        "http://user:pa55word@host/fhir",
        "http://host/fhir?token=pa55word",
        "http://host/fhir#pa55word",
        "http://host:0/fhir",
        "http://host:99999/fhir",
        "http://host:pa55word/fhir",
        "http://host/fhir pa55word",
    ],
)
def test_urls_that_are_not_plain_http_are_refused_at_construction(url: str) -> None:
    for make in (FhirServerSink, StowSink):
        with pytest.raises(ValueError) as refused:
            make(url, authorization=None, timeout_s=TIMEOUT_S)
        assert "pa55word" not in str(refused.value)


def test_an_authorization_value_that_no_header_can_carry_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValueError) as refused:
        FhirServerSink("http://host/fhir", authorization="Bearer pa55word\r\nX-Evil: 1", timeout_s=TIMEOUT_S)
    assert "pa55word" not in str(refused.value)


@pytest.mark.parametrize("timeout_s", [0, -1, float("inf"), float("nan")])
def test_a_timeout_must_be_a_positive_number(timeout_s: float) -> None:
    with pytest.raises(ValueError):
        FhirServerSink("http://host/fhir", authorization=None, timeout_s=timeout_s)


# ------------------------------------------------------------------------------------------ FHIR server


@pytest.mark.parametrize("status", [200, 201])
def test_fhir_post_is_done_on_200_and_201(server: Recorder, status: int) -> None:
    server.answers.append(Answer(status, b'{"resourceType": "Bundle", "type": "transaction-response"}'))
    sink = FhirServerSink(server.url("/fhir/"), authorization=None, timeout_s=TIMEOUT_S)
    sink.post(BUNDLE)
    [seen] = server.seen
    assert seen.path == "/fhir"
    assert seen.headers["Content-Type"] == "application/fhir+json"
    assert seen.body == BUNDLE
    assert "Authorization" not in seen.headers
    sink.close()


def test_fhir_operation_outcome_gives_its_issue_codes_but_never_its_diagnostics(server: Recorder) -> None:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "required",
                "diagnostics": f"Patient.name {PATIENT_NAME} identifier {PATIENT_ID} is missing",
                "details": {"text": f"for {PATIENT_NAME}"},
                "expression": [f"Patient.where(id='{PATIENT_ID}')"],
            },
            {"severity": "warning", "code": "business-rule", "diagnostics": PATIENT_ID},
            {"severity": PATIENT_NAME, "code": PATIENT_ID},  # words outside FHIR's value sets are dropped
        ],
    }
    server.answers.append(Answer(400, json.dumps(outcome).encode(), {"Content-Type": "application/fhir+json"}))
    sink = FhirServerSink(server.url("/fhir"), authorization=None, timeout_s=TIMEOUT_S)
    error, _ = failure(sink.post, BUNDLE)
    assert error.code is ExportCode.REJECTED
    assert "HTTP 400" in error.reason
    assert "error/required" in error.reason and "warning/business-rule" in error.reason
    for leak in (PATIENT_NAME, PATIENT_ID, "Patient.name", "missing"):
        assert leak not in error.reason


@pytest.mark.parametrize("status", [503, 429, 408, 500, 502, 504])
def test_fhir_overloaded_or_failing_server_is_unavailable(server: Recorder, status: int) -> None:
    server.answers.append(Answer(status, b"busy, try later"))
    sink = FhirServerSink(server.url("/fhir"), authorization=None, timeout_s=TIMEOUT_S)
    error, _ = failure(sink.post, BUNDLE)
    assert error.code is ExportCode.UNAVAILABLE
    assert error.transient
    assert error.reason == f"HTTP {status}"


@pytest.mark.parametrize("status", [401, 403, 404, 405])
def test_fhir_answers_about_the_configuration_hold_the_exports_back(server: Recorder, status: int) -> None:
    """A wrong password or URL is retried until it is fixed: it must never dead-letter every report."""
    server.answers.append(Answer(status, b"<html>an error page</html>"))
    sink = FhirServerSink(server.url("/fhir"), authorization=None, timeout_s=TIMEOUT_S)
    error, _ = failure(sink.post, BUNDLE)
    assert error.code is ExportCode.UNAVAILABLE
    assert error.reason == f"HTTP {status}: check the configured URL and credentials"


@pytest.mark.parametrize("status", [400, 409, 412, 422])
def test_fhir_other_client_errors_are_rejected(server: Recorder, status: int) -> None:
    server.answers.append(Answer(status, b"<html>an error page</html>"))
    sink = FhirServerSink(server.url("/fhir"), authorization=None, timeout_s=TIMEOUT_S)
    error, _ = failure(sink.post, BUNDLE)
    assert error.code is ExportCode.REJECTED
    assert error.reason == f"HTTP {status}"


def test_fhir_connection_refused_is_unavailable() -> None:
    sink = FhirServerSink(f"http://127.0.0.1:{closed_port()}/fhir", authorization=None, timeout_s=TIMEOUT_S)
    error, elapsed = failure(sink.post, BUNDLE)
    assert error.code is ExportCode.UNAVAILABLE
    assert "ECONNREFUSED" in error.reason
    assert elapsed < TIMEOUT_S


@pytest.mark.parametrize(
    "behaviour",
    [never_answers, drips_headers(0.1)],
    ids=["never-answers", "drips-headers"],
)
def test_fhir_server_that_holds_the_answer_is_unavailable_within_the_timeout(behaviour: Any) -> None:
    """A silent server runs into the read timeout; one that drips a header byte every 0.1 s never does, so
    only the watchdog over the whole attempt ends it."""
    with MisbehavingServer(behaviour) as hostile:
        sink = FhirServerSink(hostile.url("/fhir"), authorization=None, timeout_s=TIMEOUT_S)
        error, elapsed = failure(sink.post, BUNDLE)
    assert error.code is ExportCode.UNAVAILABLE
    assert f"within {TIMEOUT_S:g} s" in error.reason
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + SLACK_S


def test_fhir_redirect_is_not_followed_and_holds_the_exports_back(server: Recorder) -> None:
    """The bundle (and our credentials) go only where they were configured to go; the redirect is a
    configuration to fix, so it is retried (never a dead letter per report). The reason asks for the URL."""
    elsewhere = Recorder()
    thread = threading.Thread(target=elsewhere.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        server.answers.append(Answer(302, b"", {"Location": elsewhere.url("/fhir")}))
        sink = FhirServerSink(server.url("/fhir"), authorization=SECRET, timeout_s=TIMEOUT_S)
        error, _ = failure(sink.post, BUNDLE)
    finally:
        elsewhere.shutdown()
        elsewhere.server_close()
    assert error.code is ExportCode.UNAVAILABLE
    assert "HTTP 302" in error.reason and "redirect" in error.reason
    assert len(server.seen) == 1
    assert elsewhere.seen == []


def test_fhir_credentials_arrive_and_are_never_shown(server: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sink = FhirServerSink(server.url("/fhir"), authorization=SECRET, timeout_s=TIMEOUT_S)
    sink.post(BUNDLE)
    server.answers.append(Answer(401, json.dumps({"resourceType": "OperationOutcome", "issue": []}).encode()))
    error, _ = failure(sink.post, BUNDLE)
    assert [seen.headers["Authorization"] for seen in server.seen] == [SECRET, SECRET]
    assert error.code is ExportCode.UNAVAILABLE
    assert sink.destination == f"fhir:{server.url('/fhir')}"
    assert_hidden(SECRET, sink, sink.destination, error, error.reason)
    assert "s3cret" not in caplog.text


def test_fhir_answers_are_read_only_up_to_the_limit(server: Recorder) -> None:
    issue = {"severity": "error", "code": "invalid", "diagnostics": "x" * MAX_ANSWER_BYTES}
    server.answers.append(Answer(422, json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()))
    sink = FhirServerSink(server.url("/fhir"), authorization=None, timeout_s=TIMEOUT_S)
    error, _ = failure(sink.post, BUNDLE)
    assert error.reason == "HTTP 422"  # the answer was too large to be read, so it names no issues


def test_fhir_outcome_rules() -> None:
    assert fhir_outcome(200, None) is None
    assert fhir_outcome(204, b"") is None
    redirect = fhir_outcome(307, b'{"resourceType": "OperationOutcome"}')
    assert redirect is not None and redirect.code is ExportCode.UNAVAILABLE
    assert operation_outcome_issues(b"not json") == []
    assert operation_outcome_issues(b'{"resourceType": "Patient", "issue": []}') == []
    many = [{"severity": "error", "code": code} for code in ("invalid", "value", "required", "too-long", "extension")]
    many += [{"severity": "error", "code": "invalid"}, {"severity": "fatal", "code": "exception"}]
    body = json.dumps({"resourceType": "OperationOutcome", "issue": many}).encode()
    assert operation_outcome_issues(body) == [
        "error/invalid",
        "error/value",
        "error/required",
        "error/too-long",
        "error/extension",
    ]


# ----------------------------------------------------------------------------------------------- STOW-RS


def sop_instance() -> tuple[pydicom.Dataset, bytes]:
    ds = new_dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds, dicom_bytes(ds)


def failed_sop_answer(uid: str | None, reason: int | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if uid is not None:
        item["00081155"] = {"vr": "UI", "Value": [uid]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return {"00081198": {"vr": "SQ", "Value": [item]}}


UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.mark.parametrize(
    ("status", "answer", "code", "words"),
    [
        (200, {}, None, ""),
        (200, None, None, ""),
        (202, {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [UID]}}]}}, None, ""),
        (202, failed_sop_answer("1.2.3", 0xC000), None, ""),  # another instance failed, not ours
        (202, failed_sop_answer(UID, 0xA900), ExportCode.REJECTED, "0xA900"),
        (409, failed_sop_answer(UID, 0xC000), ExportCode.REJECTED, "0xC000"),
        (409, failed_sop_answer(None, 0x0110), ExportCode.REJECTED, "0x0110"),
        (409, failed_sop_answer(UID, None), ExportCode.REJECTED, "no failure reason"),
        (409, failed_sop_answer(UID, 0xA700), ExportCode.UNAVAILABLE, "0xA700"),
        (200, failed_sop_answer(UID, 0xC000), ExportCode.REJECTED, "0xC000"),
        (202, b"<not json/>", ExportCode.REJECTED, "202"),
        (409, None, ExportCode.REJECTED, "HTTP 409"),
        (503, failed_sop_answer(UID, 0xC000), ExportCode.UNAVAILABLE, "HTTP 503"),
        (429, None, ExportCode.UNAVAILABLE, "HTTP 429"),
        (408, None, ExportCode.UNAVAILABLE, "HTTP 408"),
        (400, None, ExportCode.REJECTED, "HTTP 400"),
        (301, failed_sop_answer(UID, 0xC000), ExportCode.UNAVAILABLE, "redirect"),
        (401, None, ExportCode.UNAVAILABLE, "credentials"),
        (409, failed_sop_answer(UID, 0x0111), None, "a duplicate: this report, delivered before"),
    ],
)
def test_stow_outcome_rules(status: int, answer: Any, code: ExportCode | None, words: str) -> None:
    body = answer if isinstance(answer, bytes) else None if answer is None else json.dumps(answer).encode()
    error = stow_outcome(status, body, UID)
    assert (error.code if error else None) == code
    if error is not None:
        assert words in error.reason


def test_stow_sink_posts_to_studies_with_credentials_and_reads_failures(server: Recorder) -> None:
    ds, data = sop_instance()
    sink: SrSink = StowSink(server.url("/dicom-web/"), authorization=SECRET, timeout_s=TIMEOUT_S)
    assert sink.destination == f"stow:{server.url('/dicom-web')}"
    server.answers.append(Answer(200, b"{}", {"Content-Type": "application/dicom+json"}))
    sink.store(ds, data)
    answer = json.dumps(failed_sop_answer(str(ds.SOPInstanceUID), 0xC000)).encode()
    server.answers.append(Answer(409, answer, {"Content-Type": "application/dicom+json"}))
    error, _ = failure(sink.store, ds, data)
    assert error.code is ExportCode.REJECTED and "0xC000" in error.reason
    first = server.seen[0]
    assert first.path == "/dicom-web/studies"
    assert first.headers["Content-Type"].startswith("multipart/related")
    assert first.headers["Authorization"] == SECRET
    assert data[128:] in first.body  # the instance as read back from its Part 10 bytes
    assert_hidden(SECRET, sink, error)
    for leak in (PATIENT_NAME, PATIENT_ID, str(ds.SOPInstanceUID)):
        assert leak not in error.reason
    sink.close()


def test_stow_sink_to_a_silent_server_is_unavailable_within_the_timeout() -> None:
    ds, data = sop_instance()
    with MisbehavingServer(drips_headers(0.1)) as hostile:
        sink = StowSink(hostile.url("/dicom-web"), authorization=None, timeout_s=TIMEOUT_S)
        error, elapsed = failure(sink.store, ds, data)
    assert error.code is ExportCode.UNAVAILABLE
    assert elapsed < TIMEOUT_S + SLACK_S


def test_stow_sink_refuses_bytes_that_are_not_those_of_the_sr(server: Recorder) -> None:
    ds, _ = sop_instance()
    _, another = sop_instance()
    sink = StowSink(server.url("/dicom-web"), authorization=None, timeout_s=TIMEOUT_S)
    for data in (b"not a DICOM file", another):
        error, _ = failure(sink.store, ds, data)
        assert error.code is ExportCode.INVALID_EXPORT
    assert server.seen == []


# ------------------------------------------------------------------------------------------------ folder


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_folder_sink_writes_the_sr_under_its_uid_and_a_replay_overwrites_it(tmp_path: Path) -> None:
    ds, data = sop_instance()
    folder = tmp_path / "reports" / "sr"
    sink: SrSink = FolderSink(folder)
    assert sink.destination == f"folder:{folder}"
    sink.store(ds, data)
    target = folder / f"{ds.SOPInstanceUID}.dcm"
    assert target.read_bytes() == data
    sink.store(ds, data + b"\x00\x00")  # a replay: the same instance, written again
    assert [path.name for path in folder.iterdir()] == [target.name]
    assert target.read_bytes() == data + b"\x00\x00"
    assert leftovers(folder) == []


def test_folder_sink_never_leaves_half_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write goes to a temporary file renamed over the target: when the rename fails, the old file is
    whole and no temporary file is left."""
    ds, data = sop_instance()
    sink = FolderSink(tmp_path)
    sink.store(ds, data)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    error, _ = failure(sink.store, ds, b"the second version")
    assert error.code is ExportCode.UNAVAILABLE and "EIO" in error.reason
    assert (tmp_path / f"{ds.SOPInstanceUID}.dcm").read_bytes() == data
    assert leftovers(tmp_path) == []


def test_folder_sink_that_cannot_write_is_unavailable(tmp_path: Path) -> None:
    """A folder we cannot write is a set-up problem the operator fixes while the exporter waits (and retries):
    UNAVAILABLE, not a dead letter per report. A file where a parent folder should be fails even as root."""
    (tmp_path / "a-file").write_bytes(b"")
    ds, data = sop_instance()
    sink = FolderSink(tmp_path / "a-file" / "reports")
    error, _ = failure(sink.store, ds, data)
    assert error.code is ExportCode.UNAVAILABLE
    assert "ENOTDIR" in error.reason or "EEXIST" in error.reason
    assert str(ds.SOPInstanceUID) not in error.reason
    if os.geteuid() != 0:  # root writes where permissions say no
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        error, _ = failure(FolderSink(locked).store, ds, data)
        assert error.code is ExportCode.UNAVAILABLE and "EACCES" in error.reason


def test_folder_sink_full_disk_is_unavailable_without_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, data = sop_instance()

    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(folder_module, "write_atomic", full)
    error, _ = failure(FolderSink(tmp_path).store, ds, data)
    assert error.code is ExportCode.UNAVAILABLE and error.transient
    assert "ENOSPC" in error.reason
    assert str(ds.SOPInstanceUID) not in error.reason and str(tmp_path) not in error.reason


def test_folder_sink_refuses_a_uid_that_is_not_one(tmp_path: Path) -> None:
    ds, data = sop_instance()
    with warnings.catch_warnings():  # pydicom warns about the value too
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = "../../escaped"
    error, _ = failure(FolderSink(tmp_path / "out").store, ds, data)
    assert error.code is ExportCode.INVALID_EXPORT
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escaped.dcm").exists()


def test_folder_sink_on_a_file_is_refused_at_construction(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(ValueError):
        FolderSink(tmp_path / "a-file")
