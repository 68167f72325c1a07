"""training.report: the four files, their content, and what must never happen (half files, pyplot state)."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streaming.triage import Threshold, TriageRules
from training.metrics import Evaluation, evaluate
from training.report import ReportFiles, render_markdown, report_json, write_report

LABELS = ("NORMAL", "PNEUMONIA")
RULES = TriageRules(thresholds=(Threshold(label="PNEUMONIA", stat=0.9, urgent=0.5),), finding_threshold=0.5)
MODEL = {"name": "pneumonia-xception", "version": "0.3.0"}
WHEN = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def sixteen() -> Evaluation:
    """Like the bundled sample: eight normal, eight pneumonia; confusion [[6, 2], [1, 7]]."""
    normal = [0.05, 0.1, 0.2, 0.3, 0.35, 0.45, 0.6, 0.7]
    s = [*normal, 0.4, 0.55, 0.65, 0.8, 0.85, 0.92, 0.97, 0.99]
    y_true = ["NORMAL"] * 8 + ["PNEUMONIA"] * 8
    scores = np.c_[1.0 - np.asarray(s), np.asarray(s)]
    return evaluate(y_true, scores, LABELS, normal_labels=["NORMAL"], rules=RULES, bootstrap=200)


def large() -> Evaluation:
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2 == 1
    s = np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0.0, 1.0)
    y_true = [LABELS[int(v)] for v in y]
    return evaluate(y_true, np.c_[1.0 - s, s], LABELS, normal_labels=["NORMAL"], rules=RULES, bootstrap=200)


def write(ev: Evaluation, out: Path, **kwargs: object) -> ReportFiles:
    arguments: dict = {
        "title": "Pneumonia model on the sample",
        "model": MODEL,
        "data": {"source": Path("/data/cxr/val"), "fingerprint": "sha256:0123abcd", "split": "test"},
        "created_at": WHEN,
        **kwargs,
    }
    return write_report(ev, out, **arguments)


HEADS = {"heads": [{"name": "logistic", "val_auroc": 0.91}, {"name": "mlp", "val_auroc": 0.93}], "chosen": "mlp"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Evaluation, ReportFiles]:
    """One report on the sixteen studies, read by several tests (drawing the plots is the slow part)."""
    ev = sixteen()
    return ev, write(ev, tmp_path_factory.mktemp("report") / "reports" / "new", extra={"training": HEADS})


def markdown(ev: Evaluation, **kwargs: object) -> str:
    """The Markdown alone, without drawing the plots."""
    arguments: dict = {"title": "t", "model": MODEL, "created_at": WHEN, **kwargs}
    return render_markdown(report_json(ev, **arguments), ev)


def test_writes_the_four_files(report: tuple[Evaluation, ReportFiles]) -> None:
    _, files = report
    out = files.json.parent
    assert files == ReportFiles(
        json=out / "evaluation.json",
        markdown=out / "evaluation.md",
        roc_png=out / "roc.png",
        calibration_png=out / "calibration.png",
    )
    assert sorted(p.name for p in out.iterdir()) == ["calibration.png", "evaluation.json", "evaluation.md", "roc.png"]


def test_json_has_the_evaluation_and_its_context(report: tuple[Evaluation, ReportFiles]) -> None:
    ev, files = report
    document = json.loads(files.json.read_text())
    json.dumps(document, allow_nan=False)
    assert document["schema"] == "cxr.evaluation/v1"
    assert document["model"] == MODEL
    assert document["data"] == {"source": "/data/cxr/val", "fingerprint": "sha256:0123abcd", "split": "test"}
    assert document["created_at"] == "2025-03-04T05:06:07Z"
    assert document["training"] == HEADS
    assert document["confusion"] == [[6, 2], [1, 7]]
    assert Evaluation.from_json(document) == ev


def test_created_at_is_rfc3339_utc() -> None:
    local = datetime(2025, 3, 4, 7, 6, 7, tzinfo=timezone(timedelta(hours=2)))
    assert report_json(sixteen(), title="t", model=MODEL, created_at=local)["created_at"] == "2025-03-04T05:06:07Z"
    stamp = report_json(sixteen(), title="t", model=MODEL)["created_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp)
    assert abs(datetime.fromisoformat(stamp) - datetime.now(UTC)) < timedelta(minutes=5)


def test_markdown_tells_the_reader_what_they_need(report: tuple[Evaluation, ReportFiles]) -> None:
    ev, files = report
    md = files.markdown.read_text()
    assert md.startswith("# Pneumonia model on the sample\n")
    assert "**pneumonia-xception** version **0.3.0**" in md
    assert "sha256:0123abcd" in md
    # Counts per label and the confusion matrix, rows true and columns predicted.
    assert "| NORMAL (normal) | 8 | 50.0 % |" in md
    assert "| true \\ predicted | NORMAL | PNEUMONIA | total |" in md
    assert "| **NORMAL** | 6 | 2 | 8 |" in md
    assert "| **PNEUMONIA** | 1 | 7 | 8 |" in md
    assert "| **total** | 7 | 9 | 16 |" in md
    # AUROC with its interval.
    m = ev.label_metrics("PNEUMONIA")
    assert m.auroc is not None and m.auroc_ci is not None
    assert f"| PNEUMONIA | 8 | 8 | {m.auroc:.3f} | {m.auroc_ci[0]:.3f} to {m.auroc_ci[1]:.3f} |" in md
    # Each operating point with its counts: STAT at 0.9 catches 0.92, 0.97, 0.99; URGENT at 0.5 also 0.55 to 0.85
    # and falsely flags 0.6 and 0.7.
    assert "| PNEUMONIA | STAT | ≥ 0.9 | 3/8 (37.5 %) | 8/8 (100.0 %) | 3 | 0 | 8 | 5 |" in md
    assert "| PNEUMONIA | URGENT | ≥ 0.5 | 7/8 (87.5 %) | 6/8 (75.0 %) | 7 | 2 | 6 | 1 |" in md
    assert "| PNEUMONIA | finding | ≥ 0.5 |" in md
    # The plots, by relative link; the reading notes, including the small-sample caveat.
    assert "![ROC curves](roc.png)" in md
    assert "![Calibration](calibration.png)" in md
    assert "## How to read this" in md
    assert "**Small sample.** Only 16 studies, as few as 8 of them" in md


def test_no_small_sample_caveat_on_enough_data() -> None:
    md = markdown(large())
    assert "## How to read this" in md
    assert "Small sample" not in md


def test_pngs_are_real_images(report: tuple[Evaluation, ReportFiles]) -> None:
    _, files = report
    for path in (files.roc_png, files.calibration_png):
        assert path.stat().st_size > 10_000
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 400 and image.height >= 400
            image.load()
            # Not blank: the curves and text make many distinct colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 20


def test_degenerate_data_still_make_a_report(tmp_path: Path) -> None:
    ev = evaluate(["NORMAL"] * 3, np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), LABELS, normal_labels=["NORMAL"])
    files = write(ev, tmp_path)
    md = files.markdown.read_text()
    assert "| NORMAL | 3 | 0 | undefined | — |" in md
    assert "AUROC is undefined for NORMAL, PNEUMONIA" in md
    with Image.open(files.roc_png) as image:
        assert image.format == "PNG"


def test_rewriting_replaces_the_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    write(sixteen(), tmp_path)
    files = write(large(), tmp_path)
    assert json.loads(files.json.read_text())["count"] == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "calibration.png",
        "evaluation.json",
        "evaluation.md",
        "roc.png",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": {"name": "m"}}, "version"),
        ({"extra": {"model": {}}}, "clash"),
        ({"extra": {"accuracy": 1.0}}, "clash"),
        ({"extra": {"bad": float("nan")}}, "JSON compliant"),
        ({"created_at": datetime(2025, 1, 1)}, "timezone"),
    ],
)
def test_bad_context_fails_before_anything_is_written(tmp_path: Path, kwargs: dict, message: str) -> None:
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=message):
        write(sixteen(), out, **kwargs)
    assert not out.exists()


def test_unserialisable_data_fails_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "report"
    with pytest.raises(TypeError, match="object"):
        write(sixteen(), out, data={"source": object()})
    assert not out.exists()


def test_labels_cannot_break_the_markdown_tables() -> None:
    labels = ("normal", "a|b")
    ev = evaluate(["normal", "a|b"], np.array([[0.7, 0.3], [0.2, 0.8]]), labels, normal_labels=["normal"])
    md = markdown(ev)
    assert "| **a\\|b** | 0 | 1 | 1 |" in md


def test_does_not_touch_pyplot(tmp_path: Path) -> None:
    """The report draws on Figure objects: pyplot (global figures, backend switching) stays unimported.
    (Asking matplotlib for its backend would import pyplot itself, so this checks only the import.)"""
    imported = "matplotlib.pyplot" in sys.modules
    write(evaluate(["A", "B"], np.array([[0.6, 0.4], [0.3, 0.7]]), ["A", "B"], bootstrap=10), tmp_path)
    assert (tmp_path / "roc.png").stat().st_size > 0
    if not imported:
        assert "matplotlib.pyplot" not in sys.modules
