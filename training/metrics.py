"""How well a model's scores separate its labels: the numbers behind `evaluation.json` and the report.

Pure functions of (true labels, score matrix, label order): no I/O, no Spark, no TensorFlow, so `cxr train`,
`cxr evaluate` and the tests compute the same thing the same way. Everything undefined on the data at hand (an
AUROC when a label never occurs, a sensitivity with no positives) is `None`, never NaN, so the JSON stays valid
and a reader sees "not measurable" rather than a number.

Operating points use the comparison the streaming job uses (`score >= threshold`, see `streaming.triage`), so
the sensitivities reported here are the ones the worklist will show in practice on data like these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve

from streaming.triage import Threshold, TriageRules

SCHEMA = "cxr.evaluation/v1"

#: Scores may overshoot [0, 1] by float rounding (a float32 softmax can sum to 1 + 1e-7); beyond this it is a bug.
_PROBABILITY_SLACK = 1e-6
#: Bootstrap weights are built in chunks of at most this many cells, so memory stays flat for large test sets.
_BOOTSTRAP_CHUNK_CELLS = 2_000_000

RocCurve = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class LabelMetrics:
    """One label against the rest: how many studies have it, and how well its score ranks them first."""

    label: str
    positives: int
    negatives: int
    #: None when the label is absent or present in every study (AUROC is undefined then).
    auroc: float | None
    #: Percentile bootstrap interval (resampling studies); None when undefined or bootstrapping is off.
    auroc_ci: tuple[float, float] | None
    #: fpr, tpr, thresholds as scikit-learn's `roc_curve` gives them (the first threshold is +inf: nothing
    #: called positive); all empty when undefined.
    roc: RocCurve
    #: How many bootstrap resamples contained both classes (the CI is computed from these).
    auroc_resamples: int = 0


@dataclass(frozen=True)
class OperatingPoint:
    """Sensitivity and specificity of `score >= threshold` for one label: what a triage rule catches and costs."""

    label: str
    #: "stat" or "urgent" (a triage threshold) or "finding" (the rules' finding_threshold).
    name: str
    threshold: float
    #: None without positives (sensitivity) or without negatives (specificity).
    sensitivity: float | None
    specificity: float | None
    tp: int
    fp: int
    tn: int
    fn: int


@dataclass(frozen=True)
class CalibrationBin:
    """Studies whose score falls in (lower, upper] (the first bin includes 0), as scikit-learn bins them."""

    lower: float
    upper: float
    count: int
    #: None for an empty bin.
    mean_predicted: float | None
    observed_fraction: float | None


@dataclass(frozen=True)
class Calibration:
    """Whether a score of 0.8 means "80 % of such studies have the finding": the reliability diagram's data."""

    label: str
    bins: tuple[CalibrationBin, ...]
    #: Mean squared error of the score against the 0/1 truth (lower is better; 0.25 is a constant 0.5).
    brier: float
    #: Expected calibration error: the count-weighted mean |observed - predicted| over the bins.
    ece: float


