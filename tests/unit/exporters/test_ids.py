"""Export ids: the same result always names the same FHIR resources and SR instance, and different results, models,
model versions or kinds of thing never share one. UIDs are valid DICOM UIDs under `2.25`, resource ids valid FHIR
ids, whatever text the result carried."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from exporters import ids
from fuzz_profiles import fuzz_settings
from worklist.events import Unreadable, read_result

#: FHIR R4 `id`: 1 to 64 of letters, digits, '-' and '.'.
FHIR_ID = re.compile(r"[A-Za-z0-9\-\.]{1,64}")
#: A DICOM UID (PS3.5 9.1): dot-separated numeric components, no leading zero unless the component is "0".
UID_COMPONENT = re.compile(r"0|[1-9][0-9]*")

EVENT, NAME, VERSION = "e1", "pneumonia-xception", "1.0.0"
RESOURCE_KINDS = ("DiagnosticReport", "Observation", "Provenance", "Task", "Bundle", "ImagingStudy")


def assert_dicom_uid(value: str) -> None:
    assert value.startswith("2.25."), value
    assert len(value) <= 64, value
    components = value.split(".")
    assert all(UID_COMPONENT.fullmatch(part) for part in components), value
    # the third component is the UUID as one integer (at most 39 digits)
    assert len(components) == 3 and len(components[2]) <= 39


def assert_fhir_id(value: str) -> None:
    assert FHIR_ID.fullmatch(value), value


def result_message(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "schema": "cxr.result/v1",
        "event_id": EVENT,
        "uri": "file:///x.dcm",
        "study_uid": "1.2",
        "series_uid": "1.3",
        "sop_instance_uid": "1.4",
        "accession": "ACC1",
        "model": {"name": NAME, "version": VERSION},
        "scores": {"NORMAL": 0.07, "PNEUMONIA": 0.93},
        "top_finding": "PNEUMONIA",
        "priority": "STAT",
        "sent_at": "2026-11-26T10:00:00.000Z",
        "scored_at": "2026-11-26T10:00:01.000Z",
        "latency_ms": 1000.0,
    }
    body.update(changes)
    return json.dumps(body).encode("utf-8")


# ------------------------------------------------------------------------------------------------ determinism


def test_every_id_is_the_same_on_every_call() -> None:
    makers: list[Callable[[], str]] = [
        lambda: ids.resource_id("Observation", EVENT, NAME, VERSION),
        lambda: ids.device_id(NAME, VERSION),
        lambda: ids.sr_instance_uid(EVENT, NAME, VERSION),
        lambda: ids.sr_series_uid("1.2", NAME, VERSION),
        lambda: ids.device_uid(NAME, VERSION),
        lambda: ids.tracking_uid(EVENT, NAME, VERSION, "PNEUMONIA"),
        lambda: ids.uid("anything", "a", "b"),
    ]
    for make in makers:
        assert make() == make()


def test_ids_are_pinned_to_the_fixed_namespace() -> None:
    # Changing the namespace (or the way parts are joined) would duplicate every past export on the receivers.
    namespace = uuid.UUID("6f1d3c52-8a4e-5b7f-9c2d-0e1f2a3b4c5d")
    assert namespace == ids.NAMESPACE
    expected = uuid.uuid5(namespace, '["Observation", "e1", "pneumonia-xception", "1.0.0"]')
    assert ids.resource_id("Observation", EVENT, NAME, VERSION) == str(expected)
    instance = uuid.uuid5(namespace, '["sr-instance", "e1", "pneumonia-xception", "1.0.0"]')
    assert ids.sr_instance_uid(EVENT, NAME, VERSION) == f"2.25.{instance.int}"


def test_ids_are_name_based_uuids_version_5() -> None:
    value = uuid.UUID(ids.resource_id("DiagnosticReport", EVENT, NAME, VERSION))
    assert value.version == 5
    assert value.variant == uuid.RFC_4122


def test_a_result_read_twice_gets_the_same_ids() -> None:
    first, second = read_result(result_message(), None), read_result(result_message(), None)
    assert first.model_name is not None and first.model_version is not None
    assert second.model_name is not None and second.model_version is not None
    assert ids.resource_id("Observation", first.event_id, first.model_name, first.model_version) == ids.resource_id(
        "Observation", second.event_id, second.model_name, second.model_version
    )
    assert ids.sr_instance_uid(first.event_id, first.model_name, first.model_version) == ids.sr_instance_uid(
        second.event_id, second.model_name, second.model_version
    )


# ------------------------------------------------------------------------------------------------ distinctness


@pytest.mark.parametrize(
    "other",
    [
        ("e2", NAME, VERSION),
        (EVENT, "other-model", VERSION),
        (EVENT, NAME, "1.0.1"),
        ("E1", NAME, VERSION),  # ids are case-sensitive, like the event ids they come from
    ],
    ids=["event", "model-name", "model-version", "case"],
)
def test_another_event_model_or_version_gets_other_ids(other: tuple[str, str, str]) -> None:
    mine = (EVENT, NAME, VERSION)
    for kind in RESOURCE_KINDS:
        assert ids.resource_id(kind, *mine) != ids.resource_id(kind, *other)
    assert ids.sr_instance_uid(*mine) != ids.sr_instance_uid(*other)
    assert ids.tracking_uid(*mine, "PNEUMONIA") != ids.tracking_uid(*other, "PNEUMONIA")


def test_each_kind_of_resource_gets_its_own_id() -> None:
    resources = {ids.resource_id(kind, EVENT, NAME, VERSION) for kind in RESOURCE_KINDS}
    assert len(resources) == len(RESOURCE_KINDS)
    uids = {
        ids.sr_instance_uid(EVENT, NAME, VERSION),
        ids.sr_series_uid(EVENT, NAME, VERSION),  # a study key equal to the event id (no study UID)
        ids.uid("other-kind", EVENT, NAME, VERSION),
    }
    assert len(uids) == 3


def test_a_new_model_version_is_a_new_device_and_a_new_sr_series() -> None:
    assert ids.device_id(NAME, "1.0.0") != ids.device_id(NAME, "1.0.1")
    assert ids.device_uid(NAME, "1.0.0") != ids.device_uid(NAME, "1.0.1")
    assert ids.device_id(NAME, VERSION) != ids.device_id("other-model", VERSION)
    assert ids.sr_series_uid("1.2", NAME, "1.0.0") != ids.sr_series_uid("1.2", NAME, "1.0.1")
    assert ids.sr_series_uid("1.2", NAME, VERSION) != ids.sr_series_uid("1.2.3", NAME, VERSION)


def test_the_results_of_one_study_share_the_sr_series_but_not_the_instance() -> None:
    # Two images of study 1.2 scored by the same model version: one series of reports, one instance per image.
    assert ids.sr_instance_uid("e1", NAME, VERSION) != ids.sr_instance_uid("e2", NAME, VERSION)
    assert ids.sr_series_uid("1.2", NAME, VERSION) == ids.sr_series_uid("1.2", NAME, VERSION)


def test_each_finding_gets_its_own_tracking_uid() -> None:
    labels = ["PNEUMONIA", "NORMAL", "pneumonia", "EFFUSION"]
    assert len({ids.tracking_uid(EVENT, NAME, VERSION, label) for label in labels}) == len(labels)


def test_parts_are_not_simply_concatenated() -> None:
    # "ab" + "c" and "a" + "bc" are different results: the separator keeps them apart.
    assert ids.resource_id("Observation", "ab", "c", VERSION) != ids.resource_id("Observation", "a", "bc", VERSION)
    assert ids.device_id("a", "b.c") != ids.device_id("a.b", "c")
    assert ids.uid("k", "", "x") != ids.uid("k", "x", "")


def test_two_readable_results_never_share_ids_even_with_the_separator_inside_a_field() -> None:
    try:
        one = read_result(result_message(event_id="a\x1fb", model={"name": "c", "version": "1"}), None)
        two = read_result(result_message(event_id="a", model={"name": "b\x1fc", "version": "1"}), None)
    except Unreadable:
        return  # fixed in the reader: such results are refused (dead-lettered) before any id is made
    assert (one.event_id, one.model_name) != (two.event_id, two.model_name)
    assert one.model_name is not None and one.model_version is not None
    assert two.model_name is not None and two.model_version is not None
    assert ids.sr_instance_uid(one.event_id, one.model_name, one.model_version) != ids.sr_instance_uid(
        two.event_id, two.model_name, two.model_version
    )


# ------------------------------------------------------------------------------------------------ syntax


def test_uids_are_dicom_uids_under_the_uuid_root() -> None:
    made = {
        "sr-instance": (ids.sr_instance_uid(EVENT, NAME, VERSION), (EVENT, NAME, VERSION)),
        "sr-series": (ids.sr_series_uid("1.2", NAME, VERSION), ("1.2", NAME, VERSION)),
        "device": (ids.device_uid(NAME, VERSION), (NAME, VERSION)),
        "tracking": (ids.tracking_uid(EVENT, NAME, VERSION, "PNEUMONIA"), (EVENT, NAME, VERSION, "PNEUMONIA")),
    }
    for kind, (value, parts) in made.items():
        assert_dicom_uid(value)
        assert int(value.split(".")[2]) == ids.export_uuid(kind, *parts).int


def test_resource_ids_are_fhir_ids() -> None:
    for kind in RESOURCE_KINDS:
        assert_fhir_id(ids.resource_id(kind, EVENT, NAME, VERSION))
    assert_fhir_id(ids.device_id(NAME, VERSION))


def test_empty_and_huge_parts_still_give_valid_ids() -> None:
    for event, name, version in [("", "", ""), ("e" * 100_000, "m" * 5000, "v" * 5000), ("\x00", "\\", "\n")]:
        assert_fhir_id(ids.resource_id("Observation", event, name, version))
        assert_fhir_id(ids.device_id(name, version))
        assert_dicom_uid(ids.sr_instance_uid(event, name, version))
        assert_dicom_uid(ids.tracking_uid(event, name, version, name))


#: Arbitrary Unicode (hypothesis leaves out lone surrogates: they are not text a UTF-8 message can carry).
texts = st.text(max_size=200)


@fuzz_settings(ci=300, long=20_000)
@given(kind=texts, event=texts, name=texts, version=texts, label=texts)
@example(kind="", event="", name="", version="", label="")
@example(kind="Observation", event="\U0001f9e0 e1", name="模型", version="1.0\u200b", label="\ufeff")
def test_any_text_gives_valid_deterministic_ids(kind: str, event: str, name: str, version: str, label: str) -> None:
    resource = ids.resource_id(kind, event, name, version)
    assert_fhir_id(resource)
    assert resource == ids.resource_id(kind, event, name, version)
    assert_fhir_id(ids.device_id(name, version))
    for value in (
        ids.sr_instance_uid(event, name, version),
        ids.sr_series_uid(event, name, version),
        ids.device_uid(name, version),
        ids.tracking_uid(event, name, version, label),
        ids.uid(kind, event, name, version, label),
    ):
        assert_dicom_uid(value)
    assert ids.sr_instance_uid(event, name, version) == ids.sr_instance_uid(event, name, version)


@fuzz_settings(ci=300, long=20_000)
@given(first=st.tuples(texts, texts, texts), second=st.tuples(texts, texts, texts))
def test_different_results_without_the_separator_get_different_ids(
    first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    if first == second or any("\x1f" in part for part in (*first, *second)):
        return
    assert ids.resource_id("Observation", *first) != ids.resource_id("Observation", *second)
    assert ids.sr_instance_uid(*first) != ids.sr_instance_uid(*second)


def test_every_score_label_a_result_can_carry_gets_a_tracking_uid() -> None:
    try:
        result = read_result(result_message(scores={"NORMAL": 0.07, "PNEUMONIA": 0.93, "\ud800x": 0.1}), None)
    except Unreadable:
        return  # fixed in the reader: the label is refused like any other text that is not valid Unicode
    assert result.model_name is not None and result.model_version is not None
    for label in result.scores:
        assert_dicom_uid(ids.tracking_uid(result.event_id, result.model_name, result.model_version, label))
