"""The evaluation report that `cxr train` leaves beside a bundle and `cxr evaluate` writes on demand.

Four files in one folder: `evaluation.json` (the machine-readable record: `Evaluation.to_json()` plus which
model, which data, when), `evaluation.md` (what a radiologist or the IT person deploying the model reads before
trusting it), and the two plots it links, `roc.png` and `calibration.png`.

Plots are drawn on matplotlib `Figure` objects with the Agg canvas, never through pyplot, so nothing global
(backend, open figures) leaks between calls or into a process that also runs a GUI. Each file is written to a
temporary name and renamed, the JSON last, so a reader never sees a half-written report as finished.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from training.metrics import Evaluation, LabelMetrics

JSON_NAME = "evaluation.json"
MARKDOWN_NAME = "evaluation.md"
ROC_NAME = "roc.png"
CALIBRATION_NAME = "calibration.png"

#: Below this many studies, or this many positives or negatives for a label, the report warns that the
#: numbers are a smoke test rather than a validation (one study moves a sensitivity by several points).
SMALL_COUNT = 100
SMALL_CLASS = 30

_RULE_TITLES = {"stat": "STAT", "urgent": "URGENT", "finding": "finding"}


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    markdown: Path
    roc_png: Path
    calibration_png: Path


def write_report(
    evaluation: Evaluation,
    out_dir: Path,
    *,
    title: str,
    model: Mapping[str, str],
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
) -> ReportFiles:
    """Write evaluation.json, evaluation.md, roc.png and calibration.png into `out_dir` (created if missing).

    `model` needs "name" and "version"; `data` says what was evaluated (e.g. source, fingerprint, split);
    `extra` keys are added at the top level of the JSON (e.g. the training head comparison) and shown at the end
    of the Markdown. Everything is validated and rendered before the first file is written.
    """
    out = Path(out_dir)
    document = report_json(evaluation, title=title, model=model, data=data, extra=extra, created_at=created_at)
    encoded = (json.dumps(document, indent=2, allow_nan=False, default=_json_default) + "\n").encode()
    markdown = render_markdown(document, evaluation).encode()
    roc = _png(_roc_figure(evaluation, title))
    calibration = _png(_calibration_figure(evaluation, title))

    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        json=out / JSON_NAME,
        markdown=out / MARKDOWN_NAME,
        roc_png=out / ROC_NAME,
        calibration_png=out / CALIBRATION_NAME,
    )
    _atomic_write(files.roc_png, roc)
    _atomic_write(files.calibration_png, calibration)
    _atomic_write(files.markdown, markdown)
    _atomic_write(files.json, encoded)
    return files


def report_json(
    evaluation: Evaluation,
    *,
    title: str,
    model: Mapping[str, str],
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """The content of evaluation.json: the evaluation plus title, model identity, data and creation time (UTC)."""
    missing = [key for key in ("name", "version") if not model.get(key)]
    if missing:
        raise ValueError(f"model identity needs {missing}")
    when = created_at if created_at is not None else datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    document = evaluation.to_json()
    header = {
        "title": title,
        "model": {str(k): str(v) for k, v in model.items()},
        "data": dict(data or {}),
        "created_at": when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    clash = sorted((set(header) | set(document)) & set(extra or {}))
    if clash:
        raise ValueError(f"extra report keys clash with the report's own: {clash}")
    result = {"schema": document.pop("schema"), **header, **document, **dict(extra or {})}
    # Fail here, before any file is written, on NaN or values JSON cannot hold.
    json.dumps(result, allow_nan=False, default=_json_default)
    return result


def render_markdown(document: Mapping[str, Any], evaluation: Evaluation) -> str:
    """The human report: `document` is what `report_json` returned for `evaluation`."""
    ev = evaluation
    lines: list[str] = [f"# {_text(document['title'])}", ""]
    model = document["model"]
    data = document.get("data") or {}
    source = f" from `{data['source']}`" if data.get("source") else ""
    split = f" (split: {_text(data['split'])})" if data.get("split") else ""
    lines.append(
        f"Model **{_text(model['name'])}** version **{_text(model['version'])}**, "
        f"evaluated on {ev.count} studies{source}{split}, {document['created_at']}."
    )
    if data.get("fingerprint"):
        lines.append(f"Data fingerprint: `{data['fingerprint']}`.")
    lines.append("")

    findings = [label for label in ev.labels if label not in ev.normal_labels]
    lines += ["## Summary", ""]
    correct = sum(ev.confusion[i][i] for i in range(len(ev.labels)))
    lines.append(f"- Accuracy (the highest-scoring label is the true one): {_ratio(correct, ev.count)}.")
    for m in ev.per_label:
        if m.label in findings or not findings:
            lines.append(f"- {_text(m.label)}: AUROC {_auroc(m, ev.confidence)}.")
    for p in ev.operating_points:
        if p.name != "finding":
            lines.append(
                f"- {_RULE_TITLES.get(p.name, p.name)} for {_text(p.label)} (score ≥ {_num(p.threshold)}): "
                f"catches {_ratio(p.tp, p.tp + p.fn)} of studies with it, "
                f"leaves {_ratio(p.tn, p.tn + p.fp)} of those without it alone."
            )
    lines.append("")

    lines += ["## Studies per label", "", "| label | studies | share |", "|---|---:|---:|"]
    for i, label in enumerate(ev.labels):
        total = sum(ev.confusion[i])
        kind = " (normal)" if label in ev.normal_labels else ""
        lines.append(f"| {_cell(label)}{kind} | {total} | {_percent(total, ev.count)} |")
    lines.append(f"| **all** | {ev.count} | |")
    lines.append("")

    lines += [
        "## Confusion matrix",
        "",
        "Rows are the true label, columns the label the model scored highest (no triage threshold applied).",
        "",
        "| true \\ predicted | " + " | ".join(_cell(label) for label in ev.labels) + " | total |",
        "|---|" + "---:|" * (len(ev.labels) + 1),
    ]
    for i, label in enumerate(ev.labels):
        row = ev.confusion[i]
        lines.append(f"| **{_cell(label)}** | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |")
    column_totals = [sum(row[j] for row in ev.confusion) for j in range(len(ev.labels))]
    lines.append("| **total** | " + " | ".join(str(v) for v in column_totals) + f" | {ev.count} |")
    lines.append("")

    level = _confidence(ev.confidence)
    lines += [
        "## Discrimination (AUROC)",
        "",
        f"| label | positives | negatives | AUROC | {level} CI |",
        "|---|---:|---:|---:|---|",
    ]
    for m in ev.per_label:
        auroc = "undefined" if m.auroc is None else f"{m.auroc:.3f}"
        ci = "—" if m.auroc_ci is None else f"{m.auroc_ci[0]:.3f} to {m.auroc_ci[1]:.3f}"
        lines.append(f"| {_cell(m.label)} | {m.positives} | {m.negatives} | {auroc} | {ci} |")
    lines += ["", f"![ROC curves]({ROC_NAME})", ""]

    lines += ["## Operating points", ""]
    if ev.operating_points:
        lines += [
            "A study counts as flagged for a label when its score is at or above the threshold, as in the worklist.",
            "",
            "| label | rule | threshold | sensitivity | specificity | TP | FP | TN | FN |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in ev.operating_points:
            lines.append(
                f"| {_cell(p.label)} | {_RULE_TITLES.get(p.name, p.name)} | ≥ {_num(p.threshold)} | "
                f"{_ratio(p.tp, p.tp + p.fn)} | {_ratio(p.tn, p.tn + p.fp)} | {p.tp} | {p.fp} | {p.tn} | {p.fn} |"
            )
    else:
        lines.append("No triage thresholds and no finding labels: nothing to measure.")
    lines.append("")

    lines += ["## Calibration", ""]
    if ev.calibration:
        lines += [f"![Calibration]({CALIBRATION_NAME})", "", "| label | Brier score | ECE |", "|---|---:|---:|"]
        lines += [f"| {_cell(c.label)} | {c.brier:.3f} | {c.ece:.3f} |" for c in ev.calibration]
    else:
        lines.append("Every label is a normal label: no finding scores to calibrate.")
    lines.append("")

    lines += ["## How to read this", ""]
    lines += _reading_notes(ev)
    lines.append("")

    own = {"schema", "title", "model", "data", "created_at", *ev.to_json()}
    for key, value in document.items():
        if key in own:
            continue
        lines += [f"## {_text(str(key))}", "", "```json", json.dumps(value, indent=2, default=_json_default), "```", ""]
    return "\n".join(lines)


def _reading_notes(ev: Evaluation) -> list[str]:
    level = _confidence(ev.confidence)
    notes = [
        "- **Sensitivity** is the share of studies *with* the finding that a rule flags (the rest, FN, are "
        "missed). **Specificity** is the share of studies *without* it that the rule leaves alone (the rest, FP, "
        "are false alarms). Raising a threshold trades sensitivity for specificity.",
        "- **AUROC** is the chance that a random study with the label scores higher than a random one without it: "
        "0.5 is guessing, 1.0 a perfect ranking. It does not depend on any threshold.",
        f"- The **{level} confidence interval** comes from {ev.bootstrap} bootstrap resamples of the studies "
        f"(seed {ev.seed}); a wide interval means these data cannot pin the number down.",
        "- **Calibration**: points on the diagonal mean a score of 0.8 is right about 80 % of the time. "
        "Points below it mean the model is overconfident. The Brier score and the expected calibration error "
        "(ECE) summarise this; lower is better.",
        "- These figures hold for data like these. The share of each label here may differ from your department's, "
        "and thresholds chosen on the same studies they are measured on look better than they will in practice.",
    ]
    if any(m.auroc is None for m in ev.per_label):
        undefined = ", ".join(m.label for m in ev.per_label if m.auroc is None)
        notes.append(
            f"- AUROC is undefined for {_text(undefined)}: a label present in every study or in none cannot be "
            "ranked against the rest."
        )
    present = [m for m in ev.per_label if m.positives and m.negatives]
    smallest = min(present, key=lambda m: min(m.positives, m.negatives), default=None)
    fewest = min(smallest.positives, smallest.negatives) if smallest else 0
    if ev.count < SMALL_COUNT or (smallest is not None and fewest < SMALL_CLASS):
        detail = ""
        if smallest is not None:
            side = "with" if smallest.positives <= smallest.negatives else "without"
            detail = f", as few as {fewest} of them {side} {_text(smallest.label)}"
        notes.append(
            f"- **Small sample.** Only {ev.count} studies{detail}: one study more or less moves a sensitivity by "
            f"{100.0 / max(fewest, 1):.0f} percentage points, the intervals are wide (and the bootstrap understates "
            "them on so few studies), and a model can look perfect here by chance. Treat this as a smoke test, not "
            "as a validation."
        )
    return notes


def _roc_figure(ev: Evaluation, title: str) -> Figure:
    fig = Figure(figsize=(6.0, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    defined = [m for m in ev.per_label if m.auroc is not None]
    findings = [m for m in defined if m.label not in ev.normal_labels]
    shown = findings or defined
    for m in shown:
        (line,) = ax.plot(m.roc[0], m.roc[1], linewidth=2, label=f"{m.label} ({_auroc(m, ev.confidence)})")
        # Rules that land on the same point (URGENT and the finding threshold often coincide) share one note.
        notes: dict[tuple[float, float], list[str]] = {}
        for p in ev.operating_points:
            if p.label == m.label and p.sensitivity is not None and p.specificity is not None:
                note = f"{_RULE_TITLES.get(p.name, p.name)} ≥ {_num(p.threshold)}"
                notes.setdefault((1.0 - p.specificity, p.sensitivity), []).append(note)
        for (fpr, tpr), texts in notes.items():
            ax.plot([fpr], [tpr], marker="o", color=line.get_color(), markersize=6)
            ax.annotate(", ".join(texts), (fpr, tpr), textcoords="offset points", xytext=(6, -12), fontsize=8)
    if not shown:
        ax.text(0.5, 0.5, "ROC undefined:\nevery study has the same label", ha="center", va="center")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false alarms among studies without the label)")
    ax.set_ylabel("sensitivity (share of studies with the label caught)")
    ax.set_title(f"{title}: ROC ({ev.count} studies)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _calibration_figure(ev: Evaluation, title: str) -> Figure:
    fig = Figure(figsize=(6.0, 7.0), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfectly calibrated")
    for c in ev.calibration:
        used = [b for b in c.bins if b.count]
        (line,) = top.plot(
            [b.mean_predicted for b in used],
            [b.observed_fraction for b in used],
            marker="o",
            linewidth=1.5,
            label=f"{c.label} (Brier {c.brier:.3f})",
        )
        edges = [c.bins[0].lower, *(b.upper for b in c.bins)]
        bottom.stairs(np.array([b.count for b in c.bins]), np.array(edges), color=line.get_color(), linewidth=1.5)
    if not ev.calibration:
        top.text(0.5, 0.5, "no finding labels", ha="center", va="center")
    top.set_xlim(-0.01, 1.01)
    top.set_ylim(-0.01, 1.01)
    top.set_ylabel("observed share with the label")
    top.set_title(f"{title}: calibration ({ev.count} studies)", fontsize=10)
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("score (top: mean score of the studies in each bin)")
    bottom.set_ylabel("studies")
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _atomic_write(path: Path, content: bytes) -> None:
    """Write beside the target and rename over it, so the file is either the old one or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:  # honours the umask, unlike mkstemp's 0600
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    """What callers commonly put in `data` or `extra` besides JSON types: paths, times, numpy scalars/arrays."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"not JSON serialisable in the evaluation report: {type(value).__name__}")


def _auroc(m: LabelMetrics, confidence: float) -> str:
    if m.auroc is None:
        return "undefined"
    if m.auroc_ci is None:
        return f"{m.auroc:.3f}"
    return f"{m.auroc:.3f}, {_confidence(confidence)} CI {m.auroc_ci[0]:.3f} to {m.auroc_ci[1]:.3f}"


def _ratio(part: int, whole: int) -> str:
    return f"{part}/{whole} ({_percent(part, whole)})" if whole else "— (none)"


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "—"


def _confidence(level: float) -> str:
    return f"{100.0 * level:g} %"


def _num(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _text(value: object) -> str:
    """Plain text for Markdown prose: no stray emphasis or links from a label or title."""
    return str(value).replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_").replace("[", "\\[")


def _cell(value: object) -> str:
    return _text(value).replace("|", "\\|").replace("\n", " ")
