"""The FHIR exporter's bundle: valid R4B, deterministic, self-consistent, and honest about being AI output.

Results are read from realistic `cxr.result/v1` messages by the worklist's own reader, as the exporter gets
them; the model's rules are the real demo bundle's (PNEUMONIA: STAT from 0.9, URGENT from 0.5; findings from
0.5; NORMAL is the normal label) or made by hand where a threshold matters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from hypothesis import assume, example, given
from hypothesis import strategies as st

from exporters import codes, fhir, ids
from exporters.errors import ExportCode, ExportError
from exporters.fhir import FHIR_VERSION, build_bundle, bundle_json
from exporters.interpret import ModelRules
from fuzz_profiles import fuzz_settings
from streaming.settings import default_bundle_dir
from streaming.triage import Priority, Threshold, TriageRules
from worklist.events import ImageEvent, Kind, Unreadable, read_result

#: Close to now, so the reader believes the message's own clock (it replaces a time a day off by "now").
SCORED_AT = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=123000)
INSTANT = SCORED_AT.isoformat(timespec="milliseconds").replace("+00:00", "Z")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


@pytest.fixture(scope="module")
def demo_rules() -> ModelRules:
    rules = ModelRules.of_bundle(default_bundle_dir())
    assert rules is not None
    return rules


def message(**changes: Any) -> dict[str, Any]:
    """A realistic result of the demo model (its name and version), with `changes`; None removes a field."""
    body: dict[str, Any] = {
        "schema": "cxr.result/v1",
        "event_id": "e1",
        "uri": "http://pacs/dicom-web/studies/1.2/series/1.3/instances/1.4",
        "study_uid": "1.2",
        "series_uid": "1.3",
        "sop_instance_uid": "1.4",
        "accession": "ACC1",
        "model": {"name": "pneumonia-xception", "version": "0.3.0"},
        "scores": {"NORMAL": 0.07, "PNEUMONIA": 0.93},
        "top_finding": "PNEUMONIA",
        "priority": "STAT",
        "sent_at": SCORED_AT.isoformat(),
        "scored_at": SCORED_AT.isoformat(),
        "latency_ms": 12.0,
    }
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


def result(**changes: Any) -> ImageEvent:
    return read_result(json.dumps(message(**changes)).encode(), None)


def reparsed(bundle: dict[str, Any]) -> Bundle:
    """The bundle as a server gets it: its bytes, parsed back and validated by the R4B models."""
    return Bundle.model_validate(json.loads(bundle_json(bundle)))


def resources(bundle: dict[str, Any], kind: str | None = None) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if kind is None or e["resource"]["resourceType"] == kind]


def one(bundle: dict[str, Any], kind: str) -> dict[str, Any]:
    (found,) = resources(bundle, kind)
    return found


def by_label(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Observations by the model's own label (their local coding)."""
    out = {}
    for obs in resources(bundle, "Observation"):
        own = [c for c in obs["code"]["coding"] if c["system"] == codes.LOCAL[0]]
        out[own[-1]["code"]] = obs
    return out


def interpretation(observation: dict[str, Any]) -> str | None:
    if "interpretation" not in observation:
        return None
    (coding,) = observation["interpretation"][0]["coding"]
    assert coding["system"] == INTERPRETATION
    return str(coding["code"])


def literal_references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            yield node["reference"]
        for value in node.values():
            yield from literal_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from literal_references(value)


def all_codes(node: Any) -> Iterator[str]:
    """Every Coding.code and Quantity.code in the bundle."""
    if isinstance(node, dict):
        if isinstance(node.get("code"), str):
            yield node["code"]
        for value in node.values():
            yield from all_codes(value)
    elif isinstance(node, list):
        for value in node:
            yield from all_codes(value)


