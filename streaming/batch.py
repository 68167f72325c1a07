"""`cxr batch`: score a folder or a table of references with the stream's scorer, in resumable chunks (backfill).

Where the references come from is `streaming.sources` (Spark reads them; the driver never lists them). They
are scored by the stream's own code, `pipeline.scored` over `udf.scoring_udf`, so results and dead letters are
the stream's messages under the stream's rules; a reference that kills its Python worker is isolated the way
the stream isolates it (`pipeline.BatchWriter`), and becomes a `score`/`worker_crashed` dead letter.

Outcomes go to the Kafka topics (the default, acks=all: the worklist picks them up), or with an output folder
to `DIR/results/` and `DIR/dead-letter/`, as JSON lines (one message per line, as on the topics) or as Parquet
(the message in `value`, with typed columns beside it: `PARQUET_RESULT_COLUMNS`, `PARQUET_DEAD_LETTER_COLUMNS`).

Resumable. A run first reads back, with Spark, the results already written (the results topic from earliest
to latest, or `DIR/results/`) and leaves out every reference that has a result from the same model name and
version; dead letters are retried. The rest is done in chunks of about `chunk_size` references (a hash of the
event id picks the chunk), each written and committed before the next starts:

- To files, a chunk is two appends (results, then dead letters), one file each, which Spark's file commit
  protocol makes visible only once complete (a killed write leaves a `_temporary/` folder that readers skip).
  A kill loses the chunk in flight, nothing else, and writes no result twice; a kill between its two appends
  loses its dead letters, whose references the next run retries.
- To Kafka, a chunk is one write, not a transaction: a kill mid-chunk leaves part of its outcomes on the topics.
  The next run skips the references whose result made it and scores the rest again, so the duplicates are the
  dead letters of that one chunk at most (as everywhere in cxr-stream delivery is at-least-once: consumers
  de-duplicate on `event_id`). A task Spark retries within a run may also send its records twice.

A reference without a readable event id (a line that is not JSON, a table row without a uri) never has a result,
so every run dead-letters it again. Two runs over the same output at the same time would both score everything
they find undone: run one at a time.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from streaming import bundle as bundles
from streaming.metrics import JobMetrics
from streaming.pipeline import BatchWriter, inference_threads, scored
from streaming.scoring import Outcome, scoring_config
from streaming.settings import Settings
from streaming.sources import REFERENCE_COLUMNS, batch_references, kafka_rows, source_topic, table_format
from streaming.udf import warm_up

log = logging.getLogger(__name__)
#: References per chunk: a kill loses at most this much work, and each chunk costs a few Spark jobs (~1 s).
DEFAULT_CHUNK_SIZE = 2000
OUTPUT_FORMATS = ("jsonl", "parquet")
#: Task outputs are moved into place only when the whole write commits (Spark's default, made explicit).
_COMMITTER = {"mapreduce.fileoutputcommitter.algorithm.version": "1"}
_FILE_SUFFIXES = {".txt": "jsonl", ".parquet": "parquet"}
_RESULT_FIELDS = (
    "event_id string, study_uid string, model struct<name: string, version: string>, scores map<string, double>, "
    "top_finding string, priority string, scored_at string, latency_ms double"
)
_DEAD_LETTER_FIELDS = "event_id string, stage string, error string, failed_at string"
#: The columns of a Parquet output: the message as on the topics, and typed copies of what queries filter on.
PARQUET_RESULT_COLUMNS = (
    "key",
    "value",
    "event_id",
    "study_uid",
    "model_name",
    "model_version",
    "scores",
    "top_finding",
    "priority",
    "scored_at",
    "latency_ms",
)
PARQUET_DEAD_LETTER_COLUMNS = ("key", "value", "event_id", "stage", "error", "failed_at")


class OutputError(ValueError):
    """An output the batch cannot use as asked (a folder holding the other format, Parquet without a folder):
    a configuration for the operator to fix."""


@dataclass(frozen=True)
class ModelId:
    name: str
    version: str


@dataclass(frozen=True)
class BatchSummary:
    """What one run did. `skipped`: references that already had a result from this model (earlier runs);
    `not_images`: listed files that are not PNG, JPEG or DICOM; `remaining`: left for the next run (stopped)."""

    scored: int
    dead_letters: int
    skipped: int = 0
    not_images: int = 0
    chunks: int = 0
    remaining: int = 0

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    def line(self, where: str) -> str:
        """The one-line summary `cxr batch` prints."""
        text = (
            f"scored {self.scored}, dead-lettered {self.dead_letters}, skipped {self.skipped} (already done), "
            f"not images {self.not_images} → {where}"
        )
        if self.remaining:
            text += f"; stopped with {self.remaining} left: run it again to finish"
        return text


def chunk_count(references: int, chunk_size: int) -> int:
    """Chunks for `references` at about `chunk_size` each (a hash picks each reference's chunk)."""
    return math.ceil(references / chunk_size) if references else 0


def written_formats(names: list[str]) -> set[str]:
    """The output formats a folder's data files were written in ('jsonl', 'parquet'), from their suffixes."""
    found = set()
    for name in names:
        if name.startswith(("_", ".")):
            continue
        for suffix, fmt in _FILE_SUFFIXES.items():
            if name.endswith(suffix):
                found.add(fmt)
    return found


# ------------------------------------------------------------------------------------------------- outputs


class Output(Protocol):
    """Where outcomes go, and where the results of earlier runs are read back from."""

    def describe(self) -> str: ...

    def done(self, spark: SparkSession, model: ModelId) -> DataFrame | None:
        """Event ids (column `event_id`) that already have a result from `model`; None when nothing was written."""
        ...

    def write(self, outcomes: DataFrame, results: int, dead_letters: int) -> None:
        """Write outcome rows (topic, key, value, scored), `results` and `dead_letters` of them, and commit."""
        ...


def _of_model(event_id: Column, name: Column, version: Column, model: ModelId) -> Column:
    return event_id.isNotNull() & (name == F.lit(model.name)) & (version == F.lit(model.version))


@dataclass(frozen=True)
class KafkaOutput:
    settings: Settings

    def describe(self) -> str:
        return f"{self.settings.results_topic} / {self.settings.dead_letter_topic}"

    def done(self, spark: SparkSession, model: ModelId) -> DataFrame | None:
        topic = (
            spark.read.format("kafka")
            .options(**self.settings.spark_kafka_options())
            # A pattern, not `subscribe`: a results topic that does not exist yet is empty, not an error.
            .option("subscribePattern", f"\\Q{self.settings.results_topic}\\E")
            .option("startingOffsets", "earliest")
            .option("endingOffsets", "latest")
            .option("failOnDataLoss", "false")  # results that retention deleted meanwhile are simply redone
            .load()
        )
        body = topic.select(F.col("value").cast("string").alias("v"))
        event_id, name, version = (
            F.get_json_object("v", path) for path in ("$.event_id", "$.model.name", "$.model.version")
        )
        return body.where(_of_model(event_id, name, version, model)).select(event_id.alias("event_id"))

    def write(self, outcomes: DataFrame, results: int, dead_letters: int) -> None:
        if results + dead_letters == 0:
            return
        outcomes.select("topic", "key", "value").write.format("kafka").mode("append").options(
            **self.settings.spark_kafka_sink_options()
        ).save()


@dataclass(frozen=True)
class FileOutput:
    """`folder/results/` and `folder/dead-letter/`, as JSON lines or Parquet, one file per chunk each."""

    folder: Path
    fmt: str = "jsonl"

    def __post_init__(self) -> None:
        if self.fmt not in OUTPUT_FORMATS:
            raise OutputError(f"unknown output format {self.fmt!r} (known: {', '.join(OUTPUT_FORMATS)})")
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"the output {self.folder} is a file, not a folder")
        for name in ("results", "dead-letter"):
            place = self.folder / name
            found = written_formats(os.listdir(place)) - {self.fmt} if place.is_dir() else set()
            if found:
                raise OutputError(
                    f"{place} holds {', '.join(sorted(found))} output: write {self.fmt} to another folder, or "
                    f"resume it with --format {min(found)}"
                )

    def describe(self) -> str:
        return f"{self.folder}/results, {self.folder}/dead-letter ({self.fmt})"

    def done(self, spark: SparkSession, model: ModelId) -> DataFrame | None:
        place = self.folder / "results"
        if not place.is_dir():
            return None
        if self.fmt == "parquet":
            table = spark.read.schema("event_id string, model_name string, model_version string").parquet(str(place))
            event_id, name, version = F.col("event_id"), F.col("model_name"), F.col("model_version")
        else:
            table = spark.read.text(str(place))
            event_id, name, version = (
                F.get_json_object("value", path) for path in ("$.event_id", "$.model.name", "$.model.version")
            )
        return table.where(_of_model(event_id, name, version, model)).select(event_id.alias("event_id"))

    def write(self, outcomes: DataFrame, results: int, dead_letters: int) -> None:
        # Results first: a kill between the two appends loses dead letters only, and those are retried.
        for name, flag, count in (("results", True, results), ("dead-letter", False, dead_letters)):
            if not count:
                continue
            rows = outcomes.where(F.col("scored") == F.lit(flag))
            if self.fmt == "parquet":
                frame, kind = (_result_columns(rows) if flag else _dead_letter_columns(rows)), "parquet"
            else:
                frame, kind = rows.select("value"), "text"
            # One file per append: committing it is a single rename, so it shows whole or not at all.
            frame.coalesce(1).write.mode("append").options(**_COMMITTER).format(kind).save(str(self.folder / name))


