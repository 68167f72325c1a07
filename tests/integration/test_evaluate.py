"""`cxr evaluate`: the demo bundle on the sixteen labelled samples, through the stream's scorer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keras_reference import keras_probabilities
from streaming.settings import default_bundle_dir
from training.data import with_data_root
from training.evaluate import run_evaluation

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def labelled_folder(samples: list[Path], root: Path) -> Path:
    """The samples sorted into one sub-folder per label, as their names say (NORMAL2-IM-..., person1_bacteria...)."""
    for path in samples:
        label = "NORMAL" if path.name.startswith("NORMAL") else "PNEUMONIA"
        (root / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / label / path.name)
    return root


def test_the_demo_model_on_the_samples_is_plain_keras_confusion_matrix(
    spark, spark_settings, sample_jpegs, tmp_path: Path
) -> None:
    data = labelled_folder(sample_jpegs, tmp_path / "labelled")
    (data / "NORMAL" / "notes.txt").write_text("not an image")  # counted as unscored, never fails the run
    settings = with_data_root(spark_settings.model_copy(update={"model_bundle": default_bundle_dir()}), data)

    run = run_evaluation(spark, settings, data, tmp_path / "report")

    images = sorted((data / "NORMAL").glob("*.jpeg")) + sorted((data / "PNEUMONIA").glob("*.jpeg"))
    truth = np.array([0 if p.parent.name == "NORMAL" else 1 for p in images])
    predicted = keras_probabilities(default_bundle_dir(), images).argmax(axis=1)
    expected = [[int(np.sum((truth == t) & (predicted == p))) for p in (0, 1)] for t in (0, 1)]
    assert [list(row) for row in run.evaluation.confusion] == expected
    assert sum(expected[i][i] for i in (0, 1)) == 13  # the demo model's 13 of 16, as DESIGN.md says
    assert run.evaluation.count == 16
    assert run.unscored == {"decode/unsupported_format": 1}

    report = json.loads(run.files.json.read_text())
    assert report["model"] == {"name": "pneumonia-xception", "version": "0.3.0"}
    assert report["data"]["counts"] == {"NORMAL": 9, "PNEUMONIA": 8}
    auroc = {m["label"]: m for m in report["per_label"]}["PNEUMONIA"]
    assert 0.5 < auroc["auroc"] <= 1.0 and auroc["auroc_ci"][0] <= auroc["auroc"] <= auroc["auroc_ci"][1]
    assert "13" in run.files.markdown.read_text()
    for png in (run.files.roc_png, run.files.calibration_png):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 200


def test_cxr_evaluate_prints_the_matrix_and_refuses_labels_the_model_does_not_know(
    spark, sample_jpegs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from streaming.cli import main

    normal = [p for p in sample_jpegs if p.name.startswith("NORMAL")][:2]
    sick = [p for p in sample_jpegs if not p.name.startswith("NORMAL")][:2]
    data = labelled_folder(normal + sick, tmp_path / "small")
    bundle = str(default_bundle_dir())

    assert main(["evaluate", bundle, str(data), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "4 images" in printed and "accuracy" in printed and "AUROC PNEUMONIA" in printed
    assert (tmp_path / "report" / "evaluation.md").exists()
    assert spark.range(1).count() == 1  # the shared session is still running: the command stops only its own

    (data / "NORMAL").rename(data / "normal")
    assert main(["evaluate", bundle, str(data), "--out", str(tmp_path / "again")]) == 2
    assert not (tmp_path / "again").exists()
