"""The streaming query: Kafka references in, one result or one dead letter out for each, through one sink.

    Kafka source ─► foreachBatch: score (pandas UDF: parse, fetch, decode, predict, triage, build message)
                                  ─► observe (per-batch metrics) ─► Kafka (per-row `topic` column)

Spark and Kafka wiring only; the per-row logic is `scoring.score_messages`. The Kafka source commits
nothing to Kafka: progress lives in the checkpoint, so a restart resumes exactly after the last committed
micro-batch (the write is at-least-once: a batch interrupted mid-write is written again).

Each micro-batch is written by `BatchWriter` rather than a plain Kafka sink, so that a message which kills
its Python worker (a native decoder crash, an out-of-memory kill) costs only itself: the batch is run again,
then in halves, down to the one message that still kills its worker alone, which becomes a `worker_crashed`
dead letter. Without that, the query would fail on the same message after every restart.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import Column, DataFrame, Observation, Row, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery, StreamingQueryListener

from streaming import bundle as bundles
from streaming.contracts import Source
from streaming.metrics import JobMetrics, QueryHealth, observed_columns
from streaming.scoring import Outcome, RawMessage, ScoringConfig, crashed_outcome, scoring_config
from streaming.spark import V1_SOURCES, kafka_writes_observable
from streaming.udf import scoring_udf, warm_up

if TYPE_CHECKING:
    from pyspark import Broadcast

    from streaming.settings import Settings

log = logging.getLogger(__name__)
QUERY_NAME = "cxr-scoring"


def inference_threads(settings: Settings, spark: SparkSession) -> int | None:
    """TensorFlow threads per Python worker, as the session was configured for them (see `spark.worker_threads`).

    Spark gives each Python worker OMP_NUM_THREADS (the task's cores, or what cxr-stream set); TensorFlow's
    pool is sized to match, so concurrent workers do not oversubscribe the CPU.
    """
    if settings.inference_threads == 0:
        return None  # TensorFlow's own choice
    conf = spark.sparkContext.getConf()
    return int(conf.get("spark.executorEnv.OMP_NUM_THREADS") or conf.get("spark.task.cpus") or "1")


def kafka_source(spark: SparkSession, settings: Settings) -> DataFrame:
    """The input topic as a streaming DataFrame, read the way every cxr-stream query reads it."""
    source = spark.readStream.format("kafka").options(**settings.spark_kafka_options())
    source = source.option("subscribe", settings.input_topic).option("startingOffsets", settings.starting_offsets)
    source = source.option("failOnDataLoss", str(settings.fail_on_data_loss).lower())
    if settings.max_offsets_per_trigger:
        source = source.option("maxOffsetsPerTrigger", str(settings.max_offsets_per_trigger))
    tasks = min_partitions(settings, spark)
    if tasks:
        source = source.option("minPartitions", str(tasks))
    return source.load()


def min_partitions(settings: Settings, spark: SparkSession) -> int | None:
    """Tasks per micro-batch: configured, else the cluster's cores (Spark's default parallelism)."""
    if settings.min_partitions is not None:
        return settings.min_partitions or None
    return spark.sparkContext.defaultParallelism


def kafka_record() -> Column:
    """The struct the scorer reads from a Kafka source row (or a batch row shaped like one)."""
    return F.struct(
        F.col("value"),  # binary, as Kafka holds it: decoded in Python, where a bad byte fails one row only
        F.col("topic"),
        F.col("partition"),
        F.col("offset"),
        F.col("timestamp"),
    )


def scored(df: DataFrame, score: Callable[[Column], Column]) -> DataFrame:
    """Kafka rows → outcome rows (topic, key, value and the metric columns), through `udf.scoring_udf`."""
    return df.select(score(kafka_record()).alias("o")).select("o.*")


KAFKA_COLUMNS = ("value", "topic", "partition", "offset", "timestamp")
KAFKA_SCHEMA = "value binary, topic string, partition int, offset long, timestamp timestamp"
_WORKER_DIED = ("Python worker exited unexpectedly", "PYTHON_WORKER_EXITED_UNEXPECTEDLY")


def worker_died(exc: BaseException) -> bool:
    """Did a job fail because a Python worker process died (rather than for a reason retrying cannot fix)?"""
    text = str(exc)
    return any(marker in text for marker in _WORKER_DIED)


def pieces_to_retry(rows: list[Row]) -> list[list[Row]]:
    """How a batch whose worker died is split, depth first: halves, down to single messages."""
    middle = len(rows) // 2
    return [rows[middle:], rows[:middle]] if len(rows) > 1 else []


@dataclass
class BatchWriter:
    """Scores one micro-batch and writes its outcomes to Kafka; isolates a message that kills its worker."""

    spark: SparkSession
    archive: Broadcast[bundles.BundleArchive]
    config: ScoringConfig
    kafka_options: dict[str, str]  # the sink's: acks=all, idempotent (`Settings.spark_kafka_sink_options`)
    metrics: JobMetrics

    def __post_init__(self) -> None:
        # Built once: per micro-batch they would cost a pickling and a round of py4j calls each time.
        self._score = scoring_udf(self.archive, self.config)
        self._observed = observed_columns()

    def __call__(self, batch: DataFrame, batch_id: int) -> None:
        try:
            self.write(batch)
        except Exception as exc:
            if not worker_died(exc):
                raise
            log.warning("a Python worker died in micro-batch %d: scoring it again, in pieces if need be", batch_id)
            self.isolate(batch.select(*KAFKA_COLUMNS).collect())

    def write(self, batch: DataFrame) -> None:
        """Score and write; the batch's figures count only once its write succeeded."""
        observation = Observation("cxr-batch")  # not the name record_progress reads: never counted twice
        outcomes = scored(batch, self._score).observe(observation, *self._observed)
        outcomes.select("topic", "key", "value").write.format("kafka").mode("append").options(
            **self.kafka_options
        ).save()
        self.metrics.record_observed(observation.get)  # filled by the write (V2 path: see spark.base_conf)

    def isolate(self, rows: list[Row]) -> None:
        """Whole again first (the worker may have died of something else), then halves, then single messages.

        A piece whose worker dies again may have written part of its outcomes: those are written twice, and
        consumers de-duplicate on `event_id` as for any replay.
        """
        pending = [rows]
        while pending:
            piece = pending.pop()
            try:
                self.write(self.spark.createDataFrame(piece, KAFKA_SCHEMA))
            except Exception as exc:
                if not worker_died(exc):
                    raise
                if len(piece) == 1:
                    self.dead_letter_crashed(piece[0])
                else:
                    pending.extend(pieces_to_retry(piece))

    def dead_letter_crashed(self, row: Row) -> None:
        message = RawMessage(
            value=bytes(row["value"]) if row["value"] is not None else None,
            source=Source(row["topic"], int(row["partition"]), int(row["offset"])),
        )
        log.error("a reference kills the scoring worker every time: dead-lettered as worker_crashed")
        self.write_crashed(crashed_outcome(message, self.config))

    def write_crashed(self, outcome: Outcome) -> None:
        """Where a `worker_crashed` dead letter goes: the Kafka sink here (a batch writes to its own output)."""
        frame = self.spark.createDataFrame(
            [(outcome.topic, outcome.key, outcome.value)], "topic string, key string, value string"
        )
        frame.write.format("kafka").mode("append").options(**self.kafka_options).save()
        self.metrics.record_dead_letter(outcome.stage or "score", outcome.error or "worker_crashed")