def _result_columns(rows: DataFrame) -> DataFrame:
    body = F.from_json("value", _RESULT_FIELDS)
    return rows.select("key", "value", body.alias("b")).select(
        "key",
        "value",
        "b.event_id",
        "b.study_uid",
        F.col("b.model.name").alias("model_name"),
        F.col("b.model.version").alias("model_version"),
        "b.scores",
        "b.top_finding",
        "b.priority",
        F.col("b.scored_at").cast("timestamp").alias("scored_at"),
        "b.latency_ms",
    )


def _dead_letter_columns(rows: DataFrame) -> DataFrame:
    body = F.from_json("value", _DEAD_LETTER_FIELDS)
    return rows.select("key", "value", body.alias("b")).select(
        "key", "value", "b.event_id", "b.stage", "b.error", F.col("b.failed_at").cast("timestamp").alias("failed_at")
    )


def output_for(settings: Settings, folder: Path | None, fmt: str = "jsonl") -> Output:
    """Kafka without a folder; files in `fmt` with one (`OutputError` for Parquet without a folder)."""
    if folder is None:
        if fmt != "jsonl":
            raise OutputError(f"--format {fmt} writes files: it needs --output DIR (Kafka holds JSON messages)")
        return KafkaOutput(settings)
    return FileOutput(folder, fmt)


