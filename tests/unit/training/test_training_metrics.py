"""training.metrics: hand-checked numbers on tiny data, the bootstrap against a naive reference, thresholds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from streaming.triage import Threshold, TriageRules
from training.metrics import SCHEMA, Evaluation, evaluate, propose_thresholds

BINARY = ("NORMAL", "PNEUMONIA")
RULES = TriageRules(thresholds=(Threshold(label="PNEUMONIA", stat=0.9, urgent=0.5),), finding_threshold=0.6)


def binary(pneumonia_scores: list[float]) -> np.ndarray:
    s = np.asarray(pneumonia_scores, dtype=float)
    return np.c_[1.0 - s, s]


def synthetic(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """A balanced binary data set with overlapping score distributions (AUROC about 0.85)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2 == 1
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0.0, 1.0)
    return [BINARY[int(v)] for v in y], binary(list(s))


def test_confusion_and_accuracy_by_hand() -> None:
    labels = ("A", "B", "C")
    y_true = ["A", "A", "B", "B", "B", "C"]
    scores = np.array(
        [
            [0.7, 0.2, 0.1],  # A -> A
            [0.2, 0.5, 0.3],  # A -> B
            [0.1, 0.8, 0.1],  # B -> B
            [0.3, 0.3, 0.4],  # B -> C
            [0.1, 0.6, 0.3],  # B -> B
            [0.5, 0.1, 0.4],  # C -> A
        ]
    )
    ev = evaluate(y_true, scores, labels, bootstrap=0)
    assert ev.labels == labels
    assert ev.count == 6
    assert ev.confusion == ((1, 1, 0), (0, 2, 1), (1, 0, 0))
    assert ev.accuracy == pytest.approx(3 / 6)
    assert [(m.label, m.positives, m.negatives) for m in ev.per_label] == [("A", 2, 4), ("B", 3, 3), ("C", 1, 5)]
    # C against the rest: its one positive (0.4) beats 0.1, 0.3, 0.1 and 0.3 and ties 0.4 (a half): 4.5 / 5.
    assert ev.label_metrics("C").auroc == pytest.approx(4.5 / 5)


def test_auroc_by_hand_with_ties() -> None:
    # Positives 0.5 and 0.9 against negatives 0.2 and 0.5: wins 1 + 0.5 (tie) + 2 = 3.5 of 4 pairs.
    ev = evaluate(["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"], binary([0.2, 0.5, 0.5, 0.9]), BINARY, bootstrap=0)
    m = ev.label_metrics("PNEUMONIA")
    assert m.auroc == pytest.approx(0.875)
    assert m.auroc_ci is None
    fpr, tpr, thresholds = m.roc
    assert fpr[0] == 0.0 and tpr[0] == 0.0 and fpr[-1] == 1.0 and tpr[-1] == 1.0
    assert math.isinf(thresholds[0])
    # Classic four-point example: one inversion of four pairs.
    ev = evaluate(["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"], binary([0.1, 0.4, 0.35, 0.8]), BINARY, bootstrap=0)
    assert ev.label_metrics("PNEUMONIA").auroc == pytest.approx(0.75)


def test_auroc_is_undefined_for_an_absent_label() -> None:
    ev = evaluate(["NORMAL"] * 3, binary([0.1, 0.2, 0.7]), BINARY, normal_labels=["NORMAL"], rules=RULES)
    for m in ev.per_label:
        assert m.auroc is None and m.auroc_ci is None and m.roc == ((), (), ())
    stat = next(p for p in ev.operating_points if p.name == "stat")
    assert stat.sensitivity is None and stat.specificity == 1.0
    json.dumps(ev.to_json(), allow_nan=False)