class _Listener(StreamingQueryListener):
    """Feeds progress and lifecycle of one query (by id) into the metrics and health."""

    def __init__(self, metrics: JobMetrics, health: QueryHealth) -> None:
        self.metrics, self.health = metrics, health
        self.query_id: str | None = None
        self.progressed = threading.Condition()
        self.batches = 0

    def _mine(self, query_id: Any) -> bool:
        return self.query_id is None or str(query_id) == self.query_id

    def onQueryStarted(self, event: Any) -> None:
        if self._mine(event.id):
            self.health.started()
            self.metrics.query_up.set(1)

    def onQueryProgress(self, event: Any) -> None:
        if not self._mine(event.progress.id):
            return
        try:
            self.metrics.record_progress(json.loads(event.progress.json))
        except Exception:  # a metrics bug must never stop the listener bus
            log.exception("could not record query progress")
        self.health.progressed()
        with self.progressed:
            self.batches += 1
            self.progressed.notify_all()

    def onQueryIdle(self, event: Any) -> None:
        if self._mine(event.id):
            self.health.progressed()

    def onQueryTerminated(self, event: Any) -> None:
        if self._mine(event.id):
            failure = event.exception.splitlines()[0][:300] if event.exception else None
            self.health.terminated(failure)
            self.metrics.query_up.set(0)


