"""The scoring pandas UDF: the thin Spark edge around `scoring.score_messages`.

The model bundle arrives as a broadcast (bytes, shipped once per executor); each Python worker unpacks and
loads it on first use and keeps it while Spark reuses the worker (`spark.python.worker.reuse`), so there is no
reload per micro-batch. The iterator form of the UDF pays the lookup once per task, not per Arrow batch.
Warming up before the query starts also checks each worker's inference device, so a GPU configured but not
found stops the job at start-up with a `DeviceError`, not at its first batch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from streaming import logs
from streaming.bundle import BundleArchive, bundle_error_in, load_archive
from streaming.contracts import Source
from streaming.device import device_error_in
from streaming.scoring import Outcome, RawMessage, ScoringConfig, score_messages

if TYPE_CHECKING:
    from pyspark import Broadcast
    from pyspark.sql import Column, SparkSession

#: One row out per row in: where it goes, what it says, and the figures the observed metrics aggregate.
OUTCOME_SCHEMA = (
    "topic string, key string, value string, scored boolean, stage string, error string, "
    "latency_s double, inference_s double, preprocess_s double, stuck_threads int"
)
_OUTCOME_FIELDS = tuple(f.name for f in fields(Outcome))  # the schema above, in the same order


def _timestamp(value: Any) -> datetime | None:
    if value is None or pd.isna(value):
        return None
    moment = pd.Timestamp(value).to_pydatetime()
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _value(value: Any) -> bytes | str | None:
    """The record's value as it came: bytes from Kafka (never decoded by Spark or Arrow, so no byte sequence can
    fail the batch), text from a batch file, None for a tombstone."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    return value if isinstance(value, bytes | str) else bytes(value)


def _messages(frame: pd.DataFrame) -> list[RawMessage]:
    return [
        RawMessage(
            value=_value(value),
            source=Source(str(topic), int(partition), int(offset)),
            timestamp=_timestamp(ts),
        )
        for value, topic, partition, offset, ts in zip(
            frame["value"], frame["topic"], frame["partition"], frame["offset"], frame["timestamp"], strict=True
        )
    ]


def _frame(outcomes: list[Outcome]) -> pd.DataFrame:
    return pd.DataFrame([[getattr(o, f) for f in _OUTCOME_FIELDS] for o in outcomes], columns=list(_OUTCOME_FIELDS))


def scoring_udf(archive: Broadcast[BundleArchive], config: ScoringConfig) -> Callable[[Column], Column]:
    """The scoring UDF, applied to a struct of the Kafka columns value (binary), topic, partition, offset,
    timestamp. Build it once per job: Spark pickles a UDF's function once per UDF object, so a UDF built for
    every micro-batch pays that (and its registration) every time."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(OUTCOME_SCHEMA)  # type: ignore[call-overload]
    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        logs.silence_header_quoters()  # the worker's stderr ends up in the driver's log
        bundle = load_archive(archive.value, config.inference_threads, config.inference_device)
        for frame in batches:
            yield _frame(score_messages(_messages(frame), bundle, config))

    # Nondeterministic (it reads files and clocks): Spark must evaluate it exactly once per row, never
    # duplicate it when the struct's fields are expanded.
    return score.asNondeterministic()


@dataclass(frozen=True)
class WarmUp:
    """What warming up found: how many distinct Python workers hold the model, and the devices they predict on."""

    workers: int
    devices: tuple[str, ...]

    @classmethod
    def from_reports(cls, reports: Iterable[str]) -> WarmUp:
        """From the workers' reports, `"<host> <pid> <device>"` each (one per task; a reused worker repeats)."""
        distinct = {tuple(report.rsplit(" ", 2)) for report in reports}
        return cls(len(distinct), tuple(sorted({parts[-1] for parts in distinct})))

    def __str__(self) -> str:
        """For the driver's log: "2 Python worker(s) on gpu:0, gpu:1"."""
        return f"{self.workers} Python worker(s) on {', '.join(self.devices) or 'no device'}"


def warm_up(spark: SparkSession, archive: Broadcast[BundleArchive], config: ScoringConfig) -> WarmUp:
    """Load the model and trace its graph in the Python workers before the first real micro-batch.

    One task per core, so each reusable worker gets one. Raises `DeviceError` (a configuration error) when a
    worker's GPU is configured but not found, and `BundleError` when the model does not match its descriptor;
    Spark carries both to the driver as the text of a task failure.
    """
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("string")  # type: ignore[call-overload]
    def warm(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        bundle = load_archive(archive.value, config.inference_threads, config.inference_device)
        bundle.warm_up(config.inference_batch_size)
        report = f"{socket.gethostname()} {os.getpid()} {bundle.device}"
        for batch in batches:
            yield pd.Series([report] * len(batch))

    slots = spark.sparkContext.defaultParallelism
    try:
        rows = spark.range(slots, numPartitions=slots).select(warm("id").alias("report")).distinct().collect()
    except Exception as exc:
        # Configuration errors raised in a worker come back as Spark's text: raise them as themselves (exit 2).
        config_error = device_error_in(str(exc)) or bundle_error_in(str(exc))
        if config_error is not None:
            raise config_error from None
        raise
    return WarmUp.from_reports(row["report"] for row in rows)