@dataclass(frozen=True)
class Evaluation:
    """Everything `cxr evaluate` measures on one labelled data set, in the model's label order."""

    labels: tuple[str, ...]
    count: int
    #: Rows are the true label, columns the predicted (argmax) label, both in `labels` order.
    confusion: tuple[tuple[int, ...], ...]
    #: Share of studies whose argmax label is the true one.
    accuracy: float
    per_label: tuple[LabelMetrics, ...]
    operating_points: tuple[OperatingPoint, ...]
    #: One per non-normal label.
    calibration: tuple[Calibration, ...]
    normal_labels: tuple[str, ...] = ()
    bootstrap: int = 0
    confidence: float = 0.95
    seed: int = 0

    def label_metrics(self, label: str) -> LabelMetrics:
        """The one-vs-rest metrics of `label` (KeyError if the model has no such label)."""
        for metrics in self.per_label:
            if metrics.label == label:
                return metrics
        raise KeyError(label)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (no NaN or infinity: undefined values and ROC's +inf threshold are null)."""
        return {
            "schema": SCHEMA,
            "labels": list(self.labels),
            "normal_labels": list(self.normal_labels),
            "count": self.count,
            "accuracy": self.accuracy,
            "confusion": [list(row) for row in self.confusion],
            "bootstrap": {"resamples": self.bootstrap, "confidence": self.confidence, "seed": self.seed},
            "per_label": [
                {
                    "label": m.label,
                    "positives": m.positives,
                    "negatives": m.negatives,
                    "auroc": m.auroc,
                    "auroc_ci": None if m.auroc_ci is None else list(m.auroc_ci),
                    "auroc_resamples": m.auroc_resamples,
                    "roc": {
                        "fpr": list(m.roc[0]),
                        "tpr": list(m.roc[1]),
                        "thresholds": [t if math.isfinite(t) else None for t in m.roc[2]],
                    },
                }
                for m in self.per_label
            ],
            "operating_points": [
                {
                    "label": p.label,
                    "name": p.name,
                    "threshold": p.threshold,
                    "sensitivity": p.sensitivity,
                    "specificity": p.specificity,
                    "tp": p.tp,
                    "fp": p.fp,
                    "tn": p.tn,
                    "fn": p.fn,
                }
                for p in self.operating_points
            ],
            "calibration": [
                {
                    "label": c.label,
                    "brier": c.brier,
                    "ece": c.ece,
                    "bins": [
                        {
                            "lower": b.lower,
                            "upper": b.upper,
                            "count": b.count,
                            "mean_predicted": b.mean_predicted,
                            "observed_fraction": b.observed_fraction,
                        }
                        for b in c.bins
                    ],
                }
                for c in self.calibration
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evaluation:
        """The inverse of `to_json` (extra keys, such as the report's "model" and "data", are ignored)."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document (schema {data.get('schema')!r})")
        boot = data.get("bootstrap") or {}

        def _opt(value: Any) -> float | None:
            return None if value is None else float(value)

        per_label = tuple(
            LabelMetrics(
                label=str(m["label"]),
                positives=int(m["positives"]),
                negatives=int(m["negatives"]),
                auroc=_opt(m["auroc"]),
                auroc_ci=None if m["auroc_ci"] is None else (float(m["auroc_ci"][0]), float(m["auroc_ci"][1])),
                roc=(
                    tuple(float(v) for v in m["roc"]["fpr"]),
                    tuple(float(v) for v in m["roc"]["tpr"]),
                    tuple(math.inf if v is None else float(v) for v in m["roc"]["thresholds"]),
                ),
                auroc_resamples=int(m.get("auroc_resamples", 0)),
            )
            for m in data["per_label"]
        )
        points = tuple(
            OperatingPoint(
                label=str(p["label"]),
                name=str(p["name"]),
                threshold=float(p["threshold"]),
                sensitivity=_opt(p["sensitivity"]),
                specificity=_opt(p["specificity"]),
                tp=int(p["tp"]),
                fp=int(p["fp"]),
                tn=int(p["tn"]),
                fn=int(p["fn"]),
            )
            for p in data["operating_points"]
        )
        calibration = tuple(
            Calibration(
                label=str(c["label"]),
                bins=tuple(
                    CalibrationBin(
                        lower=float(b["lower"]),
                        upper=float(b["upper"]),
                        count=int(b["count"]),
                        mean_predicted=_opt(b["mean_predicted"]),
                        observed_fraction=_opt(b["observed_fraction"]),
                    )
                    for b in c["bins"]
                ),
                brier=float(c["brier"]),
                ece=float(c["ece"]),
            )
            for c in data["calibration"]
        )
        return cls(
            labels=tuple(str(label) for label in data["labels"]),
            count=int(data["count"]),
            confusion=tuple(tuple(int(v) for v in row) for row in data["confusion"]),
            accuracy=float(data["accuracy"]),
            per_label=per_label,
            operating_points=points,
            calibration=calibration,
            normal_labels=tuple(str(label) for label in data.get("normal_labels", ())),
            bootstrap=int(boot.get("resamples", 0)),
            confidence=float(boot.get("confidence", 0.95)),
            seed=int(boot.get("seed", 0)),
        )


def evaluate(
    y_true: Sequence[str],
    scores: np.ndarray,
    labels: Sequence[str],
    *,
    normal_labels: Sequence[str] = (),
    rules: TriageRules = TriageRules(),  # noqa: B008 (frozen pydantic model: a safe shared default)
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    calibration_bins: int = 10,
) -> Evaluation:
    """Measure scores against the truth: confusion, accuracy, AUROC with bootstrap CI per label, the
    sensitivity/specificity of every triage threshold and of the finding threshold, and calibration.

    `scores` has one row per study and one column per label (probabilities, in `labels` order). The bootstrap
    is deterministic given `seed` (one set of resamples shared by all labels); `bootstrap=0` turns it off.
    """
    label_tuple, truth, probs = _validated(y_true, scores, labels)
    normals = _known(normal_labels, label_tuple, "normal labels")
    _known([t.label for t in rules.thresholds], label_tuple, "triage rules name labels")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, not {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    if calibration_bins < 1:
        raise ValueError(f"calibration_bins must be >= 1, not {calibration_bins}")

    n, k = probs.shape
    predicted = np.argmax(probs, axis=1)
    matrix = confusion_matrix(truth, predicted, labels=list(range(k)))
    confusion = tuple(tuple(int(v) for v in row) for row in matrix)
    accuracy = float(np.trace(matrix)) / n

    onehot = truth[:, None] == np.arange(k)[None, :]
    cis = _bootstrap_auroc_ci(onehot, probs, bootstrap, confidence, seed)
    per_label = []
    for j, label in enumerate(label_tuple):
        y = onehot[:, j]
        positives = int(y.sum())
        auroc: float | None = None
        roc: RocCurve = ((), (), ())
        if 0 < positives < n:
            auroc = float(roc_auc_score(y, probs[:, j]))
            fpr, tpr, thresholds = roc_curve(y, probs[:, j])
            roc = (_floats(fpr), _floats(tpr), _floats(thresholds))
        ci, resamples = cis[j]
        per_label.append(LabelMetrics(label, positives, n - positives, auroc, ci, roc, resamples))

    index = {label: j for j, label in enumerate(label_tuple)}
    points = []
    for rule in rules.thresholds:
        j = index[rule.label]
        for name, threshold in (("stat", rule.stat), ("urgent", rule.urgent)):
            if threshold is not None:
                points.append(_operating_point(rule.label, name, threshold, onehot[:, j], probs[:, j]))
    findings = [j for j, label in enumerate(label_tuple) if label not in normals]
    for j in findings:
        points.append(_operating_point(label_tuple[j], "finding", rules.finding_threshold, onehot[:, j], probs[:, j]))

    calibration = tuple(_calibration(label_tuple[j], onehot[:, j], probs[:, j], calibration_bins) for j in findings)
    return Evaluation(
        labels=label_tuple,
        count=n,
        confusion=confusion,
        accuracy=accuracy,
        per_label=tuple(per_label),
        operating_points=tuple(points),
        calibration=calibration,
        normal_labels=tuple(label for label in label_tuple if label in normals),
        bootstrap=bootstrap,
        confidence=confidence,
        seed=seed,
    )


def propose_thresholds(
    y_true: Sequence[str],
    scores: np.ndarray,
    labels: Sequence[str],
    *,
    normal_labels: Sequence[str],
    stat_sensitivity: float,
    urgent_sensitivity: float,
    finding_threshold: float = 0.5,
) -> TriageRules:
    """Triage rules for a freshly trained model: per non-normal label, the highest threshold that still
    catches the target share of that label's studies (STAT at the lower sensitivity, URGENT at the higher).

    The highest such threshold keeps false alarms lowest for the sensitivity asked. It is tuned to these data:
    choose it on a validation split and report it on a separate test split, or the sensitivity is optimistic.
    """
    for name, target in (("stat_sensitivity", stat_sensitivity), ("urgent_sensitivity", urgent_sensitivity)):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], not {target}")
    if stat_sensitivity > urgent_sensitivity:
        raise ValueError(
            f"stat_sensitivity ({stat_sensitivity}) is above urgent_sensitivity ({urgent_sensitivity}): STAT is "
            "the stricter (higher) threshold, so it catches fewer studies"
        )
    label_tuple, truth, probs = _validated(y_true, scores, labels)
    normals = _known(normal_labels, label_tuple, "normal labels")
    findings = [j for j, label in enumerate(label_tuple) if label not in normals]
    if not findings:
        raise ValueError("every label is a normal label: there is no finding to set triage thresholds for")
    missing = [label_tuple[j] for j in findings if not np.any(truth == j)]
    if missing:
        raise ValueError(f"no positive studies for {missing}: cannot choose a threshold for a sensitivity target")
    thresholds = []
    for j in findings:
        positive_scores = probs[truth == j, j]
        thresholds.append(
            Threshold(
                label=label_tuple[j],
                stat=_threshold_for_sensitivity(positive_scores, stat_sensitivity),
                urgent=_threshold_for_sensitivity(positive_scores, urgent_sensitivity),
            )
        )
    return TriageRules(thresholds=tuple(thresholds), finding_threshold=finding_threshold)


def _threshold_for_sensitivity(positive_scores: np.ndarray, target: float) -> float:
    """The highest t with mean(positive_scores >= t) >= target: the score of the k-th highest positive,
    k the fewest positives that reach the target (counted exactly, not via a rounded target * count)."""
    count = len(positive_scores)
    k = max(1, math.ceil(target * count))
    while k > 1 and (k - 1) / count >= target:
        k -= 1
    while k < count and k / count < target:
        k += 1
    return float(np.sort(positive_scores)[::-1][k - 1])


def _operating_point(label: str, name: str, threshold: float, y: np.ndarray, s: np.ndarray) -> OperatingPoint:
    called = s >= threshold
    tp = int(np.sum(called & y))
    fp = int(np.sum(called & ~y))
    fn = int(np.sum(~called & y))
    tn = int(np.sum(~called & ~y))
    return OperatingPoint(
        label=label,
        name=name,
        threshold=float(threshold),
        sensitivity=tp / (tp + fn) if tp + fn else None,
        specificity=tn / (tn + fp) if tn + fp else None,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


def _calibration(label: str, y: np.ndarray, s: np.ndarray, n_bins: int) -> Calibration:
    """Uniform bins as `sklearn.calibration.calibration_curve` makes them, but keeping empty bins and counts
    (the plot shows how many studies each point stands for)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], s)
    totals = np.bincount(ids, minlength=n_bins)
    sums = np.bincount(ids, weights=s, minlength=n_bins)
    trues = np.bincount(ids, weights=y.astype(float), minlength=n_bins)
    bins = []
    gap = 0.0
    for b in range(n_bins):
        count = int(totals[b])
        mean = float(sums[b] / count) if count else None
        observed = float(trues[b] / count) if count else None
        if mean is not None and observed is not None:
            gap += count * abs(observed - mean)
        bins.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), count, mean, observed))
    return Calibration(
        label=label,
        bins=tuple(bins),
        brier=float(brier_score_loss(y, s, pos_label=True)),
        ece=gap / len(s),
    )