def assert_well_formed(bundle: dict[str, Any]) -> None:
    """Valid R4B from its bytes, every entry a PUT of its own id, every reference naming an entry."""
    parsed = reparsed(bundle)
    assert parsed.type == "transaction"
    entries = bundle["entry"]
    urls = [e["request"]["url"] for e in entries]
    assert len(set(urls)) == len(urls)
    for entry in entries:
        res = entry["resource"]
        assert UUID.fullmatch(res["id"])
        assert entry["fullUrl"] == f"urn:uuid:{res['id']}"
        assert entry["request"] == {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}
    for ref in literal_references(bundle):
        assert ref in urls, ref
    for code in all_codes(bundle):
        assert code and code == code.strip() and "  " not in code


def test_the_bundle_is_an_r4b_transaction_of_report_observations_device_provenance_and_task(
    demo_rules: ModelRules,
) -> None:
    bundle = build_bundle(result(), demo_rules)
    assert_well_formed(bundle)
    assert FHIR_VERSION == "4.3.0"
    assert bundle["id"] == ids.resource_id("Bundle", "e1", "pneumonia-xception", "0.3.0")
    assert bundle["timestamp"] == INSTANT
    kinds = [r["resourceType"] for r in resources(bundle)]
    assert kinds == ["DiagnosticReport", "Observation", "Observation", "Device", "Provenance", "Task"]
    assert not any(kind in {"Patient", "ServiceRequest", "ImagingStudy"} for kind in kinds)
    assert all("subject" not in r for r in resources(bundle))


def test_the_report_is_a_preliminary_radiology_chest_xray_report_that_says_it_is_ai(demo_rules: ModelRules) -> None:
    bundle = build_bundle(result(), demo_rules)
    report = one(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary"
    assert report["category"][0]["coding"][0] | {"display": ""} == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
        "code": "RAD",
        "display": "",
    }
    assert report["code"]["coding"][0]["system"] == "http://loinc.org"
    assert report["code"]["coding"][0]["code"] == codes.CHEST_XRAY.value
    assert report["effectiveDateTime"] == report["issued"] == INSTANT
    assert report["conclusion"] == (
        "AI triage by model pneumonia-xception 0.3.0 (not reviewed by a radiologist): STAT; "
        "top finding PNEUMONIA (p = 0.93)."
    )
    (conclusion_code,) = report["conclusionCode"]
    assert {"system": "http://snomed.info/sct", "code": "233604007"}.items() <= conclusion_code["coding"][0].items()
    assert report["result"] == [{"reference": f"Observation/{o['id']}"} for o in resources(bundle, "Observation")]
    assert "performer" not in report


