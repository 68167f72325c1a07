"""The SR exporter's builder: a real chest X-ray's header in, a Comprehensive SR (TID 1500) out, read back.

Every check reads the Part 10 bytes back, with pydicom and with highdicom's own SR reader, so what is checked
is what a PACS would receive. The source images are the demo package's real X-rays as DICOM (with the fake
patient data of `xray_files`, so reasons can be checked for leaks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import ComprehensiveSRStorage, generate_uid

from exporters import codes, ids, sr
from exporters.errors import ExportCode, ExportError
from exporters.interpret import ModelRules
from orthanc_server import ChestDicom, chest_xray_dicoms
from streaming.settings import default_bundle_dir
from worklist.events import ImageEvent, read_result
from xray_files import PATIENT_ID, PATIENT_NAME, dicom_bytes, image_dataset

MODEL = "pneumonia-xception"
SCORES = {"NORMAL": 0.07, "PNEUMONIA": 0.93}
#: Believable times (read_result replaces a timestamp more than a day from its clock): a few minutes ago.
SCORED_AT = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


@pytest.fixture(scope="module")
def chest(sample_jpegs: list[Path]) -> ChestDicom:
    return chest_xray_dicoms(sample_jpegs[:1])[0]


@pytest.fixture(scope="module")
def source(chest: ChestDicom) -> Dataset:
    return sr.read_source(chest.data)


@pytest.fixture(scope="module")
def plain_source() -> Dataset:
    return small_source()


@pytest.fixture(scope="module")
def rules() -> ModelRules:
    bundle = ModelRules.of_bundle(default_bundle_dir())
    assert bundle is not None, "the demo bundle should be readable"
    return bundle


def message(ds: Dataset, **fields: Any) -> bytes:
    """A `cxr.result/v1` value about the image whose header is `ds`; `fields` replace the defaults."""
    body: dict[str, Any] = {
        "schema": "cxr.result/v1",
        "event_id": "evt-0001",
        "uri": "file:///data/cxr/image.dcm",
        "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "accession": "ACC0000",
        "model": {"name": MODEL, "version": "1.0.0"},
        "scores": SCORES,
        "top_finding": "PNEUMONIA",
        "priority": "STAT",
        "sent_at": _stamp(SCORED_AT - timedelta(seconds=1)),
        "scored_at": _stamp(SCORED_AT),
        "latency_ms": 1000.0,
    }
    body.update(fields)
    return json.dumps(body).encode()


def result_for(ds: Dataset, **fields: Any) -> ImageEvent:
    return read_result(message(ds, **fields), None)


def read_back(report: Dataset) -> tuple[Dataset, hd.sr.ComprehensiveSR]:
    """The SR as a receiver sees it: its file bytes read by pydicom and by highdicom's SR reader."""
    data = sr.sr_bytes(report)
    return pydicom.dcmread(BytesIO(data)), hd.sr.srread(BytesIO(data))


def groups_by_label(report: hd.sr.ComprehensiveSR, result: ImageEvent) -> dict[str, Any]:
    name, version = result.model_name or "unknown", result.model_version or "unknown"
    found = {}
    for label in result.scores:
        matches = report.content.get_image_measurement_groups(
            tracking_uid=ids.tracking_uid(result.event_id, name, version, label)
        )
        assert len(matches) == 1, label
        found[label] = matches[0]
    return found


def certainty(group: Any) -> float:
    (measurement,) = group.get_measurements(name=sr.concept(codes.CERTAINTY_OF_FEATURE))
    assert measurement.unit == sr.concept(codes.PERCENT)
    return float(measurement.value)


def evaluation(group: Any) -> str | None:
    """ "present", "absent" or None (no qualitative evaluation)."""
    evaluations = group.get_qualitative_evaluations()
    if not evaluations:
        return None
    (only,) = evaluations
    assert only.name == group.finding_type
    return {codes.PRESENT.value: "present", codes.ABSENT.value: "absent"}[only.value.value]


def small_source(**attributes: Any) -> Dataset:
    """A tiny DX header (8x8 pixels) with only what `image_dataset` gives and fresh UIDs, plus `attributes`."""
    ds = image_dataset(np.zeros((8, 8), dtype=np.uint8))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return sr.read_source(dicom_bytes(ds))


# ------------------------------------------------------------------------------------------ the document