def _bootstrap_auroc_ci(
    onehot: np.ndarray, probs: np.ndarray, resamples: int, confidence: float, seed: int
) -> list[tuple[tuple[float, float] | None, int]]:
    """Per label, the percentile CI of AUROC over `resamples` resamples of the studies (with replacement),
    skipping resamples without both classes, and how many were kept.

    A resample is a vector of multiplicities, so one sort per label serves every resample (weighted
    Mann-Whitney), rather than a scikit-learn call per resample and label.
    """
    n, k = probs.shape
    if resamples == 0:
        return [(None, 0)] * k
    rng = np.random.default_rng(seed)
    prepared = [_WeightedAuc(onehot[:, j], probs[:, j]) for j in range(k)]
    values: list[list[np.ndarray]] = [[] for _ in range(k)]
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // n)
    done = 0
    while done < resamples:
        rows = min(chunk, resamples - done)
        picks = rng.integers(0, n, size=(rows, n))
        flat = (np.arange(rows)[:, None] * n + picks).ravel()
        weights = np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(float)
        for j, auc in enumerate(prepared):
            if auc.defined:
                values[j].append(auc(weights))
        done += rows
    alpha = (1.0 - confidence) / 2.0
    result: list[tuple[tuple[float, float] | None, int]] = []
    for j in range(k):
        kept = np.concatenate(values[j]) if values[j] else np.empty(0)
        kept = kept[~np.isnan(kept)]
        if kept.size == 0:
            result.append((None, 0))
            continue
        low, high = np.quantile(kept, [alpha, 1.0 - alpha])
        result.append(((float(low), float(high)), int(kept.size)))
    return result


