"""One scored image as a DICOM Comprehensive SR: a TID 1500 Measurement Report filed into the image's study.

The report is what viewers and PACS read most widely for AI findings: one measurement group (TID 1501) per
label, each with the probability as a Certainty of Feature percentage (as CAD templates carry it), a
Present/Absent evaluation where the score means something, and a reference to the scored image. The model is
the observer, as a device; nobody has verified the report, so it goes out UNVERIFIED and PRELIMINARY.

Everything is a function of the result and the image header: UIDs come from `ids`, and every date and time is
the result's `scored_at`, so a replay builds the same instance, byte for byte, and a PACS keeps it once.
The header holds patient data: nothing here logs it or quotes it in a reason (pydicom's and highdicom's own
warnings quote it, and `streaming.logs.silence_header_quoters` keeps them out of the exporter's log).
"""

from __future__ import annotations

import copy
import re
import unicodedata
from datetime import UTC, datetime, timedelta, timezone
from io import BytesIO
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.valuerep import DA, DT, TM

from exporters import codes, ids
from exporters.errors import ExportCode, ExportError
from exporters.interpret import ModelRules, interpret, rules_for
from worklist.events import ImageEvent

#: The SR series' number. Modalities number their series from 1 up; a fixed number far above theirs sorts the
#: AI reports after the images in every viewer and says at a glance that the series is derived, not acquired.
SERIES_NUMBER = 9001
MANUFACTURER = "cxr-stream"
UNKNOWN = "unknown"
#: What an SR cannot be built without; a header that lacks one is not an image the SR can refer to.
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: Type 2 attributes highdicom reads from the image unconditionally; an image without them still gets its SR,
#: with them empty (Type 2 allows "unknown").
_TYPE2_COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PATIENT_SEXES = frozenset({"M", "F", "O", ""})
_LO = 64  # a DICOM Long String (and a code meaning): characters, held to bytes in UTF-8 here (`_clean`)
_SH = 16  # a DICOM Short String (a code value), likewise
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")
#: The character set for text that plain ASCII cannot carry (labels and model names are Unicode).
_UTF8 = "ISO_IR 192"


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID attribute's value without DICOM padding, "" when absent or empty."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip("\0 ")


def read_source(data: bytes) -> Dataset:
    """The scored image's header (no pixels: the SR only refers to the image), or SOURCE_UNREADABLE when it is
    not DICOM or lacks the UIDs an SR needs. The bytes are already in memory, so the read is bounded by them."""
    if not data:
        raise ExportError(ExportCode.SOURCE_UNREADABLE, "the scored image is empty")
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        missing = [keyword for keyword in REQUIRED_UIDS if not _uid(ds, keyword)]
    except MemoryError:
        raise
    except Exception as exc:  # pydicom raises many kinds, and their messages may quote header values
        raise ExportError(
            ExportCode.SOURCE_UNREADABLE, f"the scored image is not a readable DICOM file ({type(exc).__name__})"
        ) from None
    if missing:
        raise ExportError(ExportCode.SOURCE_UNREADABLE, f"the scored image's DICOM header lacks {', '.join(missing)}")
    return ds


def check_source(result: ImageEvent, source: Dataset) -> None:
    """SOURCE_UNREADABLE when the header is not the scored image's: the file at the URI was replaced since
    scoring, and an SR about one image must not be filed against another. UIDs the result lacks are not
    compared (the header is then all there is)."""
    for keyword, expected in (("SOPInstanceUID", result.sop_instance_uid), ("StudyInstanceUID", result.study_uid)):
        if expected is not None and _uid(source, keyword) != expected.strip("\0 "):
            raise ExportError(
                ExportCode.SOURCE_UNREADABLE,
                f"the image at the result's URI has another {keyword} than the scored one (replaced since scoring)",
            )


