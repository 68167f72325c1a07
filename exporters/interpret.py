"""What a score means, against the thresholds the model was served with.

The result carries scores and a priority, not the thresholds behind them; those live in the model bundle
(`CXR_MODEL_BUNDLE`). They apply only to results of that same model name and version: another model's
probabilities are not on the same scale, so its results are interpreted by their own top finding alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from streaming.triage import TriageRules

log = logging.getLogger("cxr.exporters")


class Interpretation(StrEnum):
    """HL7 v3 ObservationInterpretation codes (the values are the codes)."""

    CRITICAL = "AA"  # at or above the label's STAT threshold
    ABNORMAL = "A"  # at or above its URGENT threshold
    POSITIVE = "POS"  # at or above the finding threshold (or the result's top finding)
    NEGATIVE = "NEG"  # a finding below the finding threshold
    NORMAL = "N"  # a normal label at or above the finding threshold

    @property
    def display(self) -> str:
        return _DISPLAY[self]

    @property
    def present(self) -> bool:
        """Whether the finding is reported present (the SR's qualitative evaluation)."""
        return self is not Interpretation.NEGATIVE


_DISPLAY = {
    Interpretation.CRITICAL: "Critical abnormal",
    Interpretation.ABNORMAL: "Abnormal",
    Interpretation.POSITIVE: "Positive",
    Interpretation.NEGATIVE: "Negative",
    Interpretation.NORMAL: "Normal",
}


@dataclass(frozen=True)
class ModelRules:
    """One model's triage thresholds and normal labels, as its bundle says."""

    name: str
    version: str
    normal_labels: tuple[str, ...]
    triage: TriageRules

    @classmethod
    def of_bundle(cls, bundle_dir: Path) -> ModelRules | None:
        """The bundle's rules; None (with a warning) when it cannot be read: exports still go out, with
        interpretations from each result's own top finding."""
        from streaming.bundle import BundleError, read_descriptor

        try:
            descriptor = read_descriptor(bundle_dir)
        except (BundleError, OSError) as exc:
            log.warning("no model bundle to interpret scores with (%s); using each result's top finding only", exc)
            return None
        return cls(descriptor.name, descriptor.version, tuple(descriptor.normal_labels), descriptor.triage)

    def applies_to(self, model_name: str | None, model_version: str | None) -> bool:
        return model_name == self.name and model_version == self.version


def interpret(label: str, score: float, top_finding: str | None, rules: ModelRules | None) -> Interpretation | None:
    """The interpretation of one label's score; None where nothing can be said (a normal label below the
    finding threshold, or any label but the top finding without the model's rules)."""
    if rules is None:
        return Interpretation.POSITIVE if label == top_finding else None
    if label in rules.normal_labels:
        return Interpretation.NORMAL if score >= rules.triage.finding_threshold else None
    for threshold in rules.triage.thresholds:
        if threshold.label != label:
            continue
        if threshold.stat is not None and score >= threshold.stat:
            return Interpretation.CRITICAL
        if threshold.urgent is not None and score >= threshold.urgent:
            return Interpretation.ABNORMAL
    return Interpretation.POSITIVE if score >= rules.triage.finding_threshold else Interpretation.NEGATIVE


def rules_for(rules: ModelRules | None, model_name: str | None, model_version: str | None) -> ModelRules | None:
    """`rules` when they are this result's model's, else None."""
    return rules if rules is not None and rules.applies_to(model_name, model_version) else None
