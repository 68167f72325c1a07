"""The exporters end to end: the sixteen real X-rays, as DICOM in a real Orthanc, scored by the real job on the
shared Spark session, exported as FHIR bundles (validated by fhir.resources) and as DICOM SRs that Orthanc files
into each image's study; restarts resume from the cursor, replays store nothing twice, and what cannot be
exported is a dead letter with its reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from kafka import KafkaProducer
from pydantic import SecretStr

from exporters.cursor import ExportCursor
from exporters.metrics import ExportMetrics
from exporters.runner import ExportRunner, KafkaOut
from exporters.service import make_exporter
from hostile_servers import MisbehavingServer, never_answers
from orthanc_server import ChestDicom, OrthancServer, chest_xray_dicoms
from probes import read_records, wait_for
from producers.publish import ReferencePublisher
from streaming.contracts import Reference
from streaming.fetch import fetch
from streaming.pipeline import ScoringJob
from streaming.scoring import scoring_config
from streaming.settings import Settings
from xray_files import PATIENT_ID, PATIENT_NAME

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass(frozen=True)
class Scored:
    settings: Settings
    dicoms: list[ChestDicom]
    #: the results as the job wrote them, by SOP instance UID
    results: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def scored(
    kafka_broker: Any, orthanc: OrthancServer, sample_jpegs: list[Path], spark: Any, spark_settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Scored:  # fmt: skip
    """The sixteen X-rays stored in Orthanc, announced by DICOMweb references and scored by the real job."""
    suffix = uuid.uuid4().hex[:8]
    topics = {
        "input_topic": f"test.references.{suffix}",
        "results_topic": f"test.results.{suffix}",
        "dead_letter_topic": f"test.dead-letter.{suffix}",
        "fhir_topic": f"test.fhir.{suffix}",
        "export_dead_letter_topic": f"test.export-dead-letter.{suffix}",
    }
    kafka_broker.create_topics(topics.values(), partitions=2)
    work = tmp_path_factory.mktemp("exporters")
    settings = spark_settings.model_copy(
        update={
            **topics,
            "checkpoint_dir": work / "checkpoint",
            "state_dir": work / "state",
            "dicomweb_allowed_hosts": [orthanc.host_port],
            "dicomweb_username": orthanc.username,
            "dicomweb_password": SecretStr(orthanc.password),
            "max_offsets_per_trigger": 1000,
            "export_timeout_s": 10.0,
            "export_retry_max_s": 1.0,
        }
    )
    dicoms = chest_xray_dicoms(sample_jpegs)
    for dicom in dicoms:
        orthanc.upload(dicom.data)
    refs = [
        Reference(
            event_id=str(uuid.uuid4()),
            uri=orthanc.wado_url(d.study_uid, d.series_uid, d.sop_instance_uid),
            study_uid=d.study_uid,
            series_uid=d.series_uid,
            sop_instance_uid=d.sop_instance_uid,
            accession=f"ACC{i:04d}",
            modality="DX",
        )
        for i, d in enumerate(dicoms)
    ]
    with ReferencePublisher.for_settings(settings) as publisher:
        publisher.send_all(refs)
    job = ScoringJob.create(settings, spark)
    job.start()
    try:
        outputs = [topics["results_topic"], topics["dead_letter_topic"]]
        records = read_records(kafka_broker.bootstrap_servers, outputs, len(refs), timeout_s=240)
    finally:
        job.stop()
    bodies = [json.loads(r.value) for r in records]
    dead = [b for b in bodies if b["schema"] != "cxr.result/v1"]
    assert not dead, [(d["stage"], d["error"], d["reason"]) for d in dead]
    return Scored(settings, dicoms, {b["sop_instance_uid"]: b for b in bodies})


class Running:
    """One exporter on its own thread, stopped (and its cursor saved) on leaving the block."""

    def __init__(self, kind: str, settings: Settings) -> None:
        self.stop = threading.Event()
        out = KafkaOut(settings)
        self.metrics = ExportMetrics(kind)
        self.runner = ExportRunner(settings, make_exporter(kind, settings, out), self.metrics, out)
        self.thread = threading.Thread(target=self.runner.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the exporter did not stop"

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, {"exporter": self.runner.exporter.name, **labels})
        return value or 0.0

    def count(self, outcome: str) -> float:
        return self.sample("cxr_export_results_total", outcome=outcome)


def _records(settings: Settings, topic: str, n: int | None = None, timeout_s: float = 120) -> list[Any]:
    return read_records(settings.kafka_bootstrap_servers, [topic], n, timeout_s)


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_every_result_becomes_a_valid_fhir_bundle_that_names_its_study_and_model(scored: Scored) -> None:
    settings = scored.settings
    with Running("fhir", settings) as running:
        bundles = _records(settings, settings.fhir_topic, len(scored.results))
        assert wait_for(lambda: running.count("exported") >= len(scored.results), 30)
    assert len(bundles) == len(scored.results)
    for record in bundles:
        bundle = json.loads(record.value)
        Bundle.model_validate(bundle)  # the library's own R4B validation
        assert record.key.decode() == bundle["id"]
        report = _resources(bundle, "DiagnosticReport")[0]
        study_uid = report["imagingStudy"][0]["identifier"]["value"].removeprefix("urn:oid:")
        result = next(r for r in scored.results.values() if r["study_uid"] == study_uid)
        assert report["status"] == "preliminary"
        assert "AI" in report["conclusion"] and result["model"]["name"] in report["conclusion"]
        observations = _resources(bundle, "Observation")
        assert len(observations) == len(result["scores"])
        values = sorted(o["valueQuantity"]["value"] for o in observations)
        assert values == pytest.approx(sorted(result["scores"].values()), abs=1e-6)
        (device,) = _resources(bundle, "Device")
        assert device["deviceName"][0]["name"] == result["model"]["name"]
        assert device["version"][0]["value"] == result["model"]["version"]
        (task,) = _resources(bundle, "Task")
        assert task["priority"] == result["priority"].lower()
        for entry in bundle["entry"]:
            assert any(s["code"] == "AIAST" for s in entry["resource"]["meta"]["security"])
        assert PATIENT_NAME not in record.value.decode() and PATIENT_ID not in record.value.decode()


def test_the_fhir_exporter_resumes_from_its_cursor_and_dead_letters_what_it_cannot_read(scored: Scored) -> None:
    settings = scored.settings.model_copy(update={"state_dir": scored.settings.state_dir.parent / "fhir-restart"})
    before = len(_records(settings, settings.fhir_topic))
    with Running("fhir", settings) as running:
        assert wait_for(lambda: running.count("exported") >= len(scored.results), 120)
    first = _records(settings, settings.fhir_topic)
    assert len(first) == before + len(scored.results)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    producer.send(settings.results_topic, key=b"x", value=b"\xff\xfe not json")
    producer.send(settings.results_topic, key=b"y", value=b'{"schema": "cxr.result/v1", "event_id": "e-bad"}')
    producer.flush()
    producer.close()
    with Running("fhir", settings) as running:  # a restart: only what came after the cursor
        letters = _records(settings, settings.export_dead_letter_topic, 2, timeout_s=60)
        assert wait_for(lambda: running.count("dead_letter") >= 2, 30)
        assert running.count("exported") == 0
    assert len(_records(settings, settings.fhir_topic)) == len(first), "a restart exported results again"
    bodies = [json.loads(r.value) for r in letters]
    assert {b["schema"] for b in bodies} == {"cxr.export-dead-letter/v1"}
    assert {b["error"] for b in bodies} == {"unreadable_result"}
    assert {b["exporter"] for b in bodies} == {"fhir"}
    assert all(b["reason"] and b["source"]["topic"] == settings.results_topic for b in bodies)
    cursor = ExportCursor.open(settings.state_dir, "fhir", f"{settings.results_topic} → kafka:{settings.fhir_topic}")
    assert sum(cursor.offsets.values()) == len(scored.results) + 2


def _study_instances(orthanc: OrthancServer, study_uid: str) -> list[dict[str, Any]]:
    studies = [s for s in orthanc.get("/studies?expand") if s["MainDicomTags"].get("StudyInstanceUID") == study_uid]
    assert len(studies) == 1, f"{len(studies)} studies with the UID"
    return list(orthanc.get(f"/studies/{studies[0]['ID']}/instances?expand"))


def test_every_scored_instance_gets_an_sr_in_its_own_study_and_a_replay_adds_none(
    scored: Scored, orthanc: OrthancServer, tmp_path: Path
) -> None:
    settings = scored.settings.model_copy(
        update={"sr_stow_url": orthanc.dicomweb_root, "state_dir": tmp_path / "state", "sr_output_dir": tmp_path / "sr"}
    )
    with Running("sr", settings) as running:
        assert wait_for(lambda: running.count("exported") >= len(scored.results), 180), running.count("exported")
    policy = scoring_config(settings).fetch
    for dicom in scored.dicoms:
        instances = _study_instances(orthanc, dicom.study_uid)
        srs = [i for i in instances if i["MainDicomTags"]["SOPInstanceUID"] != dicom.sop_instance_uid]
        assert len(instances) == 2 and len(srs) == 1, [i["MainDicomTags"] for i in instances]
        series = orthanc.get(f"/series/{srs[0]['ParentSeries']}")
        sop = srs[0]["MainDicomTags"]["SOPInstanceUID"]
        data = fetch(orthanc.wado_url(dicom.study_uid, series["MainDicomTags"]["SeriesInstanceUID"], sop), policy)
        sr = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(BytesIO(data)))
        assert sr.StudyInstanceUID == dicom.study_uid and sr.PatientID == PATIENT_ID
        assert sr.VerificationFlag == "UNVERIFIED"
        result = scored.results[dicom.sop_instance_uid]
        measured = _certainties(sr)
        assert set(measured) == set(result["scores"])
        for label, score in result["scores"].items():
            assert measured[label] == pytest.approx(score * 100, abs=0.006)  # a percentage to 2 decimals
        assert dicom.sop_instance_uid in _referenced_instances(sr)
    assert len(list((tmp_path / "sr").glob("*.dcm"))) == len(scored.results)

    # A replay from scratch (no cursor) stores every SR again: Orthanc keeps one of each.
    (settings.state_dir).rename(tmp_path / "old-state")
    with Running("sr", settings) as running:
        assert wait_for(lambda: running.count("exported") >= len(scored.results), 180)
    for dicom in scored.dicoms:
        assert len(_study_instances(orthanc, dicom.study_uid)) == 2, "a replay stored a second SR"


def _certainties(sr: pydicom.Dataset) -> dict[str, float]:
    """Certainty of Feature per finding, read from the content tree with pydicom alone."""
    out: dict[str, float] = {}
    for item in _walk(sr):
        if getattr(item, "ValueType", None) != "CONTAINER" or not hasattr(item, "ContentSequence"):
            continue
        finding = certainty = None
        for child in item.ContentSequence:
            name = child.ConceptNameCodeSequence[0]
            if name.CodeValue == "121071" and hasattr(child, "ConceptCodeSequence"):  # Finding
                finding = child.ConceptCodeSequence[0].CodeMeaning
            if name.CodeValue == "111011":  # Certainty of Feature
                certainty = float(child.MeasuredValueSequence[0].NumericValue)
        if finding is not None and certainty is not None:
            out[finding.upper()] = certainty
    return out


def _referenced_instances(sr: pydicom.Dataset) -> set[str]:
    items = [i for i in _walk(sr) if hasattr(i, "ReferencedSOPSequence")]
    return {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in items}


def _walk(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _walk(item)


def test_cxr_export_stops_cleanly_on_sigterm_and_refuses_an_sr_export_with_nowhere_to_go(
    scored: Scored, tmp_path: Path
) -> None:
    settings = scored.settings
    env = {
        **os.environ,
        "CXR_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "CXR_RESULTS_TOPIC": settings.results_topic,
        "CXR_FHIR_TOPIC": settings.fhir_topic,
        "CXR_EXPORT_DEAD_LETTER_TOPIC": settings.export_dead_letter_topic,
        "CXR_STATE_DIR": str(tmp_path / "state"),
        "CXR_EXPORT_METRICS_PORT": "0",
    }
    nowhere = subprocess.run(
        [sys.executable, "-m", "streaming.cli", "export", "sr"], env=env, capture_output=True, text=True, timeout=120
    )
    assert nowhere.returncode == 2 and "--stow" in nowhere.stderr
    before = len(_records(settings, settings.fhir_topic))
    log = (tmp_path / "fhir.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streaming.cli", "export", "fhir"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        expected = before + len(scored.results)
        assert wait_for(lambda: len(_records(settings, settings.fhir_topic)) >= expected, 120), log_text(tmp_path)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = log_text(tmp_path)
    assert PATIENT_NAME not in text and PATIENT_ID not in text
    assert "ACC0" not in text, "an accession number reached the log"


def log_text(folder: Path) -> str:
    return (folder / "fhir.log").read_text(errors="replace")


class FhirEndpoint(ThreadingHTTPServer):
    """A FHIR server's transaction endpoint as far as the exporter can tell: it answers 503 while `down`, and
    otherwise keeps each entry's resource under its `Type/id` (a transaction of PUTs is an upsert), so a
    bundle delivered twice leaves one copy. No FHIR server can be installed here; the bundles themselves are
    validated by fhir.resources in the tests above."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _FhirHandler)
        self.down = True
        self.posts: list[str] = []
        self.stored: dict[str, dict[str, Any]] = {}
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/fhir"


