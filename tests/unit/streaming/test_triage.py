"""Triage rules: scores to priority and headline finding, and the worklist order."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streaming.triage import (
    Priority,
    Threshold,
    TriageRules,
    finding_strength,
    priority,
    top_finding,
)

PNEUMONIA_RULES = TriageRules(thresholds=(Threshold(label="PNEUMONIA", stat=0.9, urgent=0.5),), finding_threshold=0.5)


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (0.0, Priority.ROUTINE),
        (0.4999, Priority.ROUTINE),
        (0.5, Priority.URGENT),
        (0.8999, Priority.URGENT),
        (0.9, Priority.STAT),
        (1.0, Priority.STAT),
    ],
)
def test_priority_boundaries_are_inclusive(score: float, expected: Priority) -> None:
    assert priority({"NORMAL": 1 - score, "PNEUMONIA": score}, PNEUMONIA_RULES) is expected


def test_missing_label_is_ignored() -> None:
    assert priority({"NORMAL": 0.99}, PNEUMONIA_RULES) is Priority.ROUTINE
    assert priority({}, PNEUMONIA_RULES) is Priority.ROUTINE


def test_no_rules_is_routine() -> None:
    assert priority({"PNEUMONIA": 1.0}, TriageRules()) is Priority.ROUTINE


def test_stat_on_any_rule_wins_over_urgent_on_an_earlier_one() -> None:
    rules = TriageRules(
        thresholds=(
            Threshold(label="EFFUSION", urgent=0.3),
            Threshold(label="PNEUMOTHORAX", stat=0.6),
        )
    )
    assert priority({"EFFUSION": 0.4, "PNEUMOTHORAX": 0.7}, rules) is Priority.STAT
    assert priority({"EFFUSION": 0.4, "PNEUMOTHORAX": 0.5}, rules) is Priority.URGENT
    assert priority({"EFFUSION": 0.2, "PNEUMOTHORAX": 0.5}, rules) is Priority.ROUTINE


def test_urgent_only_and_stat_only_thresholds() -> None:
    urgent_only = TriageRules(thresholds=(Threshold(label="A", urgent=0.2),))
    assert priority({"A": 1.0}, urgent_only) is Priority.URGENT
    stat_only = TriageRules(thresholds=(Threshold(label="A", stat=0.8),))
    assert priority({"A": 0.79}, stat_only) is Priority.ROUTINE
    assert priority({"A": 0.8}, stat_only) is Priority.STAT


def test_top_finding_ignores_normal_labels() -> None:
    scores = {"NORMAL": 0.95, "PNEUMONIA": 0.6}
    assert top_finding(scores, ("NORMAL",), PNEUMONIA_RULES) == "PNEUMONIA"


def test_top_finding_needs_the_finding_threshold() -> None:
    assert top_finding({"NORMAL": 0.51, "PNEUMONIA": 0.49}, ("NORMAL",), PNEUMONIA_RULES) is None
    assert top_finding({"NORMAL": 0.5, "PNEUMONIA": 0.5}, ("NORMAL",), PNEUMONIA_RULES) == "PNEUMONIA"
    strict = TriageRules(finding_threshold=0.8)
    assert top_finding({"A": 0.79, "B": 0.2}, (), strict) is None
    assert top_finding({"A": 0.8, "B": 0.2}, (), strict) == "A"


def test_top_finding_picks_the_highest_non_normal_label() -> None:
    scores = {"NORMAL": 0.99, "EFFUSION": 0.7, "PNEUMONIA": 0.9, "NODULE": 0.8}
    assert top_finding(scores, ("NORMAL",), TriageRules()) == "PNEUMONIA"


def test_top_finding_without_findings_is_none() -> None:
    assert top_finding({"NORMAL": 0.9}, ("NORMAL",), TriageRules()) is None
    assert top_finding({}, (), TriageRules()) is None


def test_threshold_rejects_urgent_above_stat() -> None:
    with pytest.raises(ValidationError, match="urgent"):
        Threshold(label="PNEUMONIA", stat=0.5, urgent=0.9)
    assert Threshold(label="PNEUMONIA", stat=0.5, urgent=0.5).urgent == 0.5


@pytest.mark.parametrize("bad", [{"stat": 1.1}, {"urgent": -0.1}, {"stat": 0.5, "unknown": 1}])
def test_threshold_rejects_out_of_range_and_unknown_fields(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        Threshold(label="A", **bad)  # type: ignore[arg-type]


def test_rules_are_frozen_and_validate_finding_threshold() -> None:
    with pytest.raises(ValidationError):
        TriageRules(finding_threshold=1.5)
    with pytest.raises(ValidationError):
        PNEUMONIA_RULES.finding_threshold = 0.1  # type: ignore[misc]


def test_rules_load_from_descriptor_json() -> None:
    rules = TriageRules.model_validate(
        {"thresholds": [{"label": "PNEUMONIA", "stat": 0.9, "urgent": 0.5}], "finding_threshold": 0.6}
    )
    assert rules.thresholds[0] == Threshold(label="PNEUMONIA", stat=0.9, urgent=0.5)
    assert rules.finding_threshold == 0.6


def result(priority: str, finding: str | None, score: float, sent_at: str) -> dict[str, object]:
    scores = {"NORMAL": 1 - score, "PNEUMONIA": score}
    return {"priority": priority, "top_finding": finding, "scores": scores, "sent_at": sent_at}


def test_finding_strength_of_a_routine_study_is_its_strongest_non_normal_score() -> None:
    closer = {"priority": "ROUTINE", "top_finding": None, "scores": {"NORMAL": 0.55, "PNEUMONIA": 0.45}, "sent_at": "b"}
    assert finding_strength(closer, ("NORMAL",)) == 0.45
    assert finding_strength(closer) == 0.0  # without the normal labels only a reported finding counts
