"""Triage: from a model's scores to a worklist priority and a headline finding.

The rules ship with the model bundle (its thresholds were chosen for that model's calibration), so they are
plain data here and the functions are pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Priority(StrEnum):
    STAT = "STAT"
    URGENT = "URGENT"
    ROUTINE = "ROUTINE"


class Threshold(BaseModel):
    """A finding's score at or above `stat` makes the study STAT; at or above `urgent`, URGENT."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str
    stat: float | None = Field(default=None, ge=0.0, le=1.0)
    urgent: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Threshold:
        if self.stat is not None and self.urgent is not None and self.urgent > self.stat:
            raise ValueError(f"triage threshold for {self.label!r}: urgent ({self.urgent}) is above stat ({self.stat})")
        return self


class TriageRules(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    thresholds: tuple[Threshold, ...] = ()
    #: A non-normal label is reported as `top_finding` only from this score up.
    finding_threshold: float = Field(default=0.5, ge=0.0, le=1.0)


def priority(scores: Mapping[str, float], rules: TriageRules) -> Priority:
    """The most urgent priority that any rule reaches."""
    result = Priority.ROUTINE
    for rule in rules.thresholds:
        score = scores.get(rule.label)
        if score is None:
            continue
        if rule.stat is not None and score >= rule.stat:
            return Priority.STAT
        if rule.urgent is not None and score >= rule.urgent:
            result = Priority.URGENT
    return result


def top_finding(scores: Mapping[str, float], normal_labels: Sequence[str], rules: TriageRules) -> str | None:
    """The highest-scoring non-normal label, or None when no finding reaches the reporting threshold."""
    findings = [(score, label) for label, score in scores.items() if label not in normal_labels]
    if not findings:
        return None
    score, label = max(findings)
    return label if score >= rules.finding_threshold else None


PRIORITY_RANK = {Priority.STAT: 0, Priority.URGENT: 1, Priority.ROUTINE: 2}


def finding_strength(result: Mapping[str, object], normal_labels: Sequence[str] = ()) -> float:
    """How strongly a result suggests disease: its top finding's score, or, when the model's normal labels
    are known, the highest non-normal score even below the reporting threshold (so ROUTINE studies are
    ordered too)."""
    scores = result.get("scores")
    if not isinstance(scores, dict):
        return 0.0
    if normal_labels:
        return max((float(v) for k, v in scores.items() if k not in normal_labels), default=0.0)
    finding = result.get("top_finding")
    return float(scores.get(finding, 0.0)) if finding else 0.0