class _FhirHandler(BaseHTTPRequestHandler):
    server: FhirEndpoint

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.down:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        bundle = json.loads(body)
        self.server.posts.append(bundle["id"])
        for entry in bundle["entry"]:
            self.server.stored[entry["request"]["url"]] = entry["resource"]
        answer = json.dumps({"resourceType": "Bundle", "type": "transaction-response"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_fhir_server_that_is_away_holds_the_exports_back_and_then_receives_them_all(
    scored: Scored, tmp_path: Path
) -> None:
    endpoint = FhirEndpoint()
    endpoint.thread.start()
    settings = scored.settings.model_copy(update={"state_dir": tmp_path / "state", "fhir_server_url": endpoint.url})
    try:
        with Running("fhir", settings) as running:
            assert wait_for(lambda: running.sample("cxr_export_retrying") == 1, 30)
            assert wait_for(lambda: running.sample("cxr_export_retries_total", error="unavailable") >= 3, 30)
            assert running.count("exported") == 0 and running.count("dead_letter") == 0 and not endpoint.posts
            endpoint.down = False
            assert wait_for(lambda: running.count("exported") >= len(scored.results), 120)
            assert wait_for(lambda: running.sample("cxr_export_retrying") == 0, 30)
    finally:
        endpoint.shutdown()
        endpoint.server_close()
    reports = [r for key, r in endpoint.stored.items() if key.startswith("DiagnosticReport/")]
    assert len(reports) == len(scored.results)
    studies = {r["imagingStudy"][0]["identifier"]["value"].removeprefix("urn:oid:") for r in reports}
    assert studies == {r["study_uid"] for r in scored.results.values()}
    assert len(set(endpoint.posts)) == len(scored.results)


def test_a_destination_that_never_answers_is_retried_within_bounds_and_never_holds_a_stop(
    scored: Scored, tmp_path: Path
) -> None:
    with MisbehavingServer(never_answers) as hostile:
        settings = scored.settings.model_copy(
            update={
                "state_dir": tmp_path / "state",
                "fhir_server_url": hostile.url("/fhir"),
                "export_timeout_s": 2.0,
            }
        )
        running = Running("fhir", settings)
        with running:
            assert wait_for(lambda: running.sample("cxr_export_retries_total", error="unavailable") >= 2, 30)
            started = time.monotonic()
            running.stop.set()
            running.thread.join(30)
            stopped_in = time.monotonic() - started
        assert stopped_in < settings.export_timeout_s + 5, stopped_in
        assert running.count("dead_letter") == 0
    cursor = ExportCursor.open(
        settings.state_dir, "fhir", f"{settings.results_topic} → {running.runner.exporter.destination}"
    )
    assert set(cursor.offsets.values()) == {0}, "the cursor passed a result that was never delivered"


def test_a_killed_sr_exporter_resumes_and_every_study_ends_with_exactly_one_sr(
    scored: Scored, orthanc: OrthancServer, tmp_path: Path
) -> None:
    """SIGKILL at whatever moment it lands, then a restart on the same cursor: nothing lost, nothing twice."""
    env = {
        **os.environ,
        "CXR_KAFKA_BOOTSTRAP_SERVERS": scored.settings.kafka_bootstrap_servers,
        "CXR_RESULTS_TOPIC": scored.settings.results_topic,
        "CXR_EXPORT_DEAD_LETTER_TOPIC": scored.settings.export_dead_letter_topic,
        "CXR_STATE_DIR": str(tmp_path / "state"),
        "CXR_DICOMWEB_ALLOWED_HOSTS": orthanc.host_port,
        "CXR_DICOMWEB_USERNAME": orthanc.username,
        "CXR_DICOMWEB_PASSWORD": orthanc.password,
    }
    out = tmp_path / "sr"
    command = [
        sys.executable,
        "-m",
        "streaming.cli",
        "export",
        "sr",
        "--stow",
        orthanc.dicomweb_root,
        "--out",
        str(out),
    ]
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_for(lambda: len(list(out.glob("*.dcm"))) >= 3, 120), (tmp_path / "first.log").read_text()
        finally:
            first.kill()
            first.wait(30)
    with (tmp_path / "second.log").open("w") as log:
        second = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_for(lambda: len(list(out.glob("*.dcm"))) >= len(scored.results), 120)
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0
        finally:
            if second.poll() is None:
                second.kill()
    for dicom in scored.dicoms:
        assert len(_study_instances(orthanc, dicom.study_uid)) == 2, "a study has no SR, or two"
    text = (tmp_path / "second.log").read_text()
    assert "(2 resumed from the cursor" in text and PATIENT_NAME not in text and PATIENT_ID not in text


def test_results_that_point_anywhere_else_become_dead_letters_and_the_sr_exporter_goes_on(
    scored: Scored, kafka_broker: Any, tmp_path: Path
) -> None:
    """A result is as hostile as a reference: its URI is read back only under the job's own rules."""
    suffix = uuid.uuid4().hex[:8]
    results, letters = f"test.results.hostile.{suffix}", f"test.export-dead-letter.hostile.{suffix}"
    kafka_broker.create_topics([results, letters], partitions=1)
    template = next(iter(scored.results.values()))
    hostile = {
        "file:///etc/passwd": "forbidden_uri",
        "file:///dev/zero": "forbidden_uri",
        "http://169.254.169.254/latest/meta-data": "forbidden_uri",
        "gopher://pacs/1": "unsupported_uri",
    }
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for index, uri in enumerate(hostile):
        body = {**template, "event_id": f"hostile-{index}", "uri": uri}
        producer.send(results, value=json.dumps(body).encode())
    producer.send(results, value=json.dumps({**template, "event_id": "jpeg", "sop_instance_uid": None}).encode())
    producer.flush()
    producer.close()
    settings = scored.settings.model_copy(
        update={
            "results_topic": results,
            "export_dead_letter_topic": letters,
            "state_dir": tmp_path / "state",
            "sr_output_dir": tmp_path / "sr",
        }
    )
    with Running("sr", settings) as running:
        bodies = [json.loads(r.value) for r in _records(settings, letters, len(hostile), timeout_s=60)]
        assert wait_for(lambda: running.count("skipped") == 1, 30)
    assert sorted(b["event_id"] for b in bodies) == sorted(f"hostile-{i}" for i in range(len(hostile)))
    assert {b["error"] for b in bodies} == {"source_unreadable"}
    for body in bodies:
        uri = json.loads(body["payload"])["uri"]
        assert f"({hostile[uri]})" in body["reason"], body["reason"]
    assert not list((tmp_path / "sr").glob("*"))