def test_the_report_names_the_study_by_uid_and_the_order_by_accession(demo_rules: ModelRules) -> None:
    bundle = build_bundle(result(study_uid="1.2.840.113619.2.55.3", accession="ACC-77"), demo_rules)
    report = one(bundle, "DiagnosticReport")
    study = {
        "type": "ImagingStudy",
        "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.113619.2.55.3"},
    }
    assert report["imagingStudy"] == [study]
    (order,) = report["basedOn"]
    assert order["type"] == "ServiceRequest"
    assert order["identifier"]["value"] == "ACC-77"
    assert order["identifier"]["type"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/v2-0203"
    assert order["identifier"]["type"]["coding"][0]["code"] == "ACSN"
    assert all(obs["derivedFrom"] == [study] for obs in resources(bundle, "Observation"))


@pytest.mark.parametrize(
    "changes",
    [
        {"study_uid": None, "accession": None},
        {"study_uid": "", "accession": ""},
        {"study_uid": "not a dicom uid", "accession": " \t "},
    ],
    ids=["absent", "empty", "unusable"],
)
def test_without_study_uid_or_accession_the_bundle_is_valid_without_those_references(
    changes: dict[str, Any], demo_rules: ModelRules
) -> None:
    bundle = build_bundle(result(**changes), demo_rules)
    assert_well_formed(bundle)
    report = one(bundle, "DiagnosticReport")
    assert "imagingStudy" not in report
    assert "basedOn" not in report
    assert all("derivedFrom" not in obs for obs in resources(bundle, "Observation"))


def test_building_twice_gives_the_same_bytes_and_a_new_model_version_or_event_new_ids(demo_rules: ModelRules) -> None:
    first = bundle_json(build_bundle(result(), demo_rules))
    assert first == bundle_json(build_bundle(result(), demo_rules))
    event = result()
    assert bundle_json(build_bundle(event, demo_rules)) == bundle_json(build_bundle(event, demo_rules))

    def entry_ids(raw: bytes) -> set[str]:
        return {e["resource"]["id"] for e in json.loads(raw)["entry"]} | {json.loads(raw)["id"]}

    other_version = bundle_json(build_bundle(result(model={"name": "pneumonia-xception", "version": "0.4.0"}), None))
    assert entry_ids(first).isdisjoint(entry_ids(other_version))
    other_event = bundle_json(build_bundle(result(event_id="e2"), demo_rules))
    shared = entry_ids(first) & entry_ids(other_event)
    assert shared == {ids.device_id("pneumonia-xception", "0.3.0")}  # one Device per model version


def test_one_observation_per_label_with_its_probability_from_the_model_device(demo_rules: ModelRules) -> None:
    scores = {"NORMAL": 0.0312345678, "PNEUMONIA": 0.9687654321}
    bundle = build_bundle(result(scores=scores), demo_rules)
    observations = by_label(bundle)
    assert set(observations) == set(scores)
    device = one(bundle, "Device")
    for label, obs in observations.items():
        assert obs["status"] == "preliminary"
        assert obs["category"][0]["coding"][0]["code"] == "imaging"
        assert obs["code"]["coding"][0] == {
            "system": codes.label_code(label).system,
            "code": codes.label_code(label).value,
            "display": codes.label_code(label).meaning,
        }
        assert obs["valueQuantity"] == {
            "value": round(scores[label], 6),
            "unit": "1",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        }
        assert obs["effectiveDateTime"] == INSTANT
        assert obs["device"] == {"reference": f"Device/{device['id']}"}


@pytest.mark.parametrize(
    ("scores", "top_finding", "expected"),
    [
        ({"NORMAL": 0.05, "PNEUMONIA": 0.95}, "PNEUMONIA", {"NORMAL": None, "PNEUMONIA": "AA"}),
        ({"NORMAL": 0.1, "PNEUMONIA": 0.9}, "PNEUMONIA", {"NORMAL": None, "PNEUMONIA": "AA"}),
        ({"NORMAL": 0.4, "PNEUMONIA": 0.6}, "PNEUMONIA", {"NORMAL": None, "PNEUMONIA": "A"}),
        ({"NORMAL": 0.5, "PNEUMONIA": 0.5}, "PNEUMONIA", {"NORMAL": "N", "PNEUMONIA": "A"}),
        ({"NORMAL": 0.7, "PNEUMONIA": 0.3}, None, {"NORMAL": "N", "PNEUMONIA": "NEG"}),
        (
            {"NORMAL": 0.6, "PNEUMONIA": 0.2, "EFFUSION": 0.55},
            "EFFUSION",
            {"NORMAL": "N", "PNEUMONIA": "NEG", "EFFUSION": "POS"},
        ),
        (
            {"NORMAL": 0.9, "PNEUMONIA": 0.05, "EFFUSION": 0.05},
            None,
            {"NORMAL": "N", "PNEUMONIA": "NEG", "EFFUSION": "NEG"},
        ),
    ],
    ids=["stat", "stat-at-threshold", "urgent", "urgent-at-threshold", "below-finding", "other-finding", "normal"],
)
def test_interpretations_follow_the_demo_models_thresholds(
    scores: dict[str, float], top_finding: str | None, expected: dict[str, str | None], demo_rules: ModelRules
) -> None:
    bundle = build_bundle(result(scores=scores, top_finding=top_finding), demo_rules)
    assert_well_formed(bundle)
    assert {label: interpretation(obs) for label, obs in by_label(bundle).items()} == expected


def test_hand_made_rules_apply_to_their_own_model_only() -> None:
    rules = ModelRules(
        "cxr-multi",
        "2.1",
        ("NO_FINDING",),
        TriageRules(thresholds=(Threshold(label="PNEUMOTHORAX", stat=0.8, urgent=0.4),), finding_threshold=0.3),
    )
    scores = {"NO_FINDING": 0.35, "PNEUMOTHORAX": 0.45, "NODULE": 0.31, "EDEMA": 0.1}
    own = build_bundle(
        result(model={"name": "cxr-multi", "version": "2.1"}, scores=scores, top_finding="PNEUMOTHORAX"), rules
    )
    assert {label: interpretation(obs) for label, obs in by_label(own).items()} == {
        "NO_FINDING": "N",
        "PNEUMOTHORAX": "A",
        "NODULE": "POS",
        "EDEMA": "NEG",
    }
    for model in ({"name": "cxr-multi", "version": "2.2"}, {"name": "other", "version": "2.1"}, None):
        other = build_bundle(result(model=model, scores=scores, top_finding="PNEUMOTHORAX"), rules)
        assert {label: interpretation(obs) for label, obs in by_label(other).items()} == {
            "NO_FINDING": None,
            "PNEUMOTHORAX": "POS",
            "NODULE": None,
            "EDEMA": None,
        }


def test_without_rules_only_the_top_finding_is_positive() -> None:
    bundle = build_bundle(result(), None)
    assert {label: interpretation(obs) for label, obs in by_label(bundle).items()} == {
        "NORMAL": None,
        "PNEUMONIA": "POS",
    }


@pytest.mark.parametrize(("priority", "code"), [("STAT", "stat"), ("URGENT", "urgent"), ("ROUTINE", "routine")])
def test_the_task_carries_the_triage_priority_for_the_report(priority: str, code: str, demo_rules: ModelRules) -> None:
    bundle = build_bundle(result(priority=priority), demo_rules)
    task = one(bundle, "Task")
    assert task["status"] == "requested"
    assert task["intent"] == "order"
    assert task["priority"] == code
    assert task["code"] == {"text": "Read chest X-ray"}
    assert task["focus"] == {"reference": f"DiagnosticReport/{one(bundle, 'DiagnosticReport')['id']}"}
    assert task["authoredOn"] == INSTANT
    assert f": {priority};" in one(bundle, "DiagnosticReport")["conclusion"]


def test_the_device_and_provenance_name_the_model_as_author(demo_rules: ModelRules) -> None:
    bundle = build_bundle(result(), demo_rules)
    device = one(bundle, "Device")
    assert device["id"] == ids.device_id("pneumonia-xception", "0.3.0")
    assert device["deviceName"] == [{"name": "pneumonia-xception", "type": "model-name"}]
    assert device["version"] == [{"value": "0.3.0"}]
    assert device["identifier"] == [{"system": "urn:cxr-stream:model", "value": "pneumonia-xception@0.3.0"}]
    assert device["type"] == {"text": "AI triage model"}
    provenance = one(bundle, "Provenance")
    targets = [one(bundle, "DiagnosticReport"), *resources(bundle, "Observation")]
    assert provenance["target"] == [{"reference": f"{r['resourceType']}/{r['id']}"} for r in targets]
    assert provenance["recorded"] == INSTANT
    (agent,) = provenance["agent"]
    assert agent["type"]["coding"][0]["system"] == "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
    assert agent["type"]["coding"][0]["code"] == "author"
    assert agent["who"] == {"reference": f"Device/{device['id']}"}


def test_every_resource_is_tagged_ai_asserted(demo_rules: ModelRules) -> None:
    bundle = build_bundle(result(), demo_rules)
    tag = {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
        "code": "AIAST",
        "display": "Artificial Intelligence asserted",
    }
    for res in [bundle, *resources(bundle)]:
        assert tag in res["meta"]["security"], res["resourceType"]


def test_a_result_without_model_name_or_version_is_exported_as_unknown() -> None:
    bundle = build_bundle(result(model=None), None)
    assert_well_formed(bundle)
    assert one(bundle, "Device")["id"] == ids.device_id("unknown", "unknown")
    assert bundle["id"] == ids.resource_id("Bundle", "e1", "unknown", "unknown")
    assert "model unknown unknown" in one(bundle, "DiagnosticReport")["conclusion"]


def test_a_result_without_a_top_finding_says_so() -> None:
    bundle = build_bundle(result(scores={"NORMAL": 0.8, "PNEUMONIA": 0.2}, top_finding=None, priority="ROUTINE"), None)
    report = one(bundle, "DiagnosticReport")
    assert "conclusionCode" not in report
    assert report["conclusion"].endswith("ROUTINE; no finding reached the reporting threshold.")


HOSTILE_LABELS = [
    " PNEUMONIA ",
    "pleural effusion",
    "Épanchement   pleural\t(gauche)",
    "肺炎",
    "x" * 500,
    "a\x00b\x1fc\x7f",
    "\u00a0\u2003",
    "\n",
    "",
    "🫁 lung",
    "a\u200bb",
]


def test_hostile_labels_still_validate_and_keep_ids_out_of_labels(demo_rules: ModelRules) -> None:
    scores = {label: round(i / len(HOSTILE_LABELS), 3) for i, label in enumerate(HOSTILE_LABELS)}
    bundle = build_bundle(result(scores=scores, top_finding="x" * 500), demo_rules)
    assert_well_formed(bundle)
    assert len(resources(bundle, "Observation")) == len(HOSTILE_LABELS)
    assert "top finding " + "x" * 500 + " (p = " in one(bundle, "DiagnosticReport")["conclusion"]


def test_many_labels_still_validate() -> None:
    scores = {f"finding {i}": i / 400 for i in range(400)}
    bundle = build_bundle(result(scores=scores, top_finding="finding 399"), None)
    assert_well_formed(bundle)
    assert len(resources(bundle, "Observation")) == 400


def test_a_refusal_by_the_library_is_an_invalid_export_that_quotes_no_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fhir, "_instant", lambda at: "SECRET-not-a-time")
    with pytest.raises(ExportError) as caught:
        build_bundle(result(), None)
    assert caught.value.code is ExportCode.INVALID_EXPORT
    assert not caught.value.transient
    assert "effectiveDateTime" in caught.value.reason
    assert "SECRET" not in caught.value.reason


