"""`cxr produce scp` end to end: a modality (pynetdicom's storage SCU) sends the sixteen real X-rays, each in its
own transfer syntax, to the receiver running as its own process against the real broker; the references it
publishes are scored by the real job; callers that are not allowed are refused; a receiver SIGKILLed in the
middle of an association loses nothing the modality was told was stored; a full disk refuses associations.

Issue 9, item 5: the same DICOM instance scores the same whether it arrives through the receiver, through
Orthanc and DICOMweb, or as a file. One scoring job (module-scoped) scores all three ways at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pydicom
import pytest
from kafka import KafkaProducer
from pydantic import SecretStr
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from orthanc_server import CT_STORAGE, ChestDicom, non_chest_dicom
from probes import read_records
from streaming.broker import free_port
from streaming.contracts import Reference
from streaming.pipeline import ScoringJob
from streams import JobProcess
from xray_files import PATIENT_ID, PATIENT_NAME, encoder_available

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUR_AET = "CXR_STREAM"
MODALITY = "MODALITY"
#: Allowed, but only from an address the tests do not call from.
ELSEWHERE = "OTHER"
SUCCESS = 0x0000


# ------------------------------------------------------------------------------------------------ harness


class ScpProcess(JobProcess):
    """`cxr produce scp` in its own process group, its output appended to one log file across restarts."""

    command = ("produce", "scp")

    def __init__(self, env: dict[str, str], storage: Path, log_file: Path, port: int | None = None) -> None:
        self.storage = storage
        self.port = port or free_port()
        super().__init__(env, log_file, ("--port", str(self.port), "--ae-title", OUR_AET, "--storage", str(storage)))

    def start(self, ready_timeout_s: float = 60.0, *, by_echo: bool = True) -> ScpProcess:
        """Start it and wait until it answers C-ECHO (or, `by_echo` False, says that it listens)."""
        listening = self.log().count("listening on port") + 1
        super().start()
        assert self.process is not None
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the receiver exited ({self.process.returncode}): {self.log()}"
            if echo(self.port) == SUCCESS if by_echo else self.log().count("listening on port") >= listening:
                return self
            time.sleep(0.2)
        raise AssertionError(f"the receiver was not ready within {ready_timeout_s:.0f} s: {self.log()}")


def scp_env(bootstrap: str, topic: str, root: Path, state_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CXR_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "CXR_INPUT_TOPIC": topic,
        "CXR_ALLOWED_ROOTS": str(root),
        "CXR_SCP_ALLOWED_CALLERS": f"{MODALITY}@127.0.0.1,{ELSEWHERE}@10.1.2.3",
        "CXR_STATE_DIR": str(state_dir),
        **extra,
    }


def modality(
    calling: str = MODALITY,
    syntaxes: set[str] | None = None,
    sop_classes: set[str] | None = None,
    timeout_s: float = 30.0,
) -> Any:
    """A storage SCU proposing one presentation context per (SOP class, transfer syntax) it will send."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    for sop_class in sorted(sop_classes or set()):
        for syntax in sorted(syntaxes or set()):
            ae.add_requested_context(sop_class, [syntax])
    return ae


def echo(port: int, calling: str = MODALITY) -> int | None:
    assoc = modality(calling).associate("127.0.0.1", port, ae_title=OUR_AET)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def dataset(dicom: ChestDicom) -> pydicom.Dataset:
    return pydicom.dcmread(BytesIO(dicom.data))