# ------------------------------------------------------------------------------------------------- scoring


@dataclass
class ChunkWriter(BatchWriter):
    """The stream's micro-batch writer (`pipeline.BatchWriter`: score, and isolate a reference that kills its
    worker) with the batch's output and counts: a chunk's figures count once its write has committed."""

    output: Output
    results: int = 0
    dead_letters: int = 0

    def write(self, batch: DataFrame) -> None:
        outcomes = scored(batch, self._score).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            # Materialises the outcomes in parallel first: the writes then read them from the cache.
            counts = {row["scored"]: row["count"] for row in outcomes.groupBy("scored").count().collect()}
            results, dead_letters = counts.get(True, 0), counts.get(False, 0)
            self.output.write(outcomes, results, dead_letters)
        finally:
            outcomes.unpersist()
        self.results += results
        self.dead_letters += dead_letters

    def write_crashed(self, outcome: Outcome) -> None:
        frame = self.spark.createDataFrame(
            [(outcome.topic, outcome.key, outcome.value, False)],
            "topic string, key string, value string, scored boolean",
        )
        self.output.write(frame, 0, 1)
        self.dead_letters += 1


def _chunk_key() -> Column:
    """What picks a reference's chunk: its event id (or, without one, its message), the same when recomputed."""
    return F.when(F.col("event_id").isNotNull(), F.xxhash64("event_id")).otherwise(F.xxhash64("value"))


@dataclass(frozen=True)
class _Plan:
    """What a run has to do, once the source and the output have been read."""

    todo: DataFrame  # REFERENCE_COLUMNS and `_chunk_key`, persisted
    remaining: int
    skipped: int
    not_images: int


