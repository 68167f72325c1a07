"""A scored result as a FHIR R4 transaction Bundle: what a hospital's FHIR server can take as it is.

The bundle says what the model said and nothing more: a preliminary DiagnosticReport (AI triage, not a
radiologist's read), one Observation per scored label, the model as a Device, a Provenance naming it as
author, and a Task that carries the triage priority to whoever reads the study. Every resource is tagged
AI-asserted (HL7 AI Transparency on FHIR). The result holds no patient data, so the bundle has no Patient
and no subject; the study and the order are named by their DICOM and accession identifiers, for the server
to link.

Every entry is a `PUT` of a deterministic id (`exporters.ids`), so a replayed result overwrites its own
resources, and building twice gives the same JSON byte for byte. The bundle is checked by constructing the
`fhir.resources` R4B models (R4B is the R4-compatible release; the package's default R5 is refused by R4
servers); what they refuse becomes an `ExportError` that names the failing element, never its content.
"""

from __future__ import annotations

import copy
import json
import math
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from exporters import codes, ids
from exporters.codes import Code
from exporters.errors import ExportCode, ExportError
from exporters.interpret import ModelRules, interpret, rules_for
from streaming.triage import Priority
from worklist.events import ImageEvent

#: The FHIR release the bundle is built and validated against (R4B, wire-compatible with R4 4.0.1).
FHIR_VERSION = "4.3.0"

#: HL7 AI Transparency on FHIR: the resource was asserted by artificial intelligence.
AI_ASSERTED: dict[str, str] = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
RADIOLOGY: dict[str, str] = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "RAD",
    "display": "Radiology",
}
IMAGING: dict[str, str] = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
ACCESSION_TYPE: dict[str, str] = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
    "code": "ACSN",
    "display": "Accession ID",
}
AUTHOR: dict[str, str] = {
    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
    "code": "author",
    "display": "Author",
}
CREATE: dict[str, str] = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
    "code": "CREATE",
    "display": "create",
}
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
#: How a study is named without knowing the server's ImagingStudy id (as in the ImagingStudy resource).
DICOM_UID_SYSTEM = "urn:dicom:uid"
MODEL_SYSTEM = "urn:cxr-stream:model"
EVENT_SYSTEM = "urn:cxr-stream:event"
#: FHIR request-priority codes for the triage priorities.
TASK_PRIORITY: dict[Priority, str] = {
    Priority.STAT: "stat",
    Priority.URGENT: "urgent",
    Priority.ROUTINE: "routine",
}
UNKNOWN = "unknown"

#: Text longer than this is cut: a label may be 512 characters, a model name as long.
_MAX_TEXT = 1024
_WHITESPACE = re.compile(r"\s+")
#: A DICOM UID: dotted digits, at most 64 characters. Anything else cannot name a study on the server.
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_MAX_UID = 64


def build_bundle(result: ImageEvent, rules: ModelRules | None) -> dict[str, Any]:
    """The result as a transaction Bundle (a JSON-ready dict), checked by the R4B models.

    `rules` interpret the scores only when they are the result's own model's (name and version); any other
    model's result is interpreted by its top finding alone.
    """
    bundle = unvalidated_bundle(result, rules)
    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:
        raise ExportError(ExportCode.INVALID_EXPORT, _refusal(exc)) from None
    return bundle


def unvalidated_bundle(result: ImageEvent, rules: ModelRules | None) -> dict[str, Any]:
    """The bundle `build_bundle` returns, before the R4B models check it (what that check costs is benched)."""
    applicable = rules_for(rules, result.model_name, result.model_version)
    for score in result.scores.values():
        if not math.isfinite(score):
            raise ExportError(ExportCode.INVALID_EXPORT, "a score is not a finite number")
    try:
        return _Builder(result, applicable).bundle()
    except UnicodeError:  # only a result built by hand can hold lone surrogates (read_result refuses them)
        raise ExportError(ExportCode.INVALID_EXPORT, "the result holds text that is not valid Unicode") from None
    except OverflowError:
        raise ExportError(ExportCode.INVALID_EXPORT, "the result's scored_at cannot be written as UTC") from None