@dataclass
class ScoringJob:
    """The running job: session, broadcast model, query, metrics. `start()`, then `await_termination()`."""

    settings: Settings
    metrics: JobMetrics
    health: QueryHealth
    spark: SparkSession | None = None
    query: StreamingQuery | None = None
    descriptor: bundles.Descriptor | None = None
    _listener: _Listener | None = None

    @classmethod
    def create(cls, settings: Settings, spark: SparkSession, metrics: JobMetrics | None = None) -> ScoringJob:
        return cls(settings, metrics or JobMetrics(), QueryHealth(settings.ready_stale_after_s), spark)

    def start(self) -> StreamingQuery:
        spark, s = self.spark, self.settings
        assert spark is not None
        if not kafka_writes_observable(spark):
            raise ValueError(f"{V1_SOURCES} must not list kafka: the job's metrics need Kafka writes on DataSource V2")
        archive = bundles.pack(s.model_bundle)
        descriptor = self.descriptor = archive.descriptor
        self.metrics.set_model(descriptor.name, descriptor.version)
        broadcast = spark.sparkContext.broadcast(archive)
        config = scoring_config(s, inference_threads(s, spark))
        if s.warmup:
            warm = warm_up(spark, broadcast, config)
            log.info("model %s %s warm in %s", descriptor.name, descriptor.version, warm)
            self.metrics.set_device(warm.devices)

        writer = BatchWriter(spark, broadcast, config, s.spark_kafka_sink_options(), self.metrics)

        self._listener = _Listener(self.metrics, self.health)
        spark.streams.addListener(self._listener)
        Path(s.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        self.query = (
            kafka_source(spark, s)
            .writeStream.foreachBatch(writer)
            .option("checkpointLocation", str(s.checkpoint_dir))
            .queryName(QUERY_NAME)
            .trigger(processingTime=s.trigger_interval)
            .start()
        )
        self._listener.query_id = str(self.query.id)
        # The started event may have fired before the id was known.
        if self.query.isActive:
            self.health.started()
            self.metrics.query_up.set(1)
        return self.query

    def wait_for_batches(self, count: int, timeout_s: float) -> bool:
        """Block until `count` micro-batches have reported progress (for tests and the demo)."""
        assert self._listener is not None
        with self._listener.progressed:
            return self._listener.progressed.wait_for(lambda: self._listener.batches >= count, timeout_s)  # type: ignore[union-attr]

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop between micro-batches when possible, so no batch is aborted half-written."""
        if self.query is not None and self.query.isActive:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and self.query.status.get("isTriggerActive"):
                time.sleep(0.1)
            self.query.stop()
        if self._listener is not None and self.spark is not None:
            self.spark.streams.removeListener(self._listener)
            self._listener = None
        self.health.terminated(self.health.failure)
        self.metrics.query_up.set(0)