def _plan(spark: SparkSession, references: DataFrame, sink: Output, model: ModelId, progress: bool | None) -> _Plan:
    """Lists the source (on the executors) and leaves out what already has a result from `model`."""
    from streaming.progress import spark_progress

    with spark_progress(spark, "reading references", enabled=progress):
        counts = references.agg(F.count(F.lit(1)), F.sum(F.when(F.col("value").isNull(), 1).otherwise(0))).first()
        listed, not_images = (int(counts[0]), int(counts[1] or 0)) if counts is not None else (0, 0)
        images = references.where(F.col("value").isNotNull())
        done = sink.done(spark, model)
        todo = images.join(done, "event_id", "left_anti") if done is not None else images
        # A few even partitions (a folder lists as one per 128 MB of images): each chunk scans them all.
        parts = max(spark.sparkContext.defaultParallelism, int(spark.conf.get("spark.sql.shuffle.partitions") or 1))
        todo = todo.withColumn("_chunk_key", _chunk_key()).repartition(parts).persist(StorageLevel.MEMORY_AND_DISK)
        remaining = todo.count()
    references.unpersist()  # what is left to do is cached on its own now
    return _Plan(todo, remaining, listed - not_images - remaining, not_images)


def run_batch(
    spark: SparkSession,
    settings: Settings,
    source: Path,
    output: Path | None = None,
    *,
    output_format: str = "jsonl",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> BatchSummary:
    """Score every reference of `source` that has no result from this model in the output yet, chunk by chunk.

    `progress`: draw the progress bar (None: when stderr is a terminal; logged lines otherwise). `stop` is asked
    between chunks (SIGTERM): the chunk in flight finishes and commits, the rest is left for the next run.
    Raises `sources.SourceError` or `OutputError` for a source or output to fix, before any scoring."""
    if chunk_size < 1:
        raise OutputError(f"the chunk size must be at least 1, not {chunk_size}")
    sink = output_for(settings, output, output_format)
    table_format(source)  # an unknown table format stops us before anything is loaded
    archive = bundles.pack(settings.model_bundle)
    model = ModelId(archive.descriptor.name, archive.descriptor.version)
    references = batch_references(spark, source).persist(StorageLevel.MEMORY_AND_DISK)
    plan: _Plan | None = None
    try:
        plan = _plan(spark, references, sink, model, progress)
        chunks = chunk_count(plan.remaining, chunk_size)
        log.info(
            "%d reference(s) to score in %d chunk(s); %d already scored by %s %s; %d listed file(s) not images",
            plan.remaining,
            chunks,
            plan.skipped,
            model.name,
            model.version,
            plan.not_images,
        )
        summary = BatchSummary(0, 0, plan.skipped, plan.not_images)
        if chunks:
            summary = _score(spark, settings, archive, plan, sink, source, chunks, progress, stop, summary)
        return summary
    finally:
        if plan is not None:
            plan.todo.unpersist()
        references.unpersist()


def _score(
    spark: SparkSession,
    settings: Settings,
    archive: bundles.BundleArchive,
    plan: _Plan,
    sink: Output,
    source: Path,
    chunks: int,
    progress: bool | None,
    stop: Callable[[], bool],
    summary: BatchSummary,
) -> BatchSummary:
    """Scores and writes the plan's references chunk by chunk; asks `stop` before each chunk."""
    from streaming.progress import spark_progress

    broadcast = spark.sparkContext.broadcast(archive)
    config = scoring_config(settings, inference_threads(settings, spark))
    if settings.warmup:
        log.info("model warm in %s", warm_up(spark, broadcast, config))
    writer = ChunkWriter(spark, broadcast, config, settings.spark_kafka_sink_options(), JobMetrics(), output=sink)
    parts = max(1, min(spark.sparkContext.defaultParallelism, math.ceil(plan.remaining / chunks)))
    topic = source_topic(source)
    written = 0
    with spark_progress(spark, "scoring", total=plan.remaining, unit="references", enabled=progress) as bar:
        for index in range(chunks):
            if stop():
                log.warning("stopping on request after %d of %d chunk(s)", written, chunks)
                break
            chunk = plan.todo.where(F.pmod(F.col("_chunk_key"), F.lit(chunks)) == index).select(*REFERENCE_COLUMNS)
            before = writer.results + writer.dead_letters
            writer(kafka_rows(chunk.repartition(parts), topic), index)
            bar.advance(writer.results + writer.dead_letters - before)
            written += 1
    answered = writer.results + writer.dead_letters
    return replace(
        summary,
        scored=writer.results,
        dead_letters=writer.dead_letters,
        chunks=written,
        remaining=max(0, plan.remaining - answered) if written < chunks else 0,
    )