def made(**changes: Any) -> ImageEvent:
    """A result built by hand (not through the reader), for what the reader would have refused."""
    fields: dict[str, Any] = {
        "kind": Kind.SCORED,
        "event_id": "e1",
        "study_key": "1.2",
        "arrived_at": SCORED_AT,
        "at": SCORED_AT,
        "study_uid": "1.2",
        "priority": Priority.URGENT,
        "top_finding": "PNEUMONIA",
        "scores": {"NORMAL": 0.4, "PNEUMONIA": 0.6},
        "model_name": "m",
        "model_version": "1",
    }
    return ImageEvent(**(fields | changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"scores": {"PNEUMONIA": float("nan")}},
        {"scores": {"PNEUMONIA": float("inf")}},
    ],
    ids=["nan", "infinity"],
)
def test_what_the_reader_would_refuse_is_an_invalid_export(changes: dict[str, Any]) -> None:
    with pytest.raises(ExportError) as caught:
        build_bundle(made(**changes), None)
    assert caught.value.code is ExportCode.INVALID_EXPORT


@pytest.mark.parametrize(
    "changes",
    [{"event_id": "e\udc00"}, {"scores": {"PNEU\ud800": 0.5}, "top_finding": None}],
    ids=["surrogate-event", "surrogate-label"],
)
def test_text_the_reader_would_refuse_never_breaks_the_builder(changes: dict[str, Any]) -> None:
    """Lone surrogates (refused by `read_result`) are cleaned out of the text; the ids still name the result."""
    try:
        bundle = build_bundle(made(**changes), None)
    except ExportError as exc:
        assert exc.code is ExportCode.INVALID_EXPORT
    else:
        assert_well_formed(bundle)