def send(
    port: int,
    dicoms: list[ChestDicom],
    statuses: dict[str, int | None] | None = None,
    calling: str = MODALITY,
    timeout_s: float = 30.0,
) -> dict[str, int | None]:
    """C-STORE each instance in its own transfer syntax over one association; the status of each (None: none)."""
    statuses = {} if statuses is None else statuses
    classes = {str(dataset(d).SOPClassUID) for d in dicoms}
    ae = modality(calling, {d.transfer_syntax for d in dicoms}, classes, timeout_s)
    assoc = ae.associate("127.0.0.1", port, ae_title=OUR_AET)
    assert assoc.is_established, "the receiver refused the modality"
    try:
        for dicom in dicoms:
            try:
                answer = assoc.send_c_store(dataset(dicom))
            except RuntimeError:  # the association is gone (the receiver was killed)
                answer = pydicom.Dataset()
            statuses[dicom.sop_instance_uid] = int(answer.Status) if "Status" in answer else None
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def refused(port: int, calling: str = MODALITY, called: str = OUR_AET) -> tuple[int, int, int] | None:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ, or None when the association was accepted."""
    assoc = modality(calling).associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected, "neither accepted nor rejected"
    answer = assoc.acceptor.primitive
    return (answer.result, answer.result_source, answer.diagnostic)


def references(bootstrap: str, topic: str, at_least: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    records = read_records(bootstrap, [topic], at_least or None, timeout_s)
    return [json.loads(r.value) | {"_key": r.key.decode() if r.key else None} for r in records]


def path_of(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


def new_topics(kafka_broker: Any, prefix: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    names = {k: f"{prefix}.{k}.{suffix}" for k in ("input_topic", "results_topic", "dead_letter_topic")}
    kafka_broker.create_topics(names.values(), partitions=2)
    return names


# ------------------------------------------------------------------------------------------- the main run


def ct_slice() -> ChestDicom:
    data = non_chest_dicom()
    ds = pydicom.dcmread(BytesIO(data))
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    return ChestDicom("ct", data, *uids, transfer_syntax=str(ds.file_meta.TransferSyntaxUID))


@dataclass
class Received:
    scp: ScpProcess
    root: Path
    statuses: dict[str, int | None]
    refs: list[dict[str, Any]]
    topics: dict[str, str]


@pytest.fixture(scope="module")
def received(kafka_broker: Any, chest_dicoms: list[ChestDicom], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The receiver, and the sixteen X-rays a modality sent it."""
    tmp = tmp_path_factory.mktemp("scp")
    root = tmp / "root"
    topics = new_topics(kafka_broker, "scp")
    env = scp_env(kafka_broker.bootstrap_servers, topics["input_topic"], root, tmp / "state")
    scp = ScpProcess(env, root / "storage", tmp / "scp.log").start()
    try:
        statuses = send(scp.port, [ct_slice()])  # not a chest X-ray: stored, never announced
        statuses.update(send(scp.port, chest_dicoms))
        refs = references(kafka_broker.bootstrap_servers, topics["input_topic"], len(chest_dicoms))
        yield Received(scp, root, statuses, refs, topics)
    finally:
        scp.stop()


def test_every_instance_is_stored_as_sent_and_announced(received: Received, chest_dicoms: list[ChestDicom]) -> None:
    syntaxes = {JPEGBaseline8Bit, ExplicitVRLittleEndian} | (
        {JPEG2000Lossless} if encoder_available(JPEG2000Lossless) else set()
    )
    assert {d.transfer_syntax for d in chest_dicoms} == syntaxes  # as modalities send them
    assert set(received.statuses.values()) == {SUCCESS}, received.scp.log()
    assert {d.sop_instance_uid for d in chest_dicoms} <= set(received.statuses)
    by_sop = {ref["sop_instance_uid"]: ref for ref in received.refs}
    assert len(received.refs) == len(by_sop) == len(chest_dicoms)
    storage = (received.root / "storage").resolve()
    for dicom in chest_dicoms:
        ref = by_sop[dicom.sop_instance_uid]
        assert ref["schema"] == "cxr.reference/v1"
        assert (ref["study_uid"], ref["series_uid"]) == (dicom.study_uid, dicom.series_uid)
        assert ref["_key"] == dicom.study_uid
        assert (ref["modality"], ref["view_position"]) == ("DX", "PA") and ref["accession"].startswith("ACC")
        path = path_of(ref["uri"])
        assert path == storage / dicom.study_uid / dicom.series_uid / f"{dicom.sop_instance_uid}.dcm"
        stored, original = pydicom.dcmread(path), dataset(dicom)
        assert stored.file_meta.TransferSyntaxUID == dicom.transfer_syntax  # kept as sent, not transcoded
        assert stored.PixelData == original.PixelData
        assert stored.PatientName == PATIENT_NAME  # stored whole
    leftovers = [p for p in storage.rglob("*") if p.is_file() and not p.name.endswith(".dcm")]
    assert leftovers == []  # no temporary files


def test_what_is_not_a_chest_x_ray_is_stored_but_not_announced(received: Received, kafka_broker: Any) -> None:
    stored = [p for p in (received.root / "storage").rglob("*.dcm") if pydicom.dcmread(p).SOPClassUID == CT_STORAGE]
    assert len(stored) == 1
    storage_uri = (received.root / "storage").resolve().as_uri()
    everything = references(kafka_broker.bootstrap_servers, received.topics["input_topic"], 0)
    announced = [ref for ref in everything if ref["uri"].startswith(storage_uri)]  # not the three-ways test's
    assert len(announced) == 16 and all(ref["modality"] == "DX" for ref in announced)


def test_c_echo_answers(received: Received) -> None:
    assert echo(received.scp.port) == SUCCESS