def _clean(text: str, limit: int, replacement: str = " ") -> str:
    """`text` as a DICOM string value: no control characters or backslashes (the value delimiter), no padding,
    at most `limit` bytes in UTF-8 (so at most `limit` characters too: some readers count bytes, and pydicom
    counts a multi-byte value's padding against the limit)."""
    cleaned = "".join(replacement if ch == "\\" or unicodedata.category(ch) == "Cc" else ch for ch in text)
    return cleaned.strip().encode("utf-8")[:limit].decode("utf-8", "ignore").strip()


def _shown(text: str) -> str:
    """A model's name or version as the SR shows it (a DICOM Long String); the ids keep the raw text."""
    return _clean(text, _LO) or UNKNOWN


def concept(code: codes.Code) -> hd.sr.CodedConcept:
    """A `codes.Code` as the SR's coded concept (value and meaning bounded, as DICOM wants them)."""
    return hd.sr.CodedConcept(
        value=_clean(code.value, _SH, "_") or "UNLABELLED",
        scheme_designator=code.scheme,
        meaning=_clean(code.meaning, _LO) or "unlabelled",
    )


def _percent(score: float) -> float:
    """A probability as the percentage the SR carries; two decimals are finer than any model's calibration."""
    return round(score * 100.0, 2)


def _local_time(at: datetime, source: Dataset) -> tuple[datetime, str | None]:
    """`at` in the time zone the image's dates are in: the header's TimezoneOffsetFromUTC when it has a valid
    one (returned, for the SR to carry too), else this host's (DICOM dates without an offset are local)."""
    offset = str(source.get("TimezoneOffsetFromUTC") or "").strip()
    match = _OFFSET.fullmatch(offset)
    if match is not None:
        sign, hours, minutes = match.groups()
        delta = timedelta(hours=int(hours), minutes=int(minutes))
        if delta <= timedelta(hours=14) and int(minutes) < 60:
            zone = timezone(-delta if sign == "-" else delta)
            return at.astimezone(zone).replace(tzinfo=None), offset
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return aware.astimezone().replace(tzinfo=None), None


def _evidence(source: Dataset) -> Dataset:
    """A copy of the header that highdicom can copy the patient and study from: Type 2 attributes it reads
    unconditionally are added empty when the image lacks them, and a Patient's Sex outside M/F/O is left
    unknown rather than refusing the report. Element by element, so the reader's buffer (the whole image) is
    not copied with it, and the caller's header is never changed."""
    evidence = Dataset()
    for element in source:  # converted (decoded) elements; copied, since highdicom shares them with the SR
        evidence.add(copy.deepcopy(element))
    for keyword in _TYPE2_COPIED:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    if str(evidence.PatientSex or "").strip() not in _PATIENT_SEXES:
        evidence.PatientSex = None
    return evidence


def _group(
    result: ImageEvent,
    label: str,
    score: float,
    source: Dataset,
    rules: ModelRules | None,
    model: tuple[str, str],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One label's TID 1501 group: its probability, what it means (when anything can be said), and the image."""
    name, version = model
    finding = concept(codes.label_code(label))
    verdict = interpret(label, score, result.top_finding, rules)
    evaluations = []
    if verdict is not None:
        present = codes.PRESENT if verdict.present else codes.ABSENT
        evaluations.append(hd.sr.QualitativeEvaluation(name=finding, value=concept(present)))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=ids.tracking_uid(result.event_id, name, version, label),
            identifier=f"{_clean(label, _LO) or 'unlabelled'} (AI)",
        ),
        finding_type=finding,
        algorithm_id=hd.sr.AlgorithmIdentification(name=_shown(name), version=_shown(version)),
        measurements=[
            hd.sr.Measurement(
                name=concept(codes.CERTAINTY_OF_FEATURE), value=_percent(score), unit=concept(codes.PERCENT)
            )
        ],
        qualitative_evaluations=evaluations,
        # The header's two UIDs are all the reference needs: the scorer already read the file as an image.
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=_uid(source, "SOPClassUID"),
                referenced_sop_instance_uid=_uid(source, "SOPInstanceUID"),
            )
        ],
    )


def _model(result: ImageEvent) -> tuple[str, str]:
    """The model's name and version as the ids take them ("unknown" for a result without them)."""
    return result.model_name or UNKNOWN, result.model_version or UNKNOWN