class _WeightedAuc:
    """AUROC of one label under per-study weights (multiplicities), ties counting one half, as
    `roc_auc_score` does; NaN for a weighting without both classes."""

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        order = np.argsort(s, kind="stable")
        ordered = s[order]
        self.order = order
        self.starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        self.positive = y[order].astype(float)
        self.negative = 1.0 - self.positive
        self.defined = bool(y.any() and not y.all())

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        w = weights[:, self.order]
        pos = np.add.reduceat(w * self.positive, self.starts, axis=1)
        neg = np.add.reduceat(w * self.negative, self.starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        wins = np.sum(pos * (below + 0.5 * neg), axis=1)
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def _validated(
    y_true: Sequence[str], scores: np.ndarray, labels: Sequence[str]
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Label order, true label indices and float64 scores, or a ValueError that says what is wrong."""
    label_tuple = tuple(labels)
    if not label_tuple:
        raise ValueError("no labels")
    if len(set(label_tuple)) != len(label_tuple):
        raise ValueError(f"labels must be unique: {list(label_tuple)}")
    truth_list = list(y_true)
    if not truth_list:
        raise ValueError("no studies to evaluate")
    index = {label: j for j, label in enumerate(label_tuple)}
    unknown = sorted({str(v) for v in truth_list if v not in index})
    if unknown:
        raise ValueError(f"true labels not among the model's labels {list(label_tuple)}: {unknown}")
    probs = np.asarray(scores, dtype=np.float64)
    if probs.shape != (len(truth_list), len(label_tuple)):
        raise ValueError(
            f"scores have shape {probs.shape}; expected ({len(truth_list)}, {len(label_tuple)}): "
            "one row per study, one column per label"
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError("scores contain NaN or infinity")
    if probs.min() < -_PROBABILITY_SLACK or probs.max() > 1.0 + _PROBABILITY_SLACK:
        raise ValueError(
            f"scores must be probabilities in [0, 1] (found {probs.min():.4g} to {probs.max():.4g}): "
            "apply the model's output activation first"
        )
    probs = np.clip(probs, 0.0, 1.0)
    truth = np.fromiter((index[v] for v in truth_list), dtype=np.int64, count=len(truth_list))
    return label_tuple, truth, probs


def _known(names: Sequence[str], labels: tuple[str, ...], what: str) -> frozenset[str]:
    unknown = sorted({str(name) for name in names if name not in labels})
    if unknown:
        raise ValueError(f"{what} not among the model's labels {list(labels)}: {unknown}")
    return frozenset(names)


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)