def test_a_second_receiver_on_the_same_port_exits_2_saying_so(received: Received, tmp_path: Path) -> None:
    env = {**received.scp.env, "CXR_STATE_DIR": str(tmp_path / "state")}
    second = ScpProcess(env, received.root / "storage", tmp_path / "second.log", port=received.scp.port)
    JobProcess.start(second)
    assert second.wait_exit(60) == 2, second.log()  # a configuration to fix, not a crash
    assert f"cannot listen on port {received.scp.port}" in second.log() and "in use" in second.log()
    assert echo(received.scp.port) == SUCCESS  # the first one is unharmed


def test_callers_that_are_not_allowed_are_refused(received: Received, chest_dicoms: list[ChestDicom]) -> None:
    port = received.scp.port
    calling_not_recognised = (0x01, 0x01, 0x03)
    assert refused(port, calling="STRANGER") == calling_not_recognised
    assert refused(port, calling=ELSEWHERE) == calling_not_recognised  # allowed only from 10.1.2.3
    assert refused(port, called="SOMEONE_ELSE") == (0x01, 0x01, 0x07)  # called AE title not ours
    assert refused(port) is None


def test_patient_data_stays_out_of_the_receivers_log(received: Received, chest_dicoms: list[ChestDicom]) -> None:
    log = received.scp.log()
    assert "association from MODALITY@127.0.0.1 accepted" in log
    assert "association from STRANGER@127.0.0.1 refused: calling AE title not recognised" in log
    for dicom in chest_dicoms:
        for secret in (dicom.sop_instance_uid, dicom.study_uid, dicom.series_uid):
            assert secret not in log
    assert PATIENT_NAME not in log and PATIENT_ID not in log


# --------------------------------------------------------------------------- item 5: three ways, one score