def bundle_json(bundle: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the same bytes for the same bundle (what goes to Kafka and to the server)."""
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _refusal(exc: ValidationError) -> str:
    """Which elements the library refused and why, by path and error type: never the offending values."""
    places = sorted(
        {
            ".".join(str(part) for part in error["loc"]) + f" ({error['type']})"
            for error in exc.errors(include_url=False, include_context=False, include_input=False)
        }
    )
    shown = "; ".join(places[:3]) + (f"; and {len(places) - 3} more" if len(places) > 3 else "")
    return f"the FHIR R4B models refused the bundle: {shown}"


def _clean(text: str, fallback: str = "") -> str:
    """Text FHIR accepts as a `string` or `code`: no control characters or lone surrogates, whitespace runs as
    one space, none at either end (a `code` may have neither), at most `_MAX_TEXT` characters."""
    kept = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text if unicodedata.category(ch) != "Cs")
    cleaned = _WHITESPACE.sub(" ", kept).strip()[:_MAX_TEXT].rstrip()
    return cleaned or fallback


def _instant(at: datetime) -> str:
    """A FHIR `instant` (also a valid `dateTime`): UTC to the millisecond, a naive time taken as UTC."""
    utc = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _coding(code: Code) -> dict[str, str]:
    return {"system": code.system, "code": _clean(code.value, "UNLABELLED"), "display": _clean(code.meaning, "?")}


def _reference(kind: str, resource_id: str) -> dict[str, str]:
    return {"reference": f"{kind}/{resource_id}"}


def _study_uid(uid: str | None) -> str | None:
    """The study's UID when it is one (a malformed one would name no study, and is left out)."""
    if uid is None or len(uid) > _MAX_UID or not _DICOM_UID.fullmatch(uid):
        return None
    return uid


class _Builder:
    """One result's bundle: the ids and shared parts computed once, each resource by its own method."""

    def __init__(self, result: ImageEvent, rules: ModelRules | None) -> None:
        self.result = result
        self.rules = rules
        # Ids from the result's own values (an absent name or version is "unknown"); text from cleaned ones.
        name = result.model_name or UNKNOWN
        version = result.model_version or UNKNOWN
        self.key = (result.event_id, name, version)
        self.name = _clean(name, UNKNOWN)
        self.version = _clean(version, UNKNOWN)
        self.at = _instant(result.at)
        self.device_id = ids.device_id(name, version)
        self.report_id = ids.resource_id("DiagnosticReport", *self.key)
        self.labels = list(result.scores)
        self.observation_ids = [str(ids.export_uuid("Observation", *self.key, label)) for label in self.labels]
        uid = _study_uid(result.study_uid)
        self.study: dict[str, Any] | None = (
            None
            if uid is None
            else {"type": "ImagingStudy", "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}}
        )
        accession = _clean(result.accession or "")
        self.order: dict[str, Any] | None = (
            None
            if not accession
            else {
                "type": "ServiceRequest",
                "identifier": {"type": {"coding": [dict(ACCESSION_TYPE)], "text": "Accession"}, "value": accession},
            }
        )

    def bundle(self) -> dict[str, Any]:
        entries = [
            self._entry("DiagnosticReport", self.report_id, self._report()),
            *(
                self._entry("Observation", obs_id, self._observation(obs_id, label))
                for obs_id, label in zip(self.observation_ids, self.labels, strict=True)
            ),
            self._entry("Device", self.device_id, self._device()),
            self._entry("Provenance", ids.resource_id("Provenance", *self.key), self._provenance()),
            self._entry("Task", ids.resource_id("Task", *self.key), self._task()),
        ]
        return {
            "resourceType": "Bundle",
            "id": ids.resource_id("Bundle", *self.key),
            "meta": {"security": [dict(AI_ASSERTED)]},
            "type": "transaction",
            "timestamp": self.at,
            "entry": entries,
        }

    @staticmethod
    def _entry(kind: str, resource_id: str, resource: dict[str, Any]) -> dict[str, Any]:
        """A `PUT` of the resource at its own id: a replay overwrites instead of adding a copy."""
        body = {"resourceType": kind, "id": resource_id, "meta": {"security": [dict(AI_ASSERTED)]}, **resource}
        return {
            "fullUrl": f"urn:uuid:{resource_id}",
            "resource": body,
            "request": {"method": "PUT", "url": f"{kind}/{resource_id}"},
        }

    def _concept(self, label: str) -> dict[str, Any]:
        """A label's concept: its standard code where known, and always the model's own label (so it survives)."""
        standard = _coding(codes.label_code(label))
        own = {"system": codes.LOCAL[0], "code": _clean(label), "display": _clean(label)}
        codings = [standard]
        if own["code"] and (own["system"], own["code"]) != (standard["system"], standard["code"]):
            codings.append(own)
        return {"coding": codings, "text": _clean(label, standard["display"])}

    def _conclusion(self) -> str:
        result = self.result
        priority = result.priority.value if result.priority is not None else "priority unknown"
        head = f"AI triage by model {self.name} {self.version} (not reviewed by a radiologist): {priority}"
        finding = result.top_finding
        if finding is None:
            return f"{head}; no finding reached the reporting threshold."
        score = result.scores.get(finding)
        odds = f" (p = {score:.2f})" if score is not None else ""
        return f"{head}; top finding {_clean(finding, 'unlabelled')}{odds}."

    def _report(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "identifier": [{"system": EVENT_SYSTEM, "value": _clean(self.result.event_id, UNKNOWN)}],
        }
        if self.order is not None:
            report["basedOn"] = [copy.deepcopy(self.order)]
        report |= {
            "status": "preliminary",
            "category": [{"coding": [dict(RADIOLOGY)]}],
            "code": {"coding": [_coding(codes.CHEST_XRAY)], "text": "Chest X-ray"},
            "effectiveDateTime": self.at,
            "issued": self.at,
            "result": [_reference("Observation", obs_id) for obs_id in self.observation_ids],
        }
        if self.study is not None:
            report["imagingStudy"] = [copy.deepcopy(self.study)]
        report["conclusion"] = self._conclusion()
        finding = self.result.top_finding
        if finding is not None:
            report["conclusionCode"] = [self._concept(finding)]
        return report

    def _observation(self, obs_id: str, label: str) -> dict[str, Any]:
        score = self.result.scores[label]
        observation: dict[str, Any] = {
            "status": "preliminary",
            "category": [{"coding": [dict(IMAGING)]}],
            "code": self._concept(label),
            "effectiveDateTime": self.at,
            "issued": self.at,
            "valueQuantity": {
                "value": round(score, 6),
                "unit": "1",
                "system": codes.UCUM[0],
                "code": "1",
            },
        }
        meaning = interpret(label, score, self.result.top_finding, self.rules)
        if meaning is not None:
            observation["interpretation"] = [
                {"coding": [{"system": INTERPRETATION_SYSTEM, "code": meaning.value, "display": meaning.display}]}
            ]
        if self.study is not None:
            observation["derivedFrom"] = [copy.deepcopy(self.study)]
        observation["device"] = _reference("Device", self.device_id)
        return observation

    def _device(self) -> dict[str, Any]:
        return {
            "identifier": [{"system": MODEL_SYSTEM, "value": f"{self.name}@{self.version}"}],
            "deviceName": [{"name": self.name, "type": "model-name"}],
            "type": {"text": "AI triage model"},
            "version": [{"value": self.version}],
        }

    def _provenance(self) -> dict[str, Any]:
        return {
            "target": [
                _reference("DiagnosticReport", self.report_id),
                *(_reference("Observation", obs_id) for obs_id in self.observation_ids),
            ],
            "recorded": self.at,
            "activity": {"coding": [dict(CREATE)]},
            "agent": [{"type": {"coding": [dict(AUTHOR)]}, "who": _reference("Device", self.device_id)}],
        }

    def _task(self) -> dict[str, Any]:
        task: dict[str, Any] = {"status": "requested", "intent": "order"}
        if self.result.priority is not None:
            task["priority"] = TASK_PRIORITY[self.result.priority]
        task |= {
            "code": {"text": "Read chest X-ray"},
            "description": self._conclusion(),
            "focus": _reference("DiagnosticReport", self.report_id),
            "authoredOn": self.at,
            "requester": _reference("Device", self.device_id),
        }
        return task