def test_the_sr_is_a_comprehensive_sr_filed_into_the_source_study(source: Dataset, rules: ModelRules) -> None:
    result = result_for(source)
    ds, report = read_back(sr.build_sr(result, source, rules))

    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert ds.file_meta.MediaStorageSOPClassUID == ComprehensiveSRStorage
    assert isinstance(report, hd.sr.ComprehensiveSR)
    assert ds.Modality == "SR"
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyTime"):
        assert ds[keyword].value == source[keyword].value, keyword
    assert str(ds.PatientName) == PATIENT_NAME and ds.PatientID == PATIENT_ID
    assert ds.SOPInstanceUID == ids.sr_instance_uid(result.event_id, MODEL, "1.0.0")
    assert ds.SeriesInstanceUID == ids.sr_series_uid(source.StudyInstanceUID, MODEL, "1.0.0")
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SeriesNumber == sr.SERIES_NUMBER == 9001
    assert ds.InstanceNumber == 1
    assert ds.SeriesDescription == f"AI triage {MODEL} 1.0.0"
    assert ds.Manufacturer == "cxr-stream"
    assert ds.CompletionFlag == "COMPLETE"
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.PreliminaryFlag == "PRELIMINARY"
    assert "VerifyingObserverSequence" not in ds
    evidence = (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID, source.SOPClassUID)
    assert report.get_evidence(current_procedure_only=True) == [evidence]


def test_the_content_tree_is_a_tid_1500_report_with_one_group_per_label(source: Dataset, rules: ModelRules) -> None:
    result = result_for(source, scores={"NORMAL": 0.07, "PNEUMONIA": 0.93, "PNEUMOTHORAX": 0.314159})
    ds, report = read_back(sr.build_sr(result, source, rules))

    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert ds.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    (procedure,) = hd.sr.utils.find_content_items(report.content[0], name=dicom_codes.DCM.ProcedureReported)
    assert procedure.value == sr.concept(codes.CHEST_XRAY)
    assert len(report.content.get_image_measurement_groups()) == 3

    for label, group in groups_by_label(report, result).items():
        assert group.tracking_identifier == f"{label} (AI)"
        assert group.finding_type == sr.concept(codes.label_code(label))
        assert certainty(group) == pytest.approx(result.scores[label] * 100, abs=0.005)
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert image.referenced_sop_class_uid == source.SOPClassUID
        algorithm = {
            item.name.value: item.value
            for item in hd.sr.utils.find_content_items(group[0], value_type=hd.sr.ValueTypeValues.TEXT)
        }
        assert algorithm["111001"] == MODEL and algorithm["111003"] == "1.0.0"  # Algorithm Name, Version
    # The measurement groups come strongest first, as a reader wants them.
    shown = [group.tracking_identifier for group in report.content.get_image_measurement_groups()]
    assert shown == ["PNEUMONIA (AI)", "PNEUMOTHORAX (AI)", "NORMAL (AI)"]


def test_the_observer_is_the_model_as_a_device(source: Dataset, rules: ModelRules) -> None:
    result = result_for(source)
    _, report = read_back(sr.build_sr(result, source, rules))
    (observer,) = report.content.get_observer_contexts()
    assert observer.observer_type == dicom_codes.DCM.Device
    device = observer.observer_identifying_attributes
    assert device.uid == ids.device_uid(MODEL, "1.0.0")
    assert device.name == MODEL and device.model_name == MODEL


@pytest.mark.parametrize(
    ("version", "scores", "top", "expected"),
    [
        # the bundle's own model: its thresholds decide (NORMAL below the finding threshold says nothing)
        ("bundle", {"NORMAL": 0.07, "PNEUMONIA": 0.93}, "PNEUMONIA", {"PNEUMONIA": "present", "NORMAL": None}),
        ("bundle", {"NORMAL": 0.6, "PNEUMONIA": 0.4}, "NORMAL", {"PNEUMONIA": "absent", "NORMAL": "present"}),
        # another version: only the result's own top finding can be called present
        ("1.0.0", {"NORMAL": 0.07, "PNEUMONIA": 0.93}, "PNEUMONIA", {"PNEUMONIA": "present", "NORMAL": None}),
        ("1.0.0", {"NORMAL": 0.6, "PNEUMONIA": 0.4}, "NORMAL", {"PNEUMONIA": None, "NORMAL": "present"}),
    ],
)
def test_present_or_absent_follows_the_interpretation(
    source: Dataset,
    rules: ModelRules,
    version: str,
    scores: Mapping[str, float],
    top: str,
    expected: Mapping[str, str | None],
) -> None:
    version = rules.version if version == "bundle" else version
    result = result_for(source, model={"name": rules.name, "version": version}, scores=scores, top_finding=top)
    _, report = read_back(sr.build_sr(result, source, rules))
    found = groups_by_label(report, result)
    assert {label: evaluation(group) for label, group in found.items()} == expected
    for label, group in found.items():  # the probability is there whether or not anything is concluded
        assert certainty(group) == pytest.approx(scores[label] * 100, abs=0.005)