@dataclass
class Scored:
    by_way: dict[str, dict[str, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    dead: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def scored(
    received: Received,
    kafka_broker: Any,
    orthanc: Any,
    chest_dicoms: list[ChestDicom],
    spark: Any,
    spark_settings: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Scored:
    """One scoring job over the same sixteen instances as files, through the receiver and through Orthanc."""
    tmp = tmp_path_factory.mktemp("three-ways")
    files = tmp / "files"
    files.mkdir()
    way_of: dict[str, tuple[str, str]] = {}  # event id → (way, SOP instance UID)
    refs: list[Reference] = []
    for dicom in chest_dicoms:
        path = files / f"{dicom.name}.dcm"
        path.write_bytes(dicom.data)
        orthanc.upload(dicom.data)
        uids = {
            "study_uid": dicom.study_uid,
            "series_uid": dicom.series_uid,
            "sop_instance_uid": dicom.sop_instance_uid,
        }
        for way, uri in [
            ("file", path.as_uri()),
            ("dicomweb", orthanc.wado_url(dicom.study_uid, dicom.series_uid, dicom.sop_instance_uid)),
        ]:
            ref = Reference(event_id=str(uuid.uuid4()), uri=uri, **uids)
            refs.append(ref)
            way_of[ref.event_id] = (way, dicom.sop_instance_uid)
    for announced in received.refs:
        way_of[announced["event_id"]] = ("scp", announced["sop_instance_uid"])

    topics = received.topics  # the receiver's references are already on the input topic
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers, acks="all")
    for ref in refs:
        producer.send(topics["input_topic"], key=ref.key.encode(), value=ref.to_json().encode())
    producer.flush()
    producer.close()

    settings = spark_settings.model_copy(
        update={
            **topics,
            "checkpoint_dir": tmp / "checkpoint",
            "allowed_roots": [files.resolve(), received.root.resolve()],
            "dicomweb_allowed_hosts": [orthanc.host_port],
            "dicomweb_username": orthanc.username,
            "dicomweb_password": SecretStr(orthanc.password),
            "dicomweb_token": None,
            "max_offsets_per_trigger": 1000,
        }
    )
    job = ScoringJob.create(settings, spark)
    job.start()
    try:
        outputs = [topics["results_topic"], topics["dead_letter_topic"]]
        records = read_records(kafka_broker.bootstrap_servers, outputs, len(way_of), timeout_s=180)
    finally:
        job.stop()
    outcome = Scored()
    for record in records:
        body = json.loads(record.value)
        if record.topic == topics["dead_letter_topic"]:
            outcome.dead.append(body)
            continue
        way, sop = way_of[body["event_id"]]
        outcome.by_way[way][sop] = body["scores"]
    return outcome


def test_the_same_instance_scores_the_same_through_the_receiver_dicomweb_and_a_file(
    scored: Scored, chest_dicoms: list[ChestDicom]
) -> None:
    assert scored.dead == []
    sops = {d.sop_instance_uid for d in chest_dicoms}
    assert {way: set(scores) for way, scores in scored.by_way.items()} == {
        "file": sops,
        "scp": sops,
        "dicomweb": sops,
    }
    for sop in sops:
        reference = scored.by_way["file"][sop]
        for way in ("scp", "dicomweb"):
            assert scored.by_way[way][sop] == pytest.approx(reference, abs=1e-6), (way, sop)


# ------------------------------------------------------------------------------------ crashes and disks


def test_a_receiver_killed_mid_association_loses_nothing_it_acknowledged(
    kafka_broker: Any, chest_dicoms: list[ChestDicom], tmp_path: Path
) -> None:
    topic = new_topics(kafka_broker, "scp-kill")["input_topic"]
    root = tmp_path / "root"
    env = scp_env(kafka_broker.bootstrap_servers, topic, root, tmp_path / "state")
    scp = ScpProcess(env, root / "storage", tmp_path / "scp.log").start()
    statuses: dict[str, int | None] = {}
    # (a short DIMSE timeout: the modality notices the dead receiver sooner)
    sender = threading.Thread(target=send, args=(scp.port, chest_dicoms, statuses, MODALITY, 3.0), daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    while sum(s == SUCCESS for s in list(statuses.values())) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    scp.kill()  # SIGKILL while the modality is still sending
    sender.join(60)
    assert not sender.is_alive()
    acknowledged = {sop for sop, status in statuses.items() if status == SUCCESS}
    assert 5 <= len(acknowledged) < len(chest_dicoms), f"the kill did not land mid-association: {statuses}"

    def check(refs: list[dict[str, Any]], sops: set[str]) -> dict[str, set[str]]:
        event_ids: dict[str, set[str]] = defaultdict(set)
        for ref in refs:
            event_ids[ref["sop_instance_uid"]].add(ref["event_id"])
            assert pydicom.dcmread(path_of(ref["uri"])).SOPInstanceUID == ref["sop_instance_uid"]
        assert sops <= set(event_ids), "an instance the modality was told was stored is not announced"
        return event_ids

    check(references(kafka_broker.bootstrap_servers, topic, len(acknowledged)), acknowledged)

    # The modality sends the rest again once the receiver is back (same port).
    scp.start()
    try:
        rest = [d for d in chest_dicoms if d.sop_instance_uid not in acknowledged]
        again = send(scp.port, rest)
        assert set(again.values()) == {SUCCESS}
    finally:
        assert scp.stop() == 0
    every = {d.sop_instance_uid for d in chest_dicoms}
    event_ids = check(references(kafka_broker.bootstrap_servers, topic, 0), every)
    # An instance announced just before the kill but never answered was sent again: same bytes, same event id.
    assert all(len(ids) == 1 for ids in event_ids.values()), event_ids
    stored = sorted(p for p in (root / "storage").rglob("*") if p.is_file())
    # A write the kill cut short may leave its hidden temporary file; never a half-written instance.
    assert [p.name for p in stored if not p.name.endswith(".dcm") and not p.name.startswith(".")] == []
    stored = [p for p in stored if p.name.endswith(".dcm") and not p.name.startswith(".")]
    assert {p.stem for p in stored} == every


def test_a_storage_low_on_space_refuses_associations_and_a_clean_stop_exits_0(
    kafka_broker: Any, tmp_path: Path
) -> None:
    topic = new_topics(kafka_broker, "scp-full")["input_topic"]
    root = tmp_path / "root"
    env = scp_env(kafka_broker.bootstrap_servers, topic, root, tmp_path / "state", CXR_SCP_MIN_FREE_BYTES=str(10**18))
    scp = ScpProcess(env, root / "storage", tmp_path / "scp.log").start(by_echo=False)  # C-ECHO is refused too
    assert refused(scp.port) == (0x02, 0x03, 0x02), scp.log()  # transient: local limit exceeded
    assert scp.stop() == 0
    assert "published 0 reference(s)" in scp.log() and "local limit exceeded" in scp.log()


def test_storage_outside_the_allowed_roots_refuses_to_start(kafka_broker: Any, tmp_path: Path) -> None:
    env = scp_env(kafka_broker.bootstrap_servers, "unused", tmp_path / "root", tmp_path / "state")
    scp = ScpProcess(env, tmp_path / "elsewhere", tmp_path / "scp.log")
    JobProcess.start(scp)
    assert scp.wait_exit(60) == 2
    assert "not inside CXR_ALLOWED_ROOTS" in scp.log()
