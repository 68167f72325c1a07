"""What a score means: the model bundle's thresholds apply only to that model's results, every branch of
`interpret`, and the coded concept of each model label (SNOMED CT where known, a DICOM-sized local code else)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from exporters import codes
from exporters.interpret import Interpretation, ModelRules, interpret, rules_for
from streaming.settings import default_bundle_dir
from streaming.triage import Threshold, TriageRules

I = Interpretation  # noqa: E741


@pytest.fixture(scope="module")
def bundle_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((default_bundle_dir() / "bundle.json").read_text("utf-8"))
    return data


@pytest.fixture(scope="module")
def demo() -> ModelRules:
    rules = ModelRules.of_bundle(default_bundle_dir())
    assert rules is not None
    return rules


def hand_made(*thresholds: Threshold, finding: float = 0.5, normal: tuple[str, ...] = ("NORMAL",)) -> ModelRules:
    return ModelRules("hand-made", "1", normal, TriageRules(thresholds=thresholds, finding_threshold=finding))


# ------------------------------------------------------------------------------------------------ the bundle


def test_the_demo_bundle_rules_are_its_bundle_json(demo: ModelRules, bundle_json: dict[str, Any]) -> None:
    assert demo.name == bundle_json["name"] == "pneumonia-xception"
    assert demo.version == bundle_json["version"]
    assert demo.normal_labels == tuple(bundle_json["normal_labels"]) == ("NORMAL",)
    assert demo.triage.finding_threshold == bundle_json["triage"]["finding_threshold"]
    assert [t.model_dump(exclude_none=True) for t in demo.triage.thresholds] == bundle_json["triage"]["thresholds"]
    # The branch tests below rely on these numbers: PNEUMONIA STAT from 0.9, URGENT from 0.5; findings from 0.5.
    assert bundle_json["triage"] == {
        "thresholds": [{"label": "PNEUMONIA", "stat": 0.9, "urgent": 0.5}],
        "finding_threshold": 0.5,
    }


@pytest.mark.parametrize(
    ("label", "score", "expected"),
    [
        ("PNEUMONIA", 0.93, I.CRITICAL),
        ("PNEUMONIA", 0.9, I.CRITICAL),  # at the STAT threshold
        ("PNEUMONIA", 1.0, I.CRITICAL),
        ("PNEUMONIA", 0.8999, I.ABNORMAL),
        ("PNEUMONIA", 0.5, I.ABNORMAL),  # at the URGENT threshold
        ("PNEUMONIA", 0.4999, I.NEGATIVE),
        ("PNEUMONIA", 0.0, I.NEGATIVE),
        ("NORMAL", 0.93, I.NORMAL),
        ("NORMAL", 0.5, I.NORMAL),  # at the finding threshold
        ("NORMAL", 0.07, None),  # a normal label below the finding threshold says nothing
        ("EFFUSION", 0.6, I.POSITIVE),  # a label with no triage threshold: the finding threshold alone
        ("EFFUSION", 0.5, I.POSITIVE),
        ("EFFUSION", 0.49, I.NEGATIVE),
    ],
)
def test_demo_rules(demo: ModelRules, label: str, score: float, expected: Interpretation | None) -> None:
    # The top finding does not matter once the model's rules are known.
    for top in ("PNEUMONIA", None, label):
        assert interpret(label, score, top, demo) is expected


def test_labels_are_matched_exactly(demo: ModelRules) -> None:
    # "pneumonia" is not the bundle's "PNEUMONIA": no STAT threshold, and not a normal label either.
    assert interpret("pneumonia", 0.95, None, demo) is I.POSITIVE
    assert interpret("normal", 0.95, None, demo) is I.POSITIVE
    assert interpret("normal", 0.1, None, demo) is I.NEGATIVE


# ------------------------------------------------------------------------------------------------ without rules


@pytest.mark.parametrize(
    ("label", "score", "top", "expected"),
    [
        ("PNEUMONIA", 0.93, "PNEUMONIA", I.POSITIVE),
        ("PNEUMONIA", 0.01, "PNEUMONIA", I.POSITIVE),  # the result's own word, whatever the score
        ("NORMAL", 0.93, "PNEUMONIA", None),
        ("NORMAL", 0.93, None, None),
        ("PNEUMONIA", 0.93, None, None),  # no top finding, no rules: nothing can be said
        ("pneumonia", 0.93, "PNEUMONIA", None),
    ],
)
def test_without_rules_only_the_top_finding_is_interpreted(
    label: str, score: float, top: str | None, expected: Interpretation | None
) -> None:
    assert interpret(label, score, top, None) is expected


# ------------------------------------------------------------------------------------------------ hand-made rules


def test_a_threshold_with_only_urgent() -> None:
    rules = hand_made(Threshold(label="EDEMA", urgent=0.3), finding=0.5)
    assert interpret("EDEMA", 1.0, None, rules) is I.ABNORMAL  # never CRITICAL without a STAT threshold
    assert interpret("EDEMA", 0.4, None, rules) is I.ABNORMAL  # urgent below the finding threshold still counts
    assert interpret("EDEMA", 0.3, None, rules) is I.ABNORMAL
    assert interpret("EDEMA", 0.29, None, rules) is I.NEGATIVE


def test_a_threshold_with_only_stat() -> None:
    rules = hand_made(Threshold(label="PNEUMOTHORAX", stat=0.7), finding=0.5)
    assert interpret("PNEUMOTHORAX", 0.7, None, rules) is I.CRITICAL
    assert interpret("PNEUMOTHORAX", 0.69, None, rules) is I.POSITIVE  # no URGENT threshold: finding threshold
    assert interpret("PNEUMOTHORAX", 0.49, None, rules) is I.NEGATIVE


def test_a_threshold_without_numbers_falls_back_to_the_finding_threshold() -> None:
    rules = hand_made(Threshold(label="NODULE"), finding=0.4)
    assert interpret("NODULE", 0.99, None, rules) is I.POSITIVE
    assert interpret("NODULE", 0.4, None, rules) is I.POSITIVE
    assert interpret("NODULE", 0.39, None, rules) is I.NEGATIVE


def test_a_urgent_band_above_the_finding_threshold_leaves_positives_below_it() -> None:
    rules = hand_made(Threshold(label="CARDIOMEGALY", stat=0.95, urgent=0.8), finding=0.5)
    assert interpret("CARDIOMEGALY", 0.95, None, rules) is I.CRITICAL
    assert interpret("CARDIOMEGALY", 0.8, None, rules) is I.ABNORMAL
    assert interpret("CARDIOMEGALY", 0.79, None, rules) is I.POSITIVE
    assert interpret("CARDIOMEGALY", 0.5, None, rules) is I.POSITIVE
    assert interpret("CARDIOMEGALY", 0.49, None, rules) is I.NEGATIVE


def test_another_labels_threshold_does_not_apply() -> None:
    rules = hand_made(Threshold(label="PNEUMONIA", stat=0.2, urgent=0.1), finding=0.5)
    assert interpret("EFFUSION", 0.3, None, rules) is I.NEGATIVE
    assert interpret("PNEUMONIA", 0.3, None, rules) is I.CRITICAL


def test_several_thresholds_for_one_label_the_first_that_fires_wins() -> None:
    rules = hand_made(Threshold(label="X", urgent=0.6), Threshold(label="X", stat=0.8), finding=0.5)
    assert interpret("X", 0.9, None, rules) is I.ABNORMAL  # the first rule already says URGENT
    assert interpret("X", 0.55, None, rules) is I.POSITIVE


def test_a_normal_label_is_never_critical_even_with_a_threshold() -> None:
    rules = hand_made(Threshold(label="NORMAL", stat=0.1), finding=0.5)
    assert interpret("NORMAL", 0.99, None, rules) is I.NORMAL
    assert interpret("NORMAL", 0.2, None, rules) is None


def test_several_normal_labels_and_a_zero_finding_threshold() -> None:
    rules = hand_made(finding=0.0, normal=("NORMAL", "NO_FINDING"))
    assert interpret("NO_FINDING", 0.0, None, rules) is I.NORMAL
    assert interpret("NORMAL", 0.0, None, rules) is I.NORMAL
    assert interpret("ANYTHING", 0.0, None, rules) is I.POSITIVE


def test_interpretations_are_hl7_codes_with_displays() -> None:
    assert {i.value for i in Interpretation} == {"AA", "A", "POS", "NEG", "N"}
    assert I.CRITICAL.display == "Critical abnormal"
    assert I.ABNORMAL.display == "Abnormal"
    assert I.POSITIVE.display == "Positive"
    assert I.NEGATIVE.display == "Negative"
    assert I.NORMAL.display == "Normal"
    assert [i for i in Interpretation if not i.present] == [I.NEGATIVE]


# ------------------------------------------------------------------------------------------------ rules_for


def test_rules_apply_only_to_the_same_model_name_and_version(demo: ModelRules) -> None:
    assert rules_for(demo, "pneumonia-xception", demo.version) is demo
    assert rules_for(demo, "other-model", demo.version) is None
    assert rules_for(demo, "pneumonia-xception", "9.9.9") is None
    assert rules_for(demo, "Pneumonia-Xception", demo.version) is None
    assert rules_for(demo, None, demo.version) is None
    assert rules_for(demo, "pneumonia-xception", None) is None
    assert rules_for(None, "pneumonia-xception", demo.version) is None
    assert demo.applies_to("pneumonia-xception", demo.version)
    assert not demo.applies_to(None, None)


def test_another_versions_result_is_interpreted_by_its_top_finding(demo: ModelRules) -> None:
    rules = rules_for(demo, "pneumonia-xception", "1.0.0")
    assert interpret("PNEUMONIA", 0.93, "PNEUMONIA", rules) is I.POSITIVE  # not CRITICAL: another scale
    assert interpret("NORMAL", 0.93, "PNEUMONIA", rules) is None


# ------------------------------------------------------------------------------------------------ of_bundle


def test_a_missing_bundle_gives_no_rules_and_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cxr.exporters"):
        assert ModelRules.of_bundle(tmp_path / "no-such-bundle") is None
    warnings = [r for r in caplog.records if r.name == "cxr.exporters" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no model bundle" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"name": "x"}', b"\xff\xfe"],
    ids=["bad-json", "not-object", "incomplete", "not-utf8"],
)
def test_an_invalid_bundle_gives_no_rules_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    (tmp_path / "bundle.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="cxr.exporters"):
        assert ModelRules.of_bundle(tmp_path) is None
    assert any(r.name == "cxr.exporters" and r.levelno == logging.WARNING for r in caplog.records)


def test_a_bundle_folder_that_is_a_file_gives_no_rules(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    assert ModelRules.of_bundle(tmp_path / "file") is None


# ------------------------------------------------------------------------------------------------ label codes


@pytest.mark.parametrize(
    ("label", "value", "meaning"),
    [
        ("PNEUMONIA", "233604007", "Pneumonia"),
        ("pneumonia", "233604007", "Pneumonia"),
        ("  Pneumonia\n", "233604007", "Pneumonia"),
        ("NORMAL", "17621005", "Normal"),
        ("Pneumothorax", "36118008", "Pneumothorax"),
        ("cardiomegaly", "8186001", "Cardiomegaly"),
        ("Pleural Effusion", "60046008", "Pleural effusion"),
        ("pleural-effusion", "60046008", "Pleural effusion"),
        ("PLEURAL_EFFUSION", "60046008", "Pleural effusion"),
        ("pleural - \t effusion", "60046008", "Pleural effusion"),
        ("Effusion", "60046008", "Pleural effusion"),
        ("atelectasis", "46621007", "Atelectasis"),
        ("Edema", "19242006", "Pulmonary edema"),
        ("Pulmonary Edema", "19242006", "Pulmonary edema"),
    ],
)
def test_known_labels_are_snomed_concepts(label: str, value: str, meaning: str) -> None:
    code = codes.label_code(label)
    assert (code.system, code.scheme, code.value, code.meaning) == ("http://snomed.info/sct", "SCT", value, meaning)


def test_an_unknown_label_is_its_own_local_code() -> None:
    code = codes.label_code("Lung Opacity")
    assert (code.system, code.scheme) == codes.LOCAL == ("urn:cxr-stream:label", "99CXR")
    assert code.value == "LUNG_OPACITY"
    assert code.meaning == "Lung Opacity"


@pytest.mark.parametrize(
    ("label", "value", "meaning"),
    [
        ("", "UNLABELLED", "unlabelled"),
        ("   \t\n", "UNLABELLED", "unlabelled"),
        ("x" * 500, "X" * 16, "x" * 64),
        ("Consolidation of the left lower lobe", "CONSOLIDATION_OF", "Consolidation of the left lower lobe"),
        ("肺炎", "肺炎", "肺炎"),
        ("ß" * 20, "S" * 16, "ß" * 20),  # upper-casing can lengthen a label: still cut to 16
        ("\U0001f9e0 brain", "\U0001f9e0_BRAIN", "\U0001f9e0 brain"),
        ("-", "_", "-"),  # only a separator
    ],
)
def test_hostile_labels_give_dicom_sized_local_codes(label: str, value: str, meaning: str) -> None:
    code = codes.label_code(label)
    assert (code.system, code.scheme, code.value, code.meaning) == (*codes.LOCAL, value, meaning)
    assert 0 < len(code.value) <= 16  # DICOM Code Value (SH)
    assert 0 < len(code.meaning) <= 64  # DICOM Code Meaning (LO)


def test_a_long_unicode_label_fits_dicom_lengths() -> None:
    code = codes.label_code("Épanchement pleural très étendu " * 20)
    assert len(code.value) <= 16
    assert len(code.meaning) <= 64
    assert code.value == "ÉPANCHEMENT_PLEU"
    assert " " not in code.value


def test_fixed_concepts() -> None:
    assert (codes.CHEST_XRAY.scheme, codes.CHEST_XRAY.value) == ("LN", "30745-4")
    assert (codes.CERTAINTY_OF_FEATURE.scheme, codes.CERTAINTY_OF_FEATURE.value) == ("DCM", "111011")
    assert (codes.PERCENT.system, codes.PERCENT.value) == ("http://unitsofmeasure.org", "%")
    assert codes.PRESENT.value != codes.ABSENT.value
    for code in (codes.CHEST_XRAY, codes.CERTAINTY_OF_FEATURE, codes.PERCENT, codes.PRESENT, codes.ABSENT):
        assert len(code.value) <= 16 and len(code.meaning) <= 64
