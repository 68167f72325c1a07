"""`cxr train` end to end: real X-rays, real Spark, the demo model's Xception trunk; the bundle it writes is then
served by the stream's own scorer and must score exactly like plain Keras on that bundle's model file.

One training (module-scoped) on the sixteen sample X-rays plus augmentations (48 images) and one broken file;
the tests check the bundle, its report, its triage thresholds and how the stream serves it. Sixteen images of
eight patients per label say nothing about accuracy, so held-out figures are checked for shape and consistency
only (the augmented copies of one patient can fall on both sides of the split).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.heads import augmented_folder
from keras_reference import keras_probabilities
from streaming import bundle as bundles
from streaming.contracts import Reference, Source
from streaming.fetch import FetchPolicy
from streaming.scoring import RawMessage, ScoringConfig, score_messages
from streaming.triage import priority
from training.metrics import propose_thresholds
from training.split import Part, stratified_split
from training.train import TrainOptions, TrainSummary, train

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LABELS = ("NORMAL", "PNEUMONIA")


@dataclass(frozen=True)
class Trained:
    data: Path
    bundle: Path
    summary: TrainSummary


@pytest.fixture(scope="module")
def trained(spark, spark_settings, sample_jpegs, tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("train").resolve()
    data = root / "data"
    assert augmented_folder(sample_jpegs, data, variants=3) == {"NORMAL": 24, "PNEUMONIA": 24}
    broken = sample_jpegs[0].read_bytes()
    (data / "NORMAL" / "broken.jpeg").write_bytes(broken[: len(broken) // 3])
    options = TrainOptions(data=data, out=root / "bundle", name="site-test", version="1", bootstrap=200)
    summary = train(spark, spark_settings, options)
    return Trained(data, root / "bundle", summary)


def test_the_bundle_holds_model_descriptor_training_record_and_report(trained: Trained) -> None:
    files = sorted(p.name for p in trained.bundle.iterdir())
    assert files == ["bundle.json", "calibration.png", "evaluation.json", "evaluation.md", "model.keras", "roc.png"]
    assert not [p for p in trained.bundle.parent.iterdir() if p.name.startswith(".")]  # no partial folder left
    descriptor = bundles.read_descriptor(trained.bundle)
    assert (descriptor.name, descriptor.version) == ("site-test", "1")
    assert descriptor.labels == LABELS and descriptor.normal_labels == ("NORMAL",)
    assert descriptor.model.path == "model.keras" and descriptor.output.activation == "softmax"
    assert descriptor.input.model_dump() == {"height": 150, "width": 150, "channels": 3, "resample": "nearest"}
    assert descriptor.preprocessing.scheme == "xception"
    record = descriptor.training
    assert record is not None
    assert record.examples == {"NORMAL": 18, "PNEUMONIA": 18}
    assert record.backbone == "pneumonia-xception 0.3.0 (trunk)" and record.head.startswith("logistic")
    assert record.evaluation == "evaluation.json" and len(record.data_fingerprint) == 64
    assert record.data_source == str(trained.data)
    assert bundles.load(trained.bundle, device="cpu").descriptor == descriptor


def test_unusable_images_are_left_out_and_counted(trained: Trained) -> None:
    assert trained.summary.excluded == {"decode/corrupt_image": 1}
    report = json.loads((trained.bundle / "evaluation.json").read_text())
    assert report["excluded"] == {"decode/corrupt_image": 1}


def test_the_head_learned_the_training_set_and_the_report_is_consistent(trained: Trained) -> None:
    summary = trained.summary
    assert all(auroc is not None and auroc > 0.9 for auroc in summary.train_auroc.values())
    assert summary.mllib_max_difference is not None and summary.mllib_max_difference < 1e-5
    report = json.loads((trained.bundle / "evaluation.json").read_text())
    assert report["labels"] == list(LABELS) and report["count"] == 12
    assert report["data"]["counts"] == {"NORMAL": 6, "PNEUMONIA": 6}
    assert report["data"]["fingerprint"] == summary.descriptor.training.data_fingerprint  # type: ignore[union-attr]
    assert sum(map(sum, report["confusion"])) == 12 and [sum(row) for row in report["confusion"]] == [6, 6]
    assert [m["label"] for m in report["per_label"]] == list(LABELS)
    assert report["training"]["train_auroc"] == summary.train_auroc
    assert "site-test 1" in (trained.bundle / "evaluation.md").read_text()


def test_triage_thresholds_are_those_proposed_from_the_held_out_part(trained: Trained) -> None:
    """Recomputed from scratch: the same split, plain Keras scores of the bundle's model, the proposal rule."""
    images = sorted(p for p in trained.data.rglob("*.jpeg") if p.name != "broken.jpeg")
    parts = stratified_split([(p.as_uri(), p.parent.name) for p in images], 0.25, seed=0)
    held_out = [p for p in images if parts[p.as_uri()] is Part.TEST]
    scores = keras_probabilities(trained.bundle, held_out)
    expected = propose_thresholds(
        [p.parent.name for p in held_out],
        scores,
        LABELS,
        normal_labels=("NORMAL",),
        stat_sensitivity=0.5,
        urgent_sensitivity=0.9,
    )
    (rule,) = bundles.read_descriptor(trained.bundle).triage.thresholds
    (want,) = expected.thresholds
    assert rule.label == "PNEUMONIA"
    assert rule.stat == pytest.approx(want.stat, abs=1e-5)
    assert rule.urgent == pytest.approx(want.urgent, abs=1e-5)
    report = json.loads((trained.bundle / "evaluation.json").read_text())
    points = {p["name"]: p["threshold"] for p in report["operating_points"] if p["label"] == "PNEUMONIA"}
    assert (points["stat"], points["urgent"]) == (rule.stat, rule.urgent)


