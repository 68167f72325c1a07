"""The SR sinks against a real PACS: Orthanc with its DICOMweb plugin (the session's `orthanc` fixture).

A small DX image is uploaded first, as a modality would have sent it, and a Comprehensive SR about it (built
here with highdicom, so that it files into the image's study) goes back through STOW-RS and through C-STORE;
Orthanc then lists it in that study, once, however often it is stored. Destinations that are down or hold
their answer end each attempt as UNAVAILABLE within its timeout.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from exporters.cstore import CStoreSink
from exporters.errors import ExportCode, ExportError
from exporters.sinks import SrSink
from exporters.stow import StowSink
from hostile_servers import MisbehavingServer, drips_body, drips_headers, never_answers
from streaming.settings import basic_authorization
from xray_files import PATIENT_ID, PATIENT_NAME, dicom_bytes, image_dataset

pytestmark = [pytest.mark.integration]

TIMEOUT_S = 1.5
SLACK_S = 1.0
CALLING_AET = "CXR_STREAM"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture(scope="module")
def source_image(orthanc: Any) -> pydicom.Dataset:
    """A small DX image in a study of its own, stored in Orthanc as a modality would have sent it."""
    ds = image_dataset(np.zeros((16, 16), dtype=np.uint8))
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = time.strftime("%Y%m%d")
    ds.StudyTime = time.strftime("%H%M%S")
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC-SINKS"
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    orthanc.upload(dicom_bytes(ds))
    return ds


def comprehensive_sr(source: pydicom.Dataset) -> tuple[pydicom.Dataset, bytes]:
    """A minimal valid Comprehensive SR about `source`, in its study, and its Part 10 bytes."""
    image = hd.sr.ImageContentItem(
        name=hd.sr.CodedConcept("260753009", "SCT", "Source"),
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    finding = hd.sr.TextContentItem(
        name=hd.sr.CodedConcept("121071", "DCM", "Finding"),
        value="cxr-stream sink test",
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    root = hd.sr.ContainerContentItem(name=hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = hd.sr.ContentSequence([image, finding])
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=99,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cxr-stream",
    )
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return sr, buffer.getvalue()


def instances_in_study(orthanc: Any, study_uid: str) -> list[str]:
    """SOP instance UIDs that Orthanc lists in the study (QIDO-RS), one entry per stored instance."""
    return [uid for uid, _ in instances_and_classes(orthanc, study_uid)]


def instances_and_classes(orthanc: Any, study_uid: str) -> list[tuple[str, str]]:
    answer = orthanc.get(f"/dicom-web/studies/{study_uid}/instances")
    return [(str(item["00080018"]["Value"][0]), str(item["00080016"]["Value"][0])) for item in answer]


@pytest.fixture
def stow(orthanc: Any) -> Iterator[StowSink]:
    sink = StowSink(
        orthanc.dicomweb_root,
        authorization=basic_authorization(orthanc.username, orthanc.password),
        timeout_s=10,
    )
    yield sink
    sink.close()


def failure(sink: SrSink, sr: pydicom.Dataset, data: bytes) -> tuple[ExportError, float]:
    start = time.monotonic()
    with pytest.raises(ExportError) as caught:
        sink.store(sr, data)
    return caught.value, time.monotonic() - start


# ------------------------------------------------------------------------------------------------ STOW-RS


def test_stow_files_the_sr_into_its_study_and_a_replay_keeps_one(
    orthanc: Any, source_image: pydicom.Dataset, stow: StowSink
) -> None:
    sr, data = comprehensive_sr(source_image)
    study = str(source_image.StudyInstanceUID)
    assert stow.destination == f"stow:{orthanc.dicomweb_root}"
    stow.store(sr, data)
    listed = instances_and_classes(orthanc, study)
    assert (str(sr.SOPInstanceUID), str(sr.SOPClassUID)) in listed
    assert (str(source_image.SOPInstanceUID), DX_FOR_PRESENTATION) in listed

    stow.store(sr, data)  # a replay after a crash: the same SOP instance again
    assert instances_in_study(orthanc, study).count(str(sr.SOPInstanceUID)) == 1


def test_stow_with_wrong_credentials_waits_for_the_fix_without_showing_them(
    orthanc: Any, source_image: pydicom.Dataset
) -> None:
    wrong = basic_authorization(orthanc.username, "not-the-password")
    sink = StowSink(orthanc.dicomweb_root, authorization=wrong, timeout_s=10)
    sr, data = comprehensive_sr(source_image)
    error, _ = failure(sink, sr, data)
    assert error.code is ExportCode.UNAVAILABLE
    assert error.reason == "HTTP 401: check the configured URL and credentials"
    for secret in (wrong, "not-the-password", wrong.split()[1]):
        assert secret not in repr(sink) and secret not in repr(error)
    assert str(sr.SOPInstanceUID) not in instances_in_study(orthanc, str(source_image.StudyInstanceUID))


@pytest.mark.parametrize(
    "behaviour",
    [never_answers, drips_headers(0.2), drips_body(0.2)],
    ids=["never-answers", "drips-headers", "drips-body"],
)
def test_stow_to_a_server_that_holds_its_answer_is_unavailable_within_the_timeout(
    source_image: pydicom.Dataset, behaviour: Any
) -> None:
    sr, data = comprehensive_sr(source_image)
    with MisbehavingServer(behaviour) as hostile:
        sink = StowSink(hostile.url("/dicom-web"), authorization=None, timeout_s=TIMEOUT_S)
        error, elapsed = failure(sink, sr, data)
    assert error.code is ExportCode.UNAVAILABLE
    assert elapsed < TIMEOUT_S + SLACK_S


# ------------------------------------------------------------------------------------------------ C-STORE


def test_cstore_files_the_sr_into_its_study(orthanc: Any, source_image: pydicom.Dataset) -> None:
    """Orthanc as the C-STORE SCP: its configuration stores from any calling AE title (DicomAlwaysAllowStore
    is on by default), so our title needs no entry in its DicomModalities."""
    sink = CStoreSink(f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", calling_ae_title=CALLING_AET, timeout_s=10)
    assert sink.destination == f"cstore:{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"
    sr, data = comprehensive_sr(source_image)
    sink.store(sr, data)
    sink.store(sr, data)  # a replay
    listed = instances_in_study(orthanc, str(source_image.StudyInstanceUID))
    assert listed.count(str(sr.SOPInstanceUID)) == 1
    sink.close()


def test_cstore_to_a_closed_port_is_unavailable_quickly(source_image: pydicom.Dataset) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sink = CStoreSink(f"NOBODY@127.0.0.1:{port}", calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)
    sr, data = comprehensive_sr(source_image)
    error, elapsed = failure(sink, sr, data)
    assert error.code is ExportCode.UNAVAILABLE
    assert "association" in error.reason
    assert elapsed < TIMEOUT_S + SLACK_S


def test_cstore_to_a_peer_that_never_answers_is_unavailable_within_the_timeout(
    source_image: pydicom.Dataset,
) -> None:
    sr, data = comprehensive_sr(source_image)
    with MisbehavingServer(never_answers) as hostile:
        sink = CStoreSink(f"SILENT@127.0.0.1:{hostile.port}", calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)
        error, elapsed = failure(sink, sr, data)
    assert error.code is ExportCode.UNAVAILABLE
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + SLACK_S
    for leak in (PATIENT_NAME, PATIENT_ID, str(sr.SOPInstanceUID)):
        assert leak not in error.reason


def test_cstore_to_an_scp_that_rejects_the_called_title_is_unavailable(
    orthanc: Any, source_image: pydicom.Dataset
) -> None:
    """Orthanc does not check the called AE title by default, so the sink meets a rejection only from a real
    SCP that does: pynetdicom's own storage SCP, which requires its title."""
    from pynetdicom import AE, AllStoragePresentationContexts

    scp = AE(ae_title="REAL_SCP")
    scp.require_called_aet = True
    scp.supported_contexts = AllStoragePresentationContexts
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = scp.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        sink = CStoreSink(f"WRONG_TITLE@127.0.0.1:{port}", calling_ae_title=CALLING_AET, timeout_s=TIMEOUT_S)
        sr, data = comprehensive_sr(source_image)
        error, elapsed = failure(sink, sr, data)
    finally:
        server.shutdown()
    assert error.code is ExportCode.UNAVAILABLE
    assert "rejected the association" in error.reason
    assert elapsed < TIMEOUT_S + SLACK_S