def test_a_hand_made_result_with_a_naive_time_and_no_priority_still_validates() -> None:
    bundle = build_bundle(made(at=SCORED_AT.replace(tzinfo=None), priority=None), None)
    assert_well_formed(bundle)
    assert bundle["timestamp"] == INSTANT
    assert "priority" not in one(bundle, "Task")


TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
LABELS = st.dictionaries(
    st.one_of(TEXT, st.sampled_from(["NORMAL", "PNEUMONIA", " pneumonia ", "x" * 500])),
    st.floats(0.0, 1.0, allow_nan=False),
    min_size=1,
    max_size=8,
)


@fuzz_settings(ci=60, long=5000)
@given(
    scores=LABELS,
    pick=st.integers(0, 7) | st.none(),
    event_id=TEXT,
    study_uid=TEXT | st.sampled_from(["1.2.840.10008.1", "2.25.1"]) | st.none(),
    accession=TEXT | st.none(),
    name=TEXT | st.just("pneumonia-xception") | st.none(),
    version=TEXT | st.just("0.3.0") | st.none(),
    priority=st.sampled_from(["STAT", "URGENT", "ROUTINE"]),
    with_rules=st.booleans(),
)
@example(
    scores={"\x85": 0.5, " ": 1.0},
    pick=0,
    event_id="\u3000",
    study_uid="0" * 65,
    accession="\x0b",
    name="\u2028",
    version="",
    priority="STAT",
    with_rules=False,
)
def test_any_readable_result_gives_a_valid_bundle_or_an_export_error(
    scores: dict[str, float],
    pick: int | None,
    event_id: str,
    study_uid: str | None,
    accession: str | None,
    name: str | None,
    version: str | None,
    priority: str,
    with_rules: bool,
) -> None:
    labels = list(scores)
    top = labels[pick % len(labels)] if pick is not None else None
    body = message(
        event_id=event_id,
        study_uid=study_uid,
        accession=accession,
        scores=scores,
        top_finding=top,
        priority=priority,
        model={"name": name, "version": version},
    )
    try:
        event = read_result(json.dumps(body).encode(), None)
    except Unreadable:
        assume(False)
        return
    rules = ModelRules.of_bundle(default_bundle_dir()) if with_rules else None
    try:
        bundle = build_bundle(event, rules)
    except ExportError as exc:
        assert exc.code is ExportCode.INVALID_EXPORT
        return
    assert_well_formed(bundle)
    assert bundle_json(bundle) == bundle_json(build_bundle(event, rules))
    assert len(resources(bundle, "Observation")) == len(scores)


#: Any text at all, lone surrogates included (a result built by hand may hold them).
WILD_TEXT = st.text(st.characters() | st.sampled_from(["\ud800", "\udfff", "\x00", "\u2028"]), max_size=20)


@fuzz_settings(ci=40, long=3000)
@given(
    scores=st.dictionaries(WILD_TEXT, st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=5),
    event_id=WILD_TEXT,
    name=WILD_TEXT | st.none(),
    at=st.datetimes(timezones=st.none() | st.timezones()),
)
def test_any_hand_made_result_gives_a_valid_bundle_or_an_export_error(
    scores: dict[str, float], event_id: str, name: str | None, at: datetime
) -> None:
    try:
        bundle = build_bundle(made(scores=scores, event_id=event_id, model_name=name, at=at, top_finding=None), None)
    except ExportError as exc:
        assert exc.code is ExportCode.INVALID_EXPORT
        return
    assert_well_formed(bundle)