def test_bootstrap_ci_matches_a_naive_resampling_loop() -> None:
    """The vectorised bootstrap is the textbook one: resample studies, skip one-class resamples, percentiles."""
    y_true, scores = synthetic(30, seed=3)
    scores = np.round(scores, 1)  # ties, which the weighted AUROC must count as one half
    ev = evaluate(y_true, scores, BINARY, bootstrap=200, confidence=0.9, seed=11)

    y = np.array([label == "PNEUMONIA" for label in y_true])
    rng = np.random.default_rng(11)
    picks = rng.integers(0, len(y), size=(200, len(y)))
    values = [roc_auc_score(y[p], scores[p, 1]) for p in picks if 0 < y[p].sum() < len(p)]
    low, high = np.quantile(values, [0.05, 0.95])
    m = ev.label_metrics("PNEUMONIA")
    assert m.auroc_resamples == len(values)
    assert m.auroc_ci == (pytest.approx(low), pytest.approx(high))


def test_ci_contains_the_estimate_narrows_with_more_data_and_is_deterministic() -> None:
    small = evaluate(*synthetic(40, seed=1), BINARY, seed=5).label_metrics("PNEUMONIA")
    large = evaluate(*synthetic(400, seed=1), BINARY, seed=5).label_metrics("PNEUMONIA")
    for m in (small, large):
        assert m.auroc is not None and m.auroc_ci is not None
        assert m.auroc_ci[0] <= m.auroc <= m.auroc_ci[1]
        assert m.auroc_resamples == 1000
    assert small.auroc_ci is not None and large.auroc_ci is not None
    assert large.auroc_ci[1] - large.auroc_ci[0] < 0.6 * (small.auroc_ci[1] - small.auroc_ci[0])

    again = evaluate(*synthetic(40, seed=1), BINARY, seed=5).label_metrics("PNEUMONIA")
    other = evaluate(*synthetic(40, seed=1), BINARY, seed=6).label_metrics("PNEUMONIA")
    assert again.auroc_ci == small.auroc_ci
    assert other.auroc_ci != small.auroc_ci
    narrower = evaluate(*synthetic(40, seed=1), BINARY, seed=5, confidence=0.5).label_metrics("PNEUMONIA")
    assert narrower.auroc_ci is not None
    assert narrower.auroc_ci[1] - narrower.auroc_ci[0] < small.auroc_ci[1] - small.auroc_ci[0]


def test_operating_points_by_hand() -> None:
    y_true = ["NORMAL", "NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA", "PNEUMONIA"]
    s = [0.1, 0.5, 0.95, 0.4, 0.5, 0.6, 0.9]
    ev = evaluate(y_true, binary(s), BINARY, normal_labels=["NORMAL"], rules=RULES, bootstrap=0)
    points = {p.name: p for p in ev.operating_points}
    assert [p.name for p in ev.operating_points] == ["stat", "urgent", "finding"]
    assert all(p.label == "PNEUMONIA" for p in ev.operating_points)
    # STAT at 0.9 (inclusive): 0.9 caught; 0.95 a false alarm.
    stat = points["stat"]
    assert (stat.threshold, stat.tp, stat.fp, stat.tn, stat.fn) == (0.9, 1, 1, 2, 3)
    assert stat.sensitivity == pytest.approx(1 / 4) and stat.specificity == pytest.approx(2 / 3)
    urgent = points["urgent"]  # 0.5 and up: 0.5, 0.6, 0.9 caught; 0.5 and 0.95 false alarms
    assert (urgent.tp, urgent.fp, urgent.tn, urgent.fn) == (3, 2, 1, 1)
    finding = points["finding"]  # 0.6 and up
    assert (finding.threshold, finding.tp, finding.fp, finding.tn, finding.fn) == (0.6, 2, 1, 2, 2)