def test_the_stream_serves_the_bundle_exactly_like_plain_keras(trained: Trained, sample_jpegs: list[Path]) -> None:
    loaded = bundles.load(trained.bundle, device="cpu")
    config = ScoringConfig(fetch=FetchPolicy(allowed_roots=(sample_jpegs[0].parent.resolve(),)))
    messages = [
        RawMessage(Reference(event_id=f"e{i}", uri=p.as_uri()).to_json(), Source("t", 0, i))
        for i, p in enumerate(sample_jpegs)
    ]
    outcomes = score_messages(messages, loaded, config)
    assert all(o.scored for o in outcomes)
    expected = keras_probabilities(trained.bundle, sample_jpegs)
    rules = loaded.descriptor.triage
    for outcome, probs in zip(outcomes, expected, strict=True):
        result = json.loads(outcome.value)
        assert result["model"] == {"name": "site-test", "version": "1"}
        assert result["scores"]["NORMAL"] == pytest.approx(float(probs[0]), abs=1e-5)
        assert result["scores"]["PNEUMONIA"] == pytest.approx(float(probs[1]), abs=1e-5)
        assert result["priority"] == priority(result["scores"], rules).value


def test_a_bundle_whose_descriptor_and_model_disagree_is_refused(trained: Trained, spark, tmp_path: Path) -> None:
    from streaming.udf import warm_up

    descriptor = json.loads((trained.bundle / "bundle.json").read_text())
    descriptor["labels"] = [*LABELS, "OTHER"]
    descriptor["model"]["path"] = str(trained.bundle / "model.keras")
    (tmp_path / "bundle.json").write_text(json.dumps(descriptor))
    message = "the model has 2 outputs but the descriptor names 3 labels"
    with pytest.raises(bundles.BundleError, match=message):
        bundles.load(tmp_path, device="cpu")
    # What `cxr run` meets first: the Python workers load the broadcast bundle; the error comes back as itself,
    # a configuration error (exit 2), not as a Spark task failure (exit 1).
    archive = spark.sparkContext.broadcast(bundles.pack(tmp_path))
    with pytest.raises(bundles.BundleError, match=message):
        warm_up(spark, archive, ScoringConfig(inference_device="cpu"))


def test_cxr_train_exits_2_on_a_folder_with_one_label(spark, sample_jpegs: list[Path], tmp_path: Path) -> None:
    from streaming.cli import EXIT_CONFIG, main

    one = tmp_path / "data" / "NORMAL"
    one.mkdir(parents=True)
    for path in sample_jpegs[:2]:
        shutil.copy(path, one / path.name)
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "bundle"), "--master", "local[2]"]) == (
        EXIT_CONFIG
    )
    assert not (tmp_path / "bundle").exists()
    assert spark.range(3).count() == 3  # the shared session was not stopped by the command
