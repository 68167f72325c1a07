"""`cxr evaluate`: any bundle, scored on labelled images by the stream's own scorer, as a report.

The images go through exactly what the streaming job runs (`pipeline.scored` over the scoring UDF: fetch,
decode, preprocess as the bundle says, predict), so a site compares a candidate model with the running one on
the numbers the stream would produce, before the switch. Images that cannot be scored are counted by reason and
left out of the metrics, as the stream would dead-letter them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from streaming import bundle as bundles
from streaming.contracts import REFERENCE_SCHEMA
from streaming.pipeline import inference_threads, scored
from streaming.scoring import scoring_config
from streaming.settings import Settings
from streaming.sources import kafka_rows
from streaming.udf import scoring_udf
from training.data import DataError, LabelledData, read_labelled
from training.metrics import Evaluation, evaluate
from training.report import ReportFiles, write_report

log = logging.getLogger(__name__)
_OUTCOME = "event_id string, scores map<string, double>, stage string, error string"


@dataclass(frozen=True)
class Scored:
    """Labels and the model's probabilities (rows in the bundle's label order) for what could be scored."""

    labels: tuple[str, ...]
    y_true: tuple[str, ...]
    scores: np.ndarray
    #: "stage/error" → count, for the images the stream would have dead-lettered
    unscored: dict[str, int] = field(default_factory=dict)


def check_labels(data_labels: tuple[str, ...], model_labels: tuple[str, ...]) -> None:
    """Every label in the data must be one the model predicts (a typo in a folder name is not a new class)."""
    unknown = sorted(set(data_labels) - set(model_labels))
    if unknown:
        raise DataError(
            f"labels in the data that the model does not predict: {', '.join(unknown)} "
            f"(the model's labels: {', '.join(model_labels)})"
        )


def references(frame: DataFrame) -> DataFrame:
    """(uri, label) rows with their own event id (to join the labels back) and reference message."""
    rows = frame.withColumn("event_id", F.concat(F.lit("eval-"), F.monotonically_increasing_id().cast("string")))
    value = F.to_json(F.struct(F.lit(REFERENCE_SCHEMA).alias("schema"), F.col("event_id"), F.col("uri")))
    return rows.select(
        "event_id",
        "uri",
        "label",
        F.encode(value, "UTF-8").alias("value"),
        F.monotonically_increasing_id().alias("offset"),
    )


def score_labelled(spark: SparkSession, settings: Settings, data: LabelledData) -> Scored:
    """The bundle of `settings` over the labelled rows, through the streaming job's scorer."""
    archive = bundles.pack(settings.model_bundle)
    descriptor = archive.descriptor
    check_labels(data.labels, descriptor.labels)
    config = scoring_config(settings, inference_threads(settings, spark))
    score = scoring_udf(spark.sparkContext.broadcast(archive), config)
    rows = references(data.frame).cache()
    try:
        slots = spark.sparkContext.defaultParallelism
        outcomes = scored(kafka_rows(rows, "evaluate").repartition(max(1, slots * 4)), score)
        parsed = outcomes.select(F.from_json("value", _OUTCOME).alias("o"), "scored", "stage", "error")
        joined = parsed.join(rows.select("event_id", "uri", "label"), F.col("o.event_id") == F.col("event_id"), "left")
        # In uri order: the bootstrap's resamples, and so the report, do not depend on how Spark split the work.
        collected = joined.select("uri", "label", "scored", "o.scores", "stage", "error").orderBy("uri").collect()
    finally:
        rows.unpersist()
    y_true, vectors, unscored = [], [], Counter[str]()
    for row in collected:
        if not row["scored"]:
            unscored[f"{row['stage']}/{row['error']}"] += 1
            continue
        y_true.append(row["label"])
        vectors.append([row["scores"][label] for label in descriptor.labels])
    matrix = np.asarray(vectors, dtype=np.float64).reshape(len(vectors), len(descriptor.labels))
    return Scored(descriptor.labels, tuple(y_true), matrix, dict(unscored))


@dataclass(frozen=True)
class EvaluationRun:
    evaluation: Evaluation
    files: ReportFiles
    unscored: dict[str, int]


def run_evaluation(spark: SparkSession, settings: Settings, source: Path, out_dir: Path) -> EvaluationRun:
    """Score `source` with the bundle of `settings` and write the report (the same report `cxr train` writes)."""
    descriptor = bundles.read_descriptor(settings.model_bundle)
    data = read_labelled(spark, source)
    result = score_labelled(spark, settings, data)
    if not result.y_true:
        raise DataError(f"none of the {sum(data.counts.values())} images of {source} could be scored")
    evaluation = evaluate(
        result.y_true,
        result.scores,
        result.labels,
        normal_labels=descriptor.normal_labels,
        rules=descriptor.triage,
    )
    files = write_report(
        evaluation,
        out_dir,
        title=f"{descriptor.name} {descriptor.version} on {source.name}",
        model=descriptor.identity,
        data={"source": str(source), "fingerprint": data.fingerprint, "split": "all", "counts": data.counts},
        extra={"unscored": result.unscored},
    )
    return EvaluationRun(evaluation, files, result.unscored)