def _report(result: ImageEvent, source: Dataset, rules: ModelRules | None) -> hd.sr.MeasurementReport:
    """The TID 1500 tree: the model as the observing device, the procedure, one group per label."""
    name, version = _model(result)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=ids.device_uid(name, version), name=_shown(name), model_name=_shown(name)
    )
    observer = hd.sr.ObserverContext(observer_type=dicom_codes.DCM.Device, observer_identifying_attributes=device)
    ordered = sorted(result.scores.items(), key=lambda item: (-item[1], item[0]))  # top finding first
    applicable = rules_for(rules, result.model_name, result.model_version)
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=concept(codes.CHEST_XRAY),
        imaging_measurements=[
            _group(result, label, score, source, applicable, (name, version)) for label, score in ordered
        ],
    )


def _needs_utf8(result: ImageEvent) -> bool:
    """Whether the text the SR adds (labels, model name and version) goes beyond ASCII, which every character
    set the image may declare includes."""
    texts = [*result.scores, *_model(result)]
    return not all(text.isascii() for text in texts)


def build_sr(result: ImageEvent, source: Dataset, rules: ModelRules | None) -> Dataset:
    """The result as a Comprehensive SR in the image's study. SOURCE_UNREADABLE when the header is not the
    scored image's (`check_source`); INVALID_EXPORT when highdicom refuses to build it."""
    check_source(result, source)
    name, version = _model(result)
    extra: dict[str, Any] = {"specific_character_set": _UTF8} if _needs_utf8(result) else {}
    try:
        moment, offset = _local_time(result.at, source)
        sr = hd.sr.ComprehensiveSR(
            evidence=[_evidence(source)],
            content=_report(result, source, rules),
            series_instance_uid=ids.sr_series_uid(_uid(source, "StudyInstanceUID"), name, version),
            series_number=SERIES_NUMBER,
            sop_instance_uid=ids.sr_instance_uid(result.event_id, name, version),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=_shown(name),
            software_versions=_shown(version),
            series_description=_clean(f"AI triage {name} {version}", _LO),
            is_complete=True,
            is_final=False,
            is_verified=False,
            content_date=moment.date(),
            content_time=moment.time(),
            series_date=moment.date(),
            series_time=moment.time(),
            **extra,
        )
        _pin_times(sr, moment, offset)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # highdicom's messages may quote the header (a patient name it finds invalid): the type says enough.
        raise ExportError(ExportCode.INVALID_EXPORT, f"highdicom refused the SR ({type(exc).__name__})") from None
    if _uid(sr, "StudyInstanceUID") != _uid(source, "StudyInstanceUID"):
        raise ExportError(ExportCode.INVALID_EXPORT, "the SR was not filed into the scored image's study")
    return sr


def _pin_times(sr: Dataset, moment: datetime, offset: str | None) -> None:
    """The creation times highdicom takes from the clock, set to the scoring time instead: the SR renders the
    result, so a replay is the same instance with the same bytes."""
    sr.InstanceCreationDate = DA(moment.date())
    sr.InstanceCreationTime = TM(moment.time())
    # highdicom appends itself last, as processing equipment; earlier items are the image's own equipment.
    equipment = sr.get("ContributingEquipmentSequence") or []
    if equipment and "ContributionDateTime" in equipment[-1]:
        equipment[-1].ContributionDateTime = DT(moment)
    if offset is not None:
        sr.TimezoneOffsetFromUTC = offset


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM Part 10 file: what STOW-RS, C-STORE and `--out` send."""
    buffer = BytesIO()
    try:
        sr.save_as(buffer, enforce_file_format=True)
    except MemoryError:
        raise
    except Exception as exc:  # an encoding pydicom cannot write; its message may quote values
        raise ExportError(ExportCode.INVALID_EXPORT, f"the SR could not be written ({type(exc).__name__})") from None
    return buffer.getvalue()


__all__ = ["SERIES_NUMBER", "build_sr", "check_source", "concept", "read_source", "sr_bytes"]