def test_a_result_without_a_model_is_the_unknown_model(source: Dataset) -> None:
    result = result_for(source, model=None)
    ds, report = read_back(sr.build_sr(result, source, None))
    assert ds.SOPInstanceUID == ids.sr_instance_uid(result.event_id, "unknown", "unknown")
    assert ds.SeriesDescription == "AI triage unknown unknown"
    (observer,) = report.content.get_observer_contexts()
    assert observer.observer_identifying_attributes.uid == ids.device_uid("unknown", "unknown")
    assert len(groups_by_label(report, result)) == 2


# --------------------------------------------------------------------------------------- determinism


def test_a_replay_builds_the_same_instance_byte_for_byte(source: Dataset, rules: ModelRules) -> None:
    first = sr.sr_bytes(sr.build_sr(result_for(source), source, rules))
    again = sr.sr_bytes(sr.build_sr(result_for(source), source, rules))  # the same message, read again
    assert first == again


def test_another_model_version_or_event_is_another_instance(source: Dataset, rules: ModelRules) -> None:
    base = sr.build_sr(result_for(source), source, rules)
    newer = sr.build_sr(result_for(source, model={"name": MODEL, "version": "1.1.0"}), source, rules)
    other = sr.build_sr(result_for(source, event_id="evt-0002"), source, rules)
    assert len({base.SOPInstanceUID, newer.SOPInstanceUID, other.SOPInstanceUID}) == 3
    assert newer.SeriesInstanceUID != base.SeriesInstanceUID
    assert other.SeriesInstanceUID == base.SeriesInstanceUID  # one series per study and model version


def test_dates_and_times_are_the_scoring_time_in_the_image_time_zone(rules: ModelRules) -> None:
    header = small_source(TimezoneOffsetFromUTC="+0130")
    ds, _ = read_back(sr.build_sr(result_for(header), header, rules))
    local = SCORED_AT + timedelta(hours=1, minutes=30)
    for prefix in ("Content", "Series", "InstanceCreation"):
        assert ds[f"{prefix}Date"].value == local.strftime("%Y%m%d"), prefix
        assert ds[f"{prefix}Time"].value == local.strftime("%H%M%S"), prefix
    assert ds.TimezoneOffsetFromUTC == "+0130"
    assert ds.ContributingEquipmentSequence[-1].ContributionDateTime == local.strftime("%Y%m%d%H%M%S")


def test_without_an_offset_the_times_are_local_as_dicom_assumes(source: Dataset, rules: ModelRules) -> None:
    ds, _ = read_back(sr.build_sr(result_for(source), source, rules))
    local = SCORED_AT.astimezone()
    assert (ds.ContentDate, ds.ContentTime) == (local.strftime("%Y%m%d"), local.strftime("%H%M%S"))
    assert "TimezoneOffsetFromUTC" not in ds


# --------------------------------------------------------------------------------------- the source


def test_read_source_gives_the_header_without_pixels(chest: ChestDicom, source: Dataset) -> None:
    assert source.SOPInstanceUID == chest.sop_instance_uid
    assert source.StudyInstanceUID == chest.study_uid
    assert "PixelData" not in source
    assert source.Rows > 0


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a readable DICOM"),
        (b"\x00" * 128 + b"DICM" + b"\xff" * 64, "SOPClassUID"),  # a preamble and nothing DICOM after it
    ],
)
def test_read_source_refuses_what_is_not_dicom(data: bytes, why: str) -> None:
    with pytest.raises(ExportError) as caught:
        sr.read_source(data)
    assert caught.value.code is ExportCode.SOURCE_UNREADABLE
    assert why in caught.value.reason


def test_read_source_refuses_a_truncated_header(chest: ChestDicom) -> None:
    with pytest.raises(ExportError) as caught:
        sr.read_source(chest.data[:200])
    assert caught.value.code is ExportCode.SOURCE_UNREADABLE


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_read_source_refuses_a_header_without_the_uids_an_sr_needs(keyword: str) -> None:
    ds = image_dataset(np.zeros((8, 8), dtype=np.uint8))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    delattr(ds, keyword)
    with pytest.raises(ExportError) as caught:
        sr.read_source(dicom_bytes(ds))
    assert caught.value.code is ExportCode.SOURCE_UNREADABLE
    assert keyword in caught.value.reason
    assert PATIENT_NAME not in caught.value.reason and PATIENT_ID not in caught.value.reason


@pytest.mark.parametrize(
    ("field", "keyword"), [("sop_instance_uid", "SOPInstanceUID"), ("study_uid", "StudyInstanceUID")]
)
def test_a_header_that_is_not_the_scored_image_is_refused(
    source: Dataset, rules: ModelRules, field: str, keyword: str
) -> None:
    result = result_for(source, **{field: generate_uid()})
    for attempt in (lambda: sr.check_source(result, source), lambda: sr.build_sr(result, source, rules)):
        with pytest.raises(ExportError) as caught:
            attempt()
        assert caught.value.code is ExportCode.SOURCE_UNREADABLE
        assert keyword in caught.value.reason
        assert str(source[keyword].value) not in caught.value.reason