def test_operating_points_for_every_rule_and_finding_label() -> None:
    labels = ("NORMAL", "EFFUSION", "PNEUMOTHORAX")
    rules = TriageRules(
        thresholds=(Threshold(label="PNEUMOTHORAX", stat=0.8), Threshold(label="EFFUSION", urgent=0.4)),
        finding_threshold=0.5,
    )
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.0, 0.9]])
    ev = evaluate(["NORMAL", "EFFUSION", "PNEUMOTHORAX"], scores, labels, normal_labels=["NORMAL"], rules=rules)
    assert [(p.label, p.name) for p in ev.operating_points] == [
        ("PNEUMOTHORAX", "stat"),
        ("EFFUSION", "urgent"),
        ("EFFUSION", "finding"),
        ("PNEUMOTHORAX", "finding"),
    ]
    assert [c.label for c in ev.calibration] == ["EFFUSION", "PNEUMOTHORAX"]
    assert ev.normal_labels == ("NORMAL",)


def test_calibration_bins_agree_with_scikit_learn() -> None:
    y_true, scores = synthetic(200, seed=2)
    ev = evaluate(y_true, scores, BINARY, normal_labels=["NORMAL"], bootstrap=0, calibration_bins=8)
    (cal,) = ev.calibration
    assert cal.label == "PNEUMONIA"
    assert len(cal.bins) == 8 and sum(b.count for b in cal.bins) == 200
    assert cal.bins[0].lower == 0.0 and cal.bins[-1].upper == 1.0
    y = np.array([label == "PNEUMONIA" for label in y_true])
    observed, predicted = calibration_curve(y, scores[:, 1], n_bins=8)
    used = [b for b in cal.bins if b.count]
    assert [b.observed_fraction for b in used] == pytest.approx(list(observed))
    assert [b.mean_predicted for b in used] == pytest.approx(list(predicted))
    assert all(b.mean_predicted is None and b.observed_fraction is None for b in cal.bins if not b.count)
    assert cal.brier == pytest.approx(float(np.mean((scores[:, 1] - y) ** 2)))
    counts = np.array([b.count for b in used])
    gaps = float(np.sum(counts * np.abs(observed - predicted)))
    assert cal.ece == pytest.approx(gaps / 200)


def test_json_is_strict_stable_and_round_trips() -> None:
    y_true, scores = synthetic(24, seed=4)
    ev = evaluate(y_true, scores, BINARY, normal_labels=["NORMAL"], rules=RULES, bootstrap=100)
    text = json.dumps(ev.to_json(), allow_nan=False)
    data = json.loads(text)
    assert data["schema"] == SCHEMA
    assert list(data) == [
        "schema",
        "labels",
        "normal_labels",
        "count",
        "accuracy",
        "confusion",
        "bootstrap",
        "per_label",
        "operating_points",
        "calibration",
    ]
    assert data["per_label"][1]["roc"]["thresholds"][0] is None  # sklearn's +inf
    assert data["confusion"] == [list(row) for row in ev.confusion]
    assert Evaluation.from_json(data) == ev
    with pytest.raises(ValueError, match="schema"):
        Evaluation.from_json({**data, "schema": "cxr.evaluation/v0"})


def test_float32_scores_and_rounding_overshoot_are_accepted() -> None:
    s = np.array([[0.3, 0.7], [1.0000001, 0.0]], dtype=np.float32)
    ev = evaluate(["PNEUMONIA", "NORMAL"], s, BINARY, bootstrap=0)
    assert ev.accuracy == 1.0


