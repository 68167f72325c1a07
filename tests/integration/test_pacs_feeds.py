"""The PACS feeds against a real Orthanc (with its DICOMweb plugin) and the real broker: `cxr produce orthanc`
and `cxr produce dicomweb` as processes, SIGKILLed in the middle of uploads and started again, announce every
new chest X-ray, none of what was there before (`--from-now`), none that is not a chest X-ray, and repeat any
announcement under the same event id; Orthanc going away and coming back costs nothing. End to end, the
references the Orthanc feed publishes are scored by the real job exactly like the same DICOM files from disk.

The Orthanc is shared by the whole test run, so these tests never assume it is empty: every instance they
upload has fresh UIDs, and they look only at their own."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import SecretStr

from orthanc_server import ChestDicom, OrthancServer, chest_xray_dicoms, non_chest_dicom
from probes import read_records
from producers.folder import reference_for as file_reference
from producers.pacs import event_id_for
from producers.publish import ReferencePublisher
from producers.state import state_file
from streaming.pipeline import ScoringJob
from streaming.settings import Settings
from streams import JobProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PATIENT_DATA = ("Doe^Jane", "PID-0042-SECRET")


class Follower(JobProcess):
    """`cxr produce <feed> URL` in its own process group, its output appended to one log file across restarts."""

    def __init__(self, feed: str, url: str, env: dict[str, str], log_file: Path) -> None:
        super().__init__(env, log_file)
        self.command, self.url = ("produce", feed), url

    def start(self, *flags: str) -> Follower:
        self.args = (self.url, *flags)
        super().start()
        return self


def feed_env(kafka_broker: Any, topics: dict[str, str], state: Path, orthanc: OrthancServer) -> dict[str, str]:
    return {
        **os.environ,
        **orthanc.env(),
        "CXR_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap_servers,
        "CXR_INPUT_TOPIC": topics["input_topic"],
        "CXR_STATE_DIR": str(state),
        "CXR_FEED_POLL_INTERVAL_S": "0.2",
        "CXR_FEED_REQUEST_TIMEOUT_S": "10",
    }


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, log: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; log:\n{log()[-4000:]}")


def announced(kafka_broker: Any, topic: str, at_least: int = 0, timeout_s: float = 2.0) -> list[tuple[str, dict]]:
    """(key, reference) of every message on `topic`, once there are `at_least` (or the time is up)."""
    records = read_records(kafka_broker.bootstrap_servers, [topic], at_least or None, timeout_s)
    return [(r.key.decode(), json.loads(r.value)) for r in records]


def wait_for_sops(kafka_broker: Any, topic: str, sops: set[str], timeout_s: float) -> list[tuple[str, dict]]:
    """Read until every SOP instance UID in `sops` has been announced."""
    deadline = time.monotonic() + timeout_s
    while True:
        every = announced(kafka_broker, topic)
        if sops <= {ref.get("sop_instance_uid") for _, ref in every} or time.monotonic() > deadline:
            return every
        time.sleep(0.5)


def upload_slowly(orthanc: OrthancServer, items: Iterable[bytes], gap_s: float) -> threading.Thread:
    """Uploads from a thread, one every `gap_s`, as a modality sending a series would."""

    def run() -> None:
        for data in items:
            orthanc.upload(data)
            time.sleep(gap_s)

    thread = threading.Thread(target=run, name="uploads", daemon=True)
    thread.start()
    return thread


def dx_with_a_ct_storage_class() -> bytes:
    """A 'DX' instance stored as CT: found by a DX search, skipped on its SOP class."""
    ds = pydicom.dcmread(BytesIO(non_chest_dicom()))
    ds.Modality = "DX"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def check_announcements(
    every: list[tuple[str, dict]], fresh: list[ChestDicom], orthanc: OrthancServer, others: set[str]
) -> None:
    """Each fresh instance announced (perhaps more than once), always under its one event id; nothing else."""
    by_sop = {d.sop_instance_uid: d for d in fresh}
    mine = [(key, ref) for key, ref in every if ref.get("sop_instance_uid") in by_sop]
    assert len(mine) >= 16 + 3  # what the first run announced was announced again after the rewound cursor
    assert not [ref for _, ref in every if ref.get("sop_instance_uid") in others], "announced what it should skip"
    assert {ref["sop_instance_uid"] for _, ref in mine} == set(by_sop)
    ids: dict[str, set[str]] = defaultdict(set)
    for key, ref in mine:
        dicom = by_sop[ref["sop_instance_uid"]]
        assert ref["schema"] == "cxr.reference/v1"
        assert ref["uri"] == orthanc.wado_url(dicom.study_uid, dicom.series_uid, dicom.sop_instance_uid)
        assert (ref["study_uid"], ref["series_uid"]) == (dicom.study_uid, dicom.series_uid)
        assert (ref["modality"], ref["view_position"]) == ("DX", "PA")
        assert ref["accession"].startswith("ACC") and ref["sent_at"].endswith("Z")
        assert key == dicom.study_uid
        ids[ref["sop_instance_uid"]].add(ref["event_id"])
    assert all(len(event_ids) == 1 for event_ids in ids.values()), "an instance was announced under two ids"
    assert len({ref["event_id"] for _, ref in mine}) == 16
    for sop, (event_id,) in ids.items():
        assert event_id == event_id_for(orthanc.dicomweb_root, sop)


def kill_and_restart(
    kafka_broker: Any,
    topics: dict[str, str],
    orthanc: OrthancServer,
    sample_jpegs: list[Path],
    tmp_path: Path,
    feed: str,
    skipped: bytes,
    rewind: Callable[[list[ChestDicom], dict[str, Any], dict[str, Any]], dict[str, Any]],
    outage: bool,
) -> tuple[Follower, Path]:
    """The kill test of one feed: two instances there before it starts, sixteen fresh ones and one to skip
    uploaded around a SIGKILL and a restart. Returns the follower (its log) and its cursor file.

    Start from now, kill mid-uploads, upload while down, restart with --from-start (the cursor must win). After
    the kill the cursor is put back (`rewind(fresh, first, now)`) to where it was when the first run began: as
    if every commit of that run had been cut off after Kafka acknowledged, the worst-timed kill, which a real
    SIGKILL hits only by luck. Everything the first run announced is then announced again."""
    before = chest_xray_dicoms(sample_jpegs[:2])
    for dicom in before:  # already there: --from-now must not announce them
        orthanc.upload(dicom.data)
    fresh = chest_xray_dicoms(sample_jpegs)
    url = orthanc.url if feed == "orthanc" else orthanc.dicomweb_root
    env = feed_env(kafka_broker, topics, tmp_path / "state", orthanc)
    follower = Follower(feed, url, env, tmp_path / f"{feed}-feed.log")
    cursor = state_file(tmp_path / "state", feed, url)
    topic = topics["input_topic"]
    try:
        follower.start("--from-now")
        wait_for(cursor.exists, 60, "the first run's cursor", follower.log)
        first = json.loads(cursor.read_text())
        uploads = upload_slowly(orthanc, [*(d.data for d in fresh[:4]), skipped, *(d.data for d in fresh[4:10])], 0.4)
        wait_for(lambda: len(announced(kafka_broker, topic, 3, 1.0)) >= 3, 60, "the first references", follower.log)
        follower.kill()  # in the middle of the uploads
        assert uploads.is_alive(), "the uploads finished before the kill: nothing was in flight"
        cursor.write_text(json.dumps(rewind(fresh, first, json.loads(cursor.read_text()))))
        uploads.join(60)
        for dicom in fresh[10:12]:  # arrive while the feed is down
            orthanc.upload(dicom.data)
        follower.start("--from-start")
        if outage:  # Orthanc goes away and comes back: the feed waits, keeps its cursor, and carries on
            orthanc.stop()
            try:
                wait_for(lambda: "does not answer" in follower.log(), 30, "the outage warning", follower.log)
            finally:
                orthanc.start()
        upload_slowly(orthanc, (d.data for d in fresh[12:]), 0.05).join(60)
        wait_for_sops(kafka_broker, topic, {d.sop_instance_uid for d in fresh}, 90)
        time.sleep(1.0)  # anything announced twice has arrived by now
        assert follower.stop() == 0, follower.log()[-3000:]
    finally:
        if follower.process is not None and follower.process.poll() is None:
            follower.kill()
    check_announcements(announced(kafka_broker, topic), fresh, orthanc, {d.sop_instance_uid for d in before})
    log = follower.log()
    assert "flag is ignored" in log  # the restart with --from-start resumed from its cursor
    assert "skipped 1 not a chest X-ray" in log
    assert "Traceback" not in log
    for secret in (*PATIENT_DATA, *(d.sop_instance_uid for d in fresh), *(d.study_uid for d in fresh)):
        assert secret not in log
    return follower, cursor


def test_the_orthanc_feed_announces_every_new_chest_x_ray_across_a_kill(
    kafka_broker: Any, topics: dict[str, str], orthanc: OrthancServer, sample_jpegs: list[Path], tmp_path: Path
) -> None:
    def rewind(fresh: list[ChestDicom], first: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
        return first

    _, cursor = kill_and_restart(
        kafka_broker, topics, orthanc, sample_jpegs, tmp_path, "orthanc", non_chest_dicom(), rewind, outage=False
    )
    assert json.loads(cursor.read_text())["last_seq"] <= orthanc.last_change()


def test_the_dicomweb_feed_announces_every_new_chest_x_ray_across_a_kill_and_an_outage(
    kafka_broker: Any, topics: dict[str, str], orthanc: OrthancServer, sample_jpegs: list[Path], tmp_path: Path
) -> None:
    def rewind(fresh: list[ChestDicom], first: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
        mine = {d.sop_instance_uid for d in fresh}
        return {**now, "seen": {uid: day for uid, day in now["seen"].items() if uid not in mine}}

    follower, cursor = kill_and_restart(
        kafka_broker, topics, orthanc, sample_jpegs, tmp_path, "dicomweb", dx_with_a_ct_storage_class(), rewind, True
    )
    log = follower.log()
    assert "does not answer" in log and "answers again" in log
    assert len(json.loads(cursor.read_text())["seen"]) >= 16 + 2


# ------------------------------------------------------------------------------------------------ end to end


def test_references_from_orthanc_score_exactly_like_the_same_files_from_disk(
    kafka_broker: Any,
    topics: dict[str, str],
    orthanc: OrthancServer,
    sample_jpegs: list[Path],
    spark: Any,
    spark_settings: Settings,
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    fresh = chest_xray_dicoms(sample_jpegs)
    files = []
    for dicom in fresh:
        path = root / f"{dicom.name}.dcm"
        path.write_bytes(dicom.data)
        files.append(path)
    settings = spark_settings.model_copy(
        update={
            **topics,
            "checkpoint_dir": tmp_path / "checkpoint",
            "allowed_roots": [root.resolve()],
            "dicomweb_allowed_hosts": [orthanc.host_port],
            "dicomweb_username": orthanc.username,
            "dicomweb_password": SecretStr(orthanc.password),
            "max_offsets_per_trigger": 1000,
        }
    )
    env = feed_env(kafka_broker, topics, tmp_path / "state", orthanc)
    follower = Follower("orthanc", orthanc.url, env, tmp_path / "orthanc-feed.log")
    follower.start("--from-now")
    job = None
    try:
        wait_for(state_file(tmp_path / "state", "orthanc", orthanc.url).exists, 60, "the cursor", follower.log)
        for dicom in fresh:
            orthanc.upload(dicom.data)
        with ReferencePublisher.for_settings(settings) as publisher:
            publisher.send_all(file_reference(path, "dicom") for path in files)
        job = ScoringJob.create(settings, spark)
        job.start()
        outputs = [topics["results_topic"], topics["dead_letter_topic"]]
        records = read_records(kafka_broker.bootstrap_servers, outputs, 32, timeout_s=240)
    finally:
        if job is not None:
            job.stop()
        follower.stop()
    bodies = [json.loads(r.value) for r in records]
    dead = [b for b in bodies if b["schema"] == "cxr.dead-letter/v1"]
    assert not dead, [(d["stage"], d["error"], d["reason"]) for d in dead]
    by_sop: dict[str, dict[str, dict]] = defaultdict(dict)
    for result in bodies:
        by_sop[result["sop_instance_uid"]][result["uri"].split(":", 1)[0]] = result
    assert set(by_sop) == {d.sop_instance_uid for d in fresh}
    for dicom in fresh:
        pair = by_sop[dicom.sop_instance_uid]
        assert set(pair) == {"http", "file"}, pair.keys()
        web, disk = pair["http"], pair["file"]
        assert web["uri"] == orthanc.wado_url(dicom.study_uid, dicom.series_uid, dicom.sop_instance_uid)
        assert web["study_uid"] == dicom.study_uid and web["accession"].startswith("ACC")
        for label, score in disk["scores"].items():
            assert web["scores"][label] == pytest.approx(score, abs=1e-6), (dicom.name, dicom.transfer_syntax)
        assert (web["priority"], web["top_finding"]) == (disk["priority"], disk["top_finding"])
