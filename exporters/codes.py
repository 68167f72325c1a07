"""The coded concepts the exports use, once for both standards.

FHIR names a code system by URI, DICOM by a coding scheme designator; a `Code` carries both, so the FHIR
bundle and the SR say the same thing about the same finding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SNOMED = ("http://snomed.info/sct", "SCT")
LOINC = ("http://loinc.org", "LN")
DCM = ("http://dicom.nema.org/resources/ontology/DCM", "DCM")
UCUM = ("http://unitsofmeasure.org", "UCUM")
#: Labels with no standard code: the model's own label, in cxr-stream's local system / private scheme.
LOCAL = ("urn:cxr-stream:label", "99CXR")


@dataclass(frozen=True, slots=True)
class Code:
    system: str
    scheme: str
    value: str
    meaning: str

    @classmethod
    def of(cls, system: tuple[str, str], value: str, meaning: str) -> Code:
        return cls(system[0], system[1], value, meaning)


#: What the report is about: a chest radiograph, however many views.
CHEST_XRAY = Code.of(LOINC, "30745-4", "XR Chest Views")
#: The observation carries a probability (0-100 %), as CAD templates carry it.
CERTAINTY_OF_FEATURE = Code.of(DCM, "111011", "Certainty of Feature")
PERCENT = Code.of(UCUM, "%", "percent")
PRESENT = Code.of(SNOMED, "52101004", "Present")
ABSENT = Code.of(SNOMED, "2667000", "Absent")

#: Model labels (upper-cased, spaces and dashes as underscores) with a SNOMED CT concept.
_KNOWN: dict[str, Code] = {
    "PNEUMONIA": Code.of(SNOMED, "233604007", "Pneumonia"),
    "NORMAL": Code.of(SNOMED, "17621005", "Normal"),
    "PNEUMOTHORAX": Code.of(SNOMED, "36118008", "Pneumothorax"),
    "CARDIOMEGALY": Code.of(SNOMED, "8186001", "Cardiomegaly"),
    "PLEURAL_EFFUSION": Code.of(SNOMED, "60046008", "Pleural effusion"),
    "EFFUSION": Code.of(SNOMED, "60046008", "Pleural effusion"),
    "ATELECTASIS": Code.of(SNOMED, "46621007", "Atelectasis"),
    "EDEMA": Code.of(SNOMED, "19242006", "Pulmonary edema"),
    "PULMONARY_EDEMA": Code.of(SNOMED, "19242006", "Pulmonary edema"),
}
#: DICOM code values are at most 16 characters (SH); longer labels keep a readable head.
_MAX_CODE_VALUE = 16


def label_code(label: str) -> Code:
    """The concept for a model label: SNOMED CT where known, else the label itself in the local scheme."""
    key = re.sub(r"[\s\-]+", "_", label.strip()).upper()
    known = _KNOWN.get(key)
    if known is not None:
        return known
    return Code.of(LOCAL, key[:_MAX_CODE_VALUE] or "UNLABELLED", label.strip()[:64] or "unlabelled")