@pytest.mark.parametrize(
    ("y_true", "scores", "kwargs", "message"),
    [
        (["NORMAL", "EFFUSION", "ATELECTASIS"], binary([0.1, 0.2, 0.3]), {}, r"\['ATELECTASIS', 'EFFUSION'\]"),
        (["NORMAL", "PNEUMONIA"], binary([0.1, 0.2, 0.3]), {}, "shape"),
        (["NORMAL", "PNEUMONIA"], np.array([0.1, 0.2]), {}, "shape"),
        (["NORMAL", "PNEUMONIA"], binary([0.1, float("nan")]), {}, "NaN"),
        (["NORMAL", "PNEUMONIA"], np.array([[2.0, -1.0], [0.5, 0.5]]), {}, "probabilities"),
        ([], np.zeros((0, 2)), {}, "no studies"),
        (["NORMAL", "PNEUMONIA"], binary([0.1, 0.9]), {"normal_labels": ["HEALTHY"]}, "HEALTHY"),
        (
            ["NORMAL", "PNEUMONIA"],
            binary([0.1, 0.9]),
            {"rules": TriageRules(thresholds=(Threshold(label="EDEMA", stat=0.9),))},
            "EDEMA",
        ),
        (["NORMAL", "PNEUMONIA"], binary([0.1, 0.9]), {"bootstrap": -1}, "bootstrap"),
        (["NORMAL", "PNEUMONIA"], binary([0.1, 0.9]), {"confidence": 1.0}, "confidence"),
        (["NORMAL", "PNEUMONIA"], binary([0.1, 0.9]), {"calibration_bins": 0}, "calibration_bins"),
    ],
)
def test_evaluate_rejects_bad_input(y_true: list[str], scores: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(y_true, scores, BINARY, **kwargs)


def test_evaluate_rejects_duplicate_labels() -> None:
    with pytest.raises(ValueError, match="unique"):
        evaluate(["A"], np.array([[0.5, 0.5]]), ("A", "A"))


# --- propose_thresholds -------------------------------------------------------------------------------------


def sensitivity(positive_scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(positive_scores >= threshold))


def test_proposed_thresholds_meet_targets_and_are_the_highest() -> None:
    y_true, scores = synthetic(101, seed=8)
    rules = propose_thresholds(
        y_true, scores, BINARY, normal_labels=["NORMAL"], stat_sensitivity=0.5, urgent_sensitivity=0.9
    )
    (rule,) = rules.thresholds
    assert rule.label == "PNEUMONIA" and rules.finding_threshold == 0.5
    assert rule.stat is not None and rule.urgent is not None
    assert rule.urgent <= rule.stat
    positives = scores[[label == "PNEUMONIA" for label in y_true], 1]
    for threshold, target in ((rule.stat, 0.5), (rule.urgent, 0.9)):
        assert sensitivity(positives, threshold) >= target
        higher = positives[positives > threshold]
        assert higher.size == 0 or sensitivity(positives, float(higher.min())) < target

    # Measured by evaluate, the proposed rules reach the targets on the same data.
    ev = evaluate(y_true, scores, BINARY, normal_labels=["NORMAL"], rules=rules, bootstrap=0)
    points = {p.name: p for p in ev.operating_points}
    assert points["stat"].sensitivity is not None and points["stat"].sensitivity >= 0.5
    assert points["urgent"].sensitivity is not None and points["urgent"].sensitivity >= 0.9


def test_proposed_threshold_by_hand_with_float_targets() -> None:
    # 25 positives scored 0.01 to 0.25. 0.28 * 25 is 7.000000000000001 in floats, yet 7 positives (7/25 = 0.28)
    # reach a 0.28 target: the 7th highest score, 0.19. Likewise 0.56 * 25: 14 positives, 0.12.
    positives = [i / 100 for i in range(1, 26)]
    y_true = ["PNEUMONIA"] * 25 + ["NORMAL"] * 2
    scores = binary([*positives, 0.95, 0.0])
    rules = propose_thresholds(
        y_true, scores, BINARY, normal_labels=["NORMAL"], stat_sensitivity=0.28, urgent_sensitivity=0.56
    )
    (rule,) = rules.thresholds
    assert (rule.stat, rule.urgent) == (0.19, 0.12)
    rules = propose_thresholds(
        y_true, scores, BINARY, normal_labels=["NORMAL"], stat_sensitivity=0.3, urgent_sensitivity=1.0
    )
    assert (rules.thresholds[0].stat, rules.thresholds[0].urgent) == (0.18, 0.01)  # 8 of 25 (0.32), all 25


def test_proposed_thresholds_with_tied_scores() -> None:
    y_true = ["PNEUMONIA"] * 4 + ["NORMAL"]
    scores = binary([0.8, 0.8, 0.8, 0.2, 0.1])
    rules = propose_thresholds(
        y_true, scores, BINARY, normal_labels=["NORMAL"], stat_sensitivity=0.5, urgent_sensitivity=0.9
    )
    assert (rules.thresholds[0].stat, rules.thresholds[0].urgent) == (0.8, 0.2)


def test_proposed_thresholds_per_finding_label() -> None:
    labels = ("NORMAL", "EFFUSION", "PNEUMOTHORAX")
    y_true = ["NORMAL", "EFFUSION", "EFFUSION", "PNEUMOTHORAX", "PNEUMOTHORAX"]
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.0, 0.9], [0.3, 0.1, 0.6]])
    rules = propose_thresholds(
        y_true, scores, labels, normal_labels=["NORMAL"], stat_sensitivity=0.5, urgent_sensitivity=1.0
    )
    assert [(t.label, t.stat, t.urgent) for t in rules.thresholds] == [
        ("EFFUSION", 0.7, 0.4),
        ("PNEUMOTHORAX", 0.9, 0.6),
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.01, 1.0),
    st.floats(0.0, 1.0),
)
def test_proposed_thresholds_property(positive_scores: list[float], low: float, extra: float) -> None:
    stat_target, urgent_target = low, min(1.0, low + (1.0 - low) * extra)
    y_true = ["PNEUMONIA"] * len(positive_scores) + ["NORMAL"]
    rules = propose_thresholds(
        y_true,
        binary([*positive_scores, 0.5]),
        BINARY,
        normal_labels=["NORMAL"],
        stat_sensitivity=stat_target,
        urgent_sensitivity=urgent_target,
    )
    (rule,) = rules.thresholds
    positives = np.asarray(positive_scores)
    assert rule.stat is not None and rule.urgent is not None and rule.urgent <= rule.stat
    for threshold, target in ((rule.stat, stat_target), (rule.urgent, urgent_target)):
        assert threshold in positive_scores
        assert sensitivity(positives, threshold) >= target
        higher = positives[positives > threshold]
        assert higher.size == 0 or sensitivity(positives, float(higher.min())) < target


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stat_sensitivity": 0.0, "urgent_sensitivity": 0.9}, "stat_sensitivity"),
        ({"stat_sensitivity": 0.5, "urgent_sensitivity": 1.1}, "urgent_sensitivity"),
        ({"stat_sensitivity": 0.95, "urgent_sensitivity": 0.9}, "above urgent_sensitivity"),
        ({"stat_sensitivity": 0.5, "urgent_sensitivity": 0.9, "normal_labels": ["NORMAL", "PNEUMONIA"]}, "normal"),
        ({"stat_sensitivity": 0.5, "urgent_sensitivity": 0.9, "normal_labels": ["HEALTHY"]}, "HEALTHY"),
    ],
)
def test_propose_thresholds_rejects_bad_targets(kwargs: dict, message: str) -> None:
    arguments = {"normal_labels": ["NORMAL"], **kwargs}
    with pytest.raises(ValueError, match=message):
        propose_thresholds(["NORMAL", "PNEUMONIA"], binary([0.2, 0.8]), BINARY, **arguments)


def test_propose_thresholds_needs_positives_for_every_finding() -> None:
    labels = ("NORMAL", "EFFUSION", "PNEUMOTHORAX")
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]])
    with pytest.raises(ValueError, match=r"no positive studies for \['PNEUMOTHORAX'\]"):
        propose_thresholds(
            ["NORMAL", "EFFUSION"],
            scores,
            labels,
            normal_labels=["NORMAL"],
            stat_sensitivity=0.5,
            urgent_sensitivity=0.9,
        )
