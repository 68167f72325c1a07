"""`cxr batch`: score a folder or a file of references in one Spark batch job (backfill).

The same scorer as the streaming job (`pipeline.scored`), on a static DataFrame: results and dead letters go
to the Kafka topics (so the worklist picks them up), or to JSON-lines folders with `--output`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from producers.folder import references, scan
from streaming import bundle as bundles
from streaming.contracts import now_utc
from streaming.pipeline import inference_threads, scored
from streaming.scoring import scoring_config
from streaming.settings import Settings
from streaming.udf import scoring_udf, warm_up

log = logging.getLogger(__name__)
_SCHEMA = "value binary, topic string, partition int, offset long, timestamp timestamp"


@dataclass(frozen=True)
class BatchSummary:
    scored: int
    dead_letters: int


def reference_values(source: Path) -> list[bytes]:
    """Reference messages from a folder of images, or from a file with one JSON message per line (as bytes,
    like Kafka values: a line that is not UTF-8 becomes its own dead letter, not a failed job)."""
    if source.is_dir():
        return [ref.to_json().encode("utf-8") for ref in references(scan(source))]
    with source.open("rb") as handle:
        return [line.rstrip(b"\r\n") for line in handle if line.strip()]


def references_frame(spark: SparkSession, source: Path) -> DataFrame:
    """Rows shaped like the Kafka source's, so the scorer cannot tell a backfill from the stream."""
    values = reference_values(source)
    moment = now_utc().replace(tzinfo=None)  # Spark's session time zone is UTC
    rows = [(value, f"batch:{source.name}", 0, i, moment) for i, value in enumerate(values)]
    slots = spark.sparkContext.defaultParallelism
    return spark.createDataFrame(rows, _SCHEMA).repartition(max(1, min(slots, len(rows))))


def run_batch(spark: SparkSession, settings: Settings, source: Path, output: Path | None = None) -> BatchSummary:
    archive = bundles.pack(settings.model_bundle)
    broadcast = spark.sparkContext.broadcast(archive)
    config = scoring_config(settings, inference_threads(settings, spark))
    if settings.warmup:
        warm_up(spark, broadcast, config)
    outcomes = scored(references_frame(spark, source), scoring_udf(broadcast, config))
    outcomes = outcomes.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = {row["scored"]: row["count"] for row in outcomes.groupBy("scored").count().collect()}
        if output is not None:
            for name, flag in (("results", True), ("dead-letter", False)):
                (
                    outcomes.where(F.col("scored") == flag)
                    .select("value")
                    .coalesce(1)
                    .write.mode("overwrite")
                    .text(str(output / name))
                )
        else:
            (
                outcomes.select("topic", "key", "value")
                .write.format("kafka")
                .mode("append")
                .options(**settings.spark_kafka_sink_options())
                .save()
            )
    finally:
        outcomes.unpersist()
    return BatchSummary(scored=counts.get(True, 0), dead_letters=counts.get(False, 0))
