"""`cxr train`: labelled images → backbone features on Spark → a head → a held-out report → a model bundle.

The steps, each in its own module: read the labelled data (`data`), load and check the backbone (`backbone`),
compute features with the stream's own image path (`features`), split (`split`), fit the head (`heads`),
measure it on the held-out part and propose triage thresholds (`metrics`), write the bundle and its report
atomically (`export`, `report`). The bundle is one Keras model (backbone + Dense head) with a descriptor, served
by the unchanged streaming path.

Everything is deterministic given the seed and the images: the split is hash-ordered, MLlib's L-BFGS and the
Keras head (zero-initialised, seeded row order) have no other randomness, and the bootstrap is seeded.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from streaming.bundle import (
    Activation,
    Descriptor,
    ModelRef,
    OutputDescriptor,
    TrainingRecord,
)
from streaming.bundle import load as load_bundle
from streaming.pipeline import inference_threads
from streaming.preprocess import Resample
from streaming.scoring import ScoringConfig, scoring_config
from streaming.settings import Settings
from training import backbone as backbones
from training import export, heads, split
from training.backbone import Backbone
from training.data import DataError, LabelledData, read_labelled, with_data_root
from training.features import with_features
from training.heads import DEFAULT_HEAD, HEADS, DenseHead, HeadKind
from training.metrics import Evaluation, evaluate, propose_thresholds
from training.report import write_report
from training.split import Part

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)
MODEL_FILE = "model.keras"
#: Labels that count as normal unless `--normal-label` says otherwise.
DEFAULT_NORMAL_LABELS = ("NORMAL", "Normal", "normal", "No Finding")
#: The L2 strength both heads use by default: 0.01, 0.1 and 1 scored within 0.01 held-out AUROC on the bench
#: (bench/heads.py); 0.1 keeps a few hundred images from being fitted to their noise.
DEFAULT_REG = 0.1
SCALING_SCHEMES = ("none", "unit", "xception", "inception", "tf", "torch", "imagenet")
#: MLlib's probabilities and the Dense head's must agree this closely, or the conversion is wrong.
HEAD_TOLERANCE = 1e-5


class OptionsError(ValueError):
    """Training options that do not make sense together (a configuration error: exit 2)."""


def parse_size(text: str) -> tuple[int, int]:
    """'150x150' (height x width) → (150, 150)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None or min(int(match.group(1)), int(match.group(2))) <= 0:
        raise OptionsError(f"expected HEIGHTxWIDTH in pixels (e.g. 150x150), not {text!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class TrainOptions:
    """What `cxr train` was asked to do (its flags); checked when built."""

    data: Path
    out: Path
    name: str | None = None
    version: str | None = None
    #: a bundle folder (its trunk) or a .keras file (the whole model); None: the demo bundle's trunk
    backbone: Path | None = None
    backbone_input: tuple[int, int] | None = None
    backbone_scaling: str | None = None
    backbone_resample: str | None = None
    head: HeadKind = DEFAULT_HEAD
    test: Path | None = None
    test_fraction: float = 0.25
    seed: int = 0
    normal_labels: tuple[str, ...] = ()
    stat_sensitivity: float = 0.5
    urgent_sensitivity: float = 0.9
    reg: float = DEFAULT_REG
    epochs: int = 300
    bootstrap: int = 1000
    force: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.head not in HEADS:
            problems.append(f"--head must be one of {', '.join(HEADS)}")
        if not 0.0 < self.test_fraction < 1.0:
            problems.append("--test-fraction must be between 0 and 1")
        for flag, value in (
            ("--stat-sensitivity", self.stat_sensitivity),
            ("--urgent-sensitivity", self.urgent_sensitivity),
        ):
            if not 0.0 < value <= 1.0:
                problems.append(f"{flag} must be in (0, 1]")
        if self.stat_sensitivity > self.urgent_sensitivity:
            problems.append("--stat-sensitivity must not exceed --urgent-sensitivity (STAT is the stricter rule)")
        if self.reg < 0:
            problems.append("--reg must be >= 0")
        if self.epochs < 1:
            problems.append("--epochs must be >= 1")
        if self.bootstrap < 0:
            problems.append("--bootstrap must be >= 0")
        for flag, text in (("--name", self.name), ("--version", self.version)):
            if text is not None and not text.strip():
                problems.append(f"{flag} must not be empty")
        if self.backbone_scaling is not None and self.backbone_scaling not in SCALING_SCHEMES:
            problems.append(f"--backbone-scaling must be one of {', '.join(SCALING_SCHEMES)}")
        if self.backbone_resample is not None and self.backbone_resample not in {r.value for r in Resample}:
            problems.append(f"--backbone-resample must be one of {', '.join(r.value for r in Resample)}")
        if len(set(self.normal_labels)) != len(self.normal_labels):
            problems.append("--normal-label names a label twice")
        data, out = self.data.resolve(), self.out.resolve()
        if out == data or data in out.parents or (self.test is not None and self.test.resolve() in out.parents):
            problems.append("--out must not be inside the labelled data")
        if problems:
            raise OptionsError("; ".join(problems))


@dataclass(frozen=True)
class TrainSummary:
    """What a training produced, for the command line and the tests."""

    bundle: Path
    descriptor: Descriptor
    evaluation: Evaluation
    train_counts: dict[str, int]
    test_counts: dict[str, int]
    #: "stage/error" → images left out, as the stream would dead-letter them
    excluded: dict[str, int]
    train_auroc: dict[str, float | None]
    #: the largest difference between MLlib's probabilities and the Dense head's (logistic head only)
    mllib_max_difference: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The summary the command prints (counts and figures only: no image names)."""
        ev = self.evaluation
        out = [
            f"bundle {self.descriptor.name} {self.descriptor.version} → {self.bundle}",
            f"trained on {_counts(self.train_counts)}; tested on {_counts(self.test_counts)}",
        ]
        if self.excluded:
            out.append(f"left out (could not be used): {_counts(self.excluded)}")
        out.append(f"held-out accuracy {ev.accuracy:.3f}")
        for m in ev.per_label:
            ci = f" ({m.auroc_ci[0]:.3f}-{m.auroc_ci[1]:.3f})" if m.auroc_ci else ""
            auroc = "undefined" if m.auroc is None else f"{m.auroc:.3f}{ci}"
            out.append(f"  {m.label}: held-out AUROC {auroc}")
        for rule in self.descriptor.triage.thresholds:
            out.append(f"  triage {rule.label}: STAT ≥ {rule.stat:.4g}, URGENT ≥ {rule.urgent:.4g}")
        out.append("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return out


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def choose_normal_labels(labels: Sequence[str], given: Sequence[str]) -> tuple[str, ...]:
    """The normal labels: those given (each must be a label), else any conventionally named normal label.
    At least one label must remain a finding, or there is nothing to triage."""
    if given:
        unknown = sorted(set(given) - set(labels))
        if unknown:
            raise DataError(f"--normal-label names no label of the data: {', '.join(unknown)}")
        chosen = tuple(label for label in labels if label in given)
    else:
        chosen = tuple(label for label in labels if label in DEFAULT_NORMAL_LABELS)
    if len(chosen) == len(labels):
        raise DataError("every label is a normal label: at least one must be a finding to triage")
    return chosen


def check_usable(labels: Sequence[str], usable: Mapping[str, int], excluded: Mapping[str, int], what: str) -> None:
    """`DataError` when a label has fewer than two usable images (one to train on, one to test with)."""
    short = {label: usable.get(label, 0) for label in labels if usable.get(label, 0) < split.MIN_PER_LABEL}
    if short:
        left_out = f"; left out as unusable: {_counts(excluded)}" if excluded else ""
        raise DataError(
            f"each label needs at least {split.MIN_PER_LABEL} usable images {what}; too few: {_counts(short)}{left_out}"
        )


@dataclass(frozen=True)
class Features:
    """The usable images' features on the driver, and what was left out."""

    uris: list[str]
    labels: list[str]
    given: list[str]
    x: np.ndarray
    excluded: dict[str, int]


def collect_features(frame: DataFrame) -> Features:
    """Features to the driver (through Arrow), failures counted by stage/error."""
    table = frame.select("uri", "label", "given", "features", "stage", "error").toPandas()
    failed = table["error"].notna()
    excluded = Counter(f"{s}/{e}" for s, e in zip(table["stage"][failed], table["error"][failed], strict=True))
    ok = table[~failed]
    x = np.stack([np.asarray(v, dtype=np.float32) for v in ok["features"]]) if len(ok) else np.zeros((0, 0))
    return Features(list(ok["uri"]), list(ok["label"]), list(ok["given"]), x, dict(sorted(excluded.items())))


def _frame_of(data: LabelledData, given: Part) -> DataFrame:
    from pyspark.sql import functions as F

    return data.frame.dropDuplicates(["uri", "label"]).withColumn("given", F.lit(given.value))


def _check_mllib(model: Any, frame: DataFrame, head: DenseHead, index: Mapping[str, int], x: np.ndarray) -> float:
    """The largest difference between MLlib's probabilities and the Dense head's on the same rows; a conversion
    bug (not a data problem) past `HEAD_TOLERANCE`."""
    uris, expected = heads.mllib_probabilities(model, frame)
    got = head.probabilities(x[[index[uri] for uri in uris]])
    worst = float(np.max(np.abs(got - expected))) if len(uris) else 0.0
    if worst > HEAD_TOLERANCE:
        raise RuntimeError(f"the Dense head differs from MLlib's probabilities by {worst:.2e} (> {HEAD_TOLERANCE})")
    return worst


class _Clock:
    """Seconds per step, for the summary."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        mark = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = time.monotonic() - mark


@contextmanager
def _featured(
    spark: SparkSession, backbone: Backbone, frame: DataFrame, config: ScoringConfig, rows: int
) -> Iterator[DataFrame]:
    """`frame` with features, persisted while the block runs (the logistic head fits on it where it is)."""
    from pyspark import StorageLevel

    archive = spark.sparkContext.broadcast(backbones.pack(backbone))
    featured = with_features(spark, frame, archive, config, rows).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        yield featured
    finally:
        featured.unpersist()
        archive.destroy()


def _split(labels: Sequence[str], feats: Features, options: TrainOptions) -> tuple[dict[str, Part], str]:
    """Each usable image's part, and how they were split (for the report)."""
    pairs = list(zip(feats.uris, feats.labels, strict=True))
    if options.test is None:
        check_usable(labels, Counter(feats.labels), feats.excluded, "")
        parts = split.stratified_split(pairs, options.test_fraction, options.seed)
        return parts, f"stratified {options.test_fraction:g} held out (seed {options.seed})"
    sides = {
        part: [pair for pair, given in zip(pairs, feats.given, strict=True) if given == part.value] for part in Part
    }
    check_usable(labels, Counter(label for _, label in sides[Part.TRAIN]), feats.excluded, "to train on")
    return split.given_split(sides[Part.TRAIN], sides[Part.TEST]), f"given test data ({options.test})"


def _fit_head(
    spark: SparkSession,
    featured: DataFrame,
    feats: Features,
    parts: Mapping[str, Part],
    labels: Sequence[str],
    options: TrainOptions,
) -> tuple[DenseHead, float | None]:
    """The head on the training part, and (logistic) how far its Dense form is from MLlib's probabilities."""
    from pyspark.sql import functions as F

    y = heads.label_indices(feats.labels, labels)
    train_rows = np.asarray([i for i, uri in enumerate(feats.uris) if parts[uri] is Part.TRAIN])
    if options.head == "keras":
        head = heads.fit_keras(
            feats.x[train_rows], y[train_rows], len(labels), reg=options.reg, epochs=options.epochs, seed=options.seed
        )
        return head, None
    weights = heads.class_weights(y[train_rows], len(labels))
    to_index = F.create_map(*[F.lit(v) for i, label in enumerate(labels) for v in (label, i)])
    to_weight = F.create_map(*[F.lit(v) for i, w in enumerate(weights) for v in (i, float(w))])
    usable = featured.where(F.col("error").isNull()).select("uri", "label", "features")
    assigned = split.assign(spark, usable, parts).withColumn("label_index", to_index[F.col("label")])
    train_frame = assigned.where(F.col("part") == Part.TRAIN.value).withColumn(
        "weight", to_weight[F.col("label_index")]
    )
    head, model = heads.fit_logistic(train_frame, len(labels), reg=options.reg)
    log.info("MLlib logistic regression: %d iterations", model.summary.totalIterations)
    index = {uri: i for i, uri in enumerate(feats.uris)}
    difference = _check_mllib(model, assigned, head, index, feats.x)
    log.info("MLlib head as a Dense layer: probabilities within %.1e of MLlib's", difference)
    return head, difference


def train(spark: SparkSession, settings: Settings, options: TrainOptions) -> TrainSummary:
    """Train a bundle as `options` say; `DataError`, `BundleError`, `ExportError` for what the operator must fix."""
    from streaming.progress import spark_progress

    clock = _Clock()
    trained_at = datetime.now(UTC).replace(microsecond=0)
    export.check_target(options.out, options.force)  # before any work, and again when the bundle is renamed in
    with clock.step("backbone"):
        backbone = backbones.resolve(
            options.backbone, options.backbone_scaling, options.backbone_input, options.backbone_resample
        )
        driver = backbones.load_on_driver(backbone)
    log.info("backbone %s: %d features per image", backbone.name, driver.width)

    with clock.step("data"):
        data = read_labelled(spark, options.data)
        labels = data.labels
        test_data = read_labelled(spark, options.test) if options.test is not None else None
        if test_data is not None:
            unknown = sorted(set(test_data.labels) - set(labels))
            if unknown:
                raise DataError(f"labels in the test data that the training data does not have: {', '.join(unknown)}")
        normal = choose_normal_labels(labels, options.normal_labels)

    settings = with_data_root(settings, options.data)  # the folder named on the command line may be read
    if options.test is not None:
        settings = with_data_root(settings, options.test)
    config = scoring_config(settings, inference_threads(settings, spark))
    frame = _frame_of(data, Part.TRAIN)
    if test_data is not None:
        frame = frame.unionByName(_frame_of(test_data, Part.TEST))
    rows = sum(data.counts.values()) + (sum(test_data.counts.values()) if test_data else 0)

    with _featured(spark, backbone, frame, config, rows) as featured:
        with clock.step("features"), spark_progress(spark, f"features of {rows} images", unit="images"):
            feats = collect_features(featured)
        log.info("features of %d images in %.1f s", len(feats.uris), clock.seconds["features"])
        if feats.excluded:
            log.warning("left out of training (could not be used): %s", _counts(feats.excluded))
            if "fetch/forbidden_uri" in feats.excluded:
                log.warning("file:// images of a table must be inside CXR_ALLOWED_ROOTS")
        parts, how = _split(labels, feats, options)
        with clock.step("head"):
            head, mllib_difference = _fit_head(spark, featured, feats, parts, labels, options)

    with clock.step("evaluation"):
        counts = split.part_counts(zip(feats.uris, feats.labels, strict=True), parts)
        test_rows = [i for i, uri in enumerate(feats.uris) if parts[uri] is Part.TEST]
        train_rows = [i for i, uri in enumerate(feats.uris) if parts[uri] is Part.TRAIN]
        y_test = [feats.labels[i] for i in test_rows]
        scores = head.probabilities(feats.x[test_rows])
        rules = propose_thresholds(
            y_test,
            scores,
            labels,
            normal_labels=normal,
            stat_sensitivity=options.stat_sensitivity,
            urgent_sensitivity=options.urgent_sensitivity,
        )
        evaluation = evaluate(
            y_test, scores, labels, normal_labels=normal, rules=rules, bootstrap=options.bootstrap, seed=options.seed
        )
        y_train = [feats.labels[i] for i in train_rows]
        on_train = evaluate(
            y_train, head.probabilities(feats.x[train_rows]), labels, normal_labels=normal, rules=rules, bootstrap=0
        )
        train_auroc = {m.label: m.auroc for m in on_train.per_label}

    name = options.name or options.out.name
    version = options.version or trained_at.strftime("%Y%m%dT%H%M%SZ")
    descriptor = Descriptor(
        name=name,
        version=version,
        description=f"Trained by cxr train: {backbone.name} features, {options.head} head.",
        model=ModelRef(path=MODEL_FILE, format="keras"),
        labels=labels,
        normal_labels=normal,
        input=backbone.input,
        preprocessing=backbone.preprocessing,
        output=OutputDescriptor(activation=Activation.SOFTMAX),
        triage=rules,
        training=TrainingRecord(
            data_fingerprint=data.fingerprint,
            data_source=data.source,
            examples=counts[Part.TRAIN],
            backbone=backbone.name,
            head=f"{options.head} (reg {options.reg:g})",
            trained_at=trained_at.isoformat().replace("+00:00", "Z"),
        ),
    )
    report_data: dict[str, Any] = {
        "source": data.source,
        "fingerprint": data.fingerprint,
        "split": how,
        "counts": counts[Part.TEST],
    }
    if test_data is not None:
        report_data.update(test_source=test_data.source, test_fingerprint=test_data.fingerprint)
    extra = {
        "excluded": feats.excluded,
        "training": {
            "head": options.head,
            "reg": options.reg,
            "backbone": backbone.name,
            "features": driver.width,
            "examples": counts[Part.TRAIN],
            "train_accuracy": on_train.accuracy,
            "train_auroc": train_auroc,
            "seed": options.seed,
            "mllib_max_difference": mllib_difference,
        },
    }

    with clock.step("bundle"), export.staged(options.out, options.force) as staging:
        heads.with_head(driver.features, head).save(staging / MODEL_FILE)
        export.write_descriptor(staging, descriptor)
        write_report(
            evaluation,
            staging,
            title=f"{name} {version}: held-out evaluation",
            model=descriptor.identity,
            data=report_data,
            extra=extra,
            created_at=trained_at,
        )
        load_bundle(staging, device="cpu")  # the bundle loads and its descriptor matches its model
    clock.seconds["total"] = time.monotonic() - clock.started
    return TrainSummary(
        bundle=options.out,
        descriptor=descriptor,
        evaluation=evaluation,
        train_counts=counts[Part.TRAIN],
        test_counts=counts[Part.TEST],
        excluded=feats.excluded,
        train_auroc=train_auroc,
        mllib_max_difference=mllib_difference,
        seconds=clock.seconds,
    )
