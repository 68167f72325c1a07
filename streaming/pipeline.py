"""The streaming query: Kafka references in, one result or one dead letter out for each, through one sink.

    Kafka source ─► score (pandas UDF: parse, fetch, decode, predict, triage, build message)
                 ─► observe (per-batch metrics) ─► Kafka sink (per-row `topic` column)

Spark and Kafka wiring only; the per-row logic is `scoring.score_messages`. The Kafka source commits
nothing to Kafka: progress lives in the checkpoint, so a restart resumes exactly after the last committed
micro-batch (the sink is at-least-once: a batch interrupted mid-write is written again).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery, StreamingQueryListener

from streaming import bundle as bundles
from streaming.decode import DecodeLimits
from streaming.fetch import FetchPolicy
from streaming.metrics import OBSERVATION, JobMetrics, QueryHealth, observed_columns
from streaming.scoring import ScoringConfig
from streaming.udf import score_column, warm_up

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


def scoring_config(settings: Settings, threads: int | None = None) -> ScoringConfig:
    """The executors' view of the settings (they never read the environment themselves)."""
    return ScoringConfig(
        fetch=FetchPolicy(
            allowed_roots=tuple(settings.allowed_roots),
            dicomweb_hosts=tuple(settings.dicomweb_allowed_hosts),
            max_bytes=settings.max_image_bytes,
            timeout_s=settings.fetch_timeout_s,
            dicomweb_token=settings.dicomweb_token.get_secret_value() if settings.dicomweb_token else None,
        ),
        limits=DecodeLimits(max_pixels=settings.max_image_pixels),
        inference_batch_size=settings.inference_batch_size,
        decode_threads=settings.decode_threads,
        inference_threads=threads,
        results_topic=settings.results_topic,
        dead_letter_topic=settings.dead_letter_topic,
        deadline_s=settings.reference_deadline_s,
        max_stuck_threads=settings.max_stuck_threads,
        dead_letter_payload_max_bytes=settings.dead_letter_payload_max_bytes,
        fault_injection=settings.fault_injection,
    )


def kafka_record() -> Column:
    """The struct the scorer reads from a Kafka source row (or a batch row shaped like one)."""
    return F.struct(
        F.col("value").cast("string").alias("value"),
        F.col("topic"),
        F.col("partition"),
        F.col("offset"),
        F.col("timestamp"),
    )


def scored(df: DataFrame, archive: Broadcast[bundles.BundleArchive], config: ScoringConfig) -> DataFrame:
    """Kafka rows → outcome rows (topic, key, value and the metric columns)."""
    return df.select(score_column(archive, config, kafka_record()).alias("o")).select("o.*")


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
        archive = bundles.pack(s.model_bundle)
        descriptor = self.descriptor = archive.descriptor
        self.metrics.set_model(descriptor.name, descriptor.version)
        broadcast = spark.sparkContext.broadcast(archive)
        config = scoring_config(s, inference_threads(s, spark))
        if s.warmup:
            workers = warm_up(spark, broadcast, config)
            log.info("model %s %s warm in %d Python worker(s)", descriptor.name, descriptor.version, workers)

        source = spark.readStream.format("kafka").options(**s.spark_kafka_options())
        source = source.option("subscribe", s.input_topic).option("startingOffsets", s.starting_offsets)
        source = source.option("failOnDataLoss", str(s.fail_on_data_loss).lower())
        if s.max_offsets_per_trigger:
            source = source.option("maxOffsetsPerTrigger", str(s.max_offsets_per_trigger))
        outcomes = scored(source.load(), broadcast, config).observe(OBSERVATION, *observed_columns())

        self._listener = _Listener(self.metrics, self.health)
        spark.streams.addListener(self._listener)
        Path(s.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        writer = (
            outcomes.select("topic", "key", "value")
            .writeStream.format("kafka")
            .options(**s.spark_kafka_options())
            .option("checkpointLocation", str(s.checkpoint_dir))
            .queryName(QUERY_NAME)
            .trigger(processingTime=s.trigger_interval)
        )
        self.query = writer.start()
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