def test_a_result_without_uids_takes_the_header_as_it_is(source: Dataset, rules: ModelRules) -> None:
    result = result_for(source, study_uid=None, series_uid=None, sop_instance_uid=None)
    sr.check_source(result, source)
    ds, _ = read_back(sr.build_sr(result, source, rules))
    assert ds.StudyInstanceUID == source.StudyInstanceUID


def test_a_sparse_or_sloppy_header_still_gets_its_sr(rules: ModelRules) -> None:
    """No birth date, study date or study ID (Type 2, so empty is "unknown"), and a Patient's Sex outside the
    standard's M/F/O, which the SR leaves empty instead of refusing the report."""
    header = small_source(PatientSex="U")
    assert "PatientBirthDate" not in header
    ds, _ = read_back(sr.build_sr(result_for(header), header, rules))
    assert ds.StudyInstanceUID == header.StudyInstanceUID
    assert ds.PatientBirthDate == "" and ds.PatientSex == "" and ds.StudyID == ""
    assert str(ds.PatientName) == PATIENT_NAME
    assert "PatientBirthDate" not in header and header.PatientSex == "U"  # the caller's header is untouched


def test_a_header_highdicom_cannot_file_against_is_an_invalid_export(rules: ModelRules) -> None:
    header = small_source(SOPClassUID="1.2.3.4.5.6.7.8")  # a SOP class no IOD describes
    with pytest.raises(ExportError) as caught:
        sr.build_sr(result_for(header), header, rules)
    assert caught.value.code is ExportCode.INVALID_EXPORT
    assert PATIENT_NAME not in caught.value.reason and PATIENT_ID not in caught.value.reason


# --------------------------------------------------------------------------------------- hostile text


HOSTILE_LABELS = [
    "",
    " ",
    "back\\slash",
    "\x00\x01\x1b",
    "Pleural effusion",
    "pleural-effusion",
    "ümlaut ✓ 肺炎",
    "ß" * 20,
    "x" * 500,
]


def test_hostile_labels_and_model_names_still_build(rules: ModelRules) -> None:
    header = small_source(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jörg")
    scores = {label: round(index / len(HOSTILE_LABELS), 3) for index, label in enumerate(HOSTILE_LABELS)}
    model = {"name": "net\\" + "ö" * 100, "version": "\x07" * 3}
    result = result_for(header, scores=scores, top_finding="x" * 500, model=model)
    ds, report = read_back(sr.build_sr(result, header, rules))

    assert ds.SpecificCharacterSet == "ISO_IR 192"  # the labels need Unicode; the patient's name survives it
    assert str(ds.PatientName) == "Müller^Jörg"
    assert len(ds.SeriesDescription) <= 64 and "\\" not in ds.SeriesDescription
    found = groups_by_label(report, result)
    assert len(found) == len(HOSTILE_LABELS)
    for label, group in found.items():
        finding = group.finding_type
        assert 0 < len(finding.value.encode()) <= 16 and "\\" not in finding.value, label  # SH, even in bytes
        assert 0 < len(finding.meaning.encode()) <= 64, label  # LO
        assert certainty(group) == pytest.approx(scores[label] * 100, abs=0.005)
    assert found["ümlaut ✓ 肺炎"].finding_type.meaning == "ümlaut ✓ 肺炎"
    assert found["x" * 500].tracking_identifier == "x" * 64 + " (AI)"
    (observer,) = report.content.get_observer_contexts()
    assert len(observer.observer_identifying_attributes.name) <= 64


_LABELS = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)


@settings(max_examples=20, deadline=None)
@given(
    scores=st.dictionaries(_LABELS, st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=6),
    name=st.none() | st.text(max_size=80),
    version=st.none() | st.text(max_size=20),
    top=st.integers(min_value=-1, max_value=5),
)
def test_any_scores_give_a_readable_sr_or_an_export_error(
    plain_source: Dataset,
    rules: ModelRules,
    scores: dict[str, float],
    name: str | None,
    version: str | None,
    top: int,
) -> None:
    header = plain_source
    labels = list(scores)
    model = {"name": name, "version": version}
    fields: dict[str, Any] = {
        "scores": scores,
        "model": model,
        "top_finding": labels[top % len(labels)] if top >= 0 else None,
    }
    try:
        result = result_for(header, **fields)
    except ValueError:  # what the worklist's reader refuses never reaches the exporter
        return
    try:
        report = sr.build_sr(result, header, rules)
    except ExportError as exc:
        assert exc.code in (ExportCode.INVALID_EXPORT, ExportCode.SOURCE_UNREADABLE)
        return
    ds, read = read_back(report)
    assert ds.SOPClassUID == ComprehensiveSRStorage
    assert len(read.content.get_image_measurement_groups()) == len(scores)
