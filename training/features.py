"""Backbone features of labelled images, on Spark: the feature-extraction edge of `cxr train`.

Each image goes through the stream's own fetch → decode → preprocess (`scoring.prepare_each`, with its
per-image deadline and bounded decode pool), then the backbone, in chunks of `inference_batch_size`, while the
pool prepares the next chunk. An image that cannot be fetched, decoded or run yields its stage and error code,
exactly as the stream would dead-letter it, and is left out of training; nothing fails the job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from streaming import logs
from streaming.contracts import Reference
from streaming.errors import CxrError, ErrorCode, ScoreError
from streaming.scoring import InputRules, ScoringConfig, prepare_each
from training.backbone import BackboneArchive, load_extractor

if TYPE_CHECKING:
    from pyspark import Broadcast
    from pyspark.sql import Column, DataFrame, SparkSession

FEATURES_SCHEMA = "features array<float>, stage string, error string"


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """One image's features, or why it has none (stage and error code of the dead letter it would be)."""

    features: np.ndarray | None
    stage: str | None = None
    error: str | None = None

    @classmethod
    def failed(cls, error: CxrError) -> FeatureRow:
        return cls(None, error.stage.value, error.code.value)


def extract(
    uris: Sequence[str],
    backbone: Callable[[np.ndarray], np.ndarray],
    rules: InputRules,
    config: ScoringConfig,
) -> list[FeatureRow]:
    """One `FeatureRow` per uri, in order, each image prepared within the deadline the stream gives it."""
    prepared = prepare_each([Reference(event_id="train", uri=uri) for uri in uris], rules, config)
    rows: list[FeatureRow] = []
    size = config.inference_batch_size
    for start in range(0, len(uris), size):
        chunk = list(islice(prepared, min(size, len(uris) - start)))
        ready = [i for i, item in enumerate(chunk) if item.x is not None]
        out: list[FeatureRow] = [FeatureRow.failed(item.error) if item.error else FeatureRow(None) for item in chunk]
        if ready:
            try:
                inputs: list[np.ndarray] = [x for x in (chunk[i].x for i in ready) if x is not None]
                features = backbone(np.stack(inputs))
            except Exception as exc:  # a model failure costs its chunk, not the job
                failure = ScoreError(ErrorCode.MODEL_ERROR, f"the backbone failed on this batch ({type(exc).__name__})")
                features = None
                for i in ready:
                    out[i] = FeatureRow.failed(failure)
            if features is not None:
                for i, vector in zip(ready, features, strict=True):
                    if np.all(np.isfinite(vector)):
                        out[i] = FeatureRow(np.asarray(vector, dtype=np.float32))
                    else:
                        out[i] = FeatureRow.failed(
                            ScoreError(ErrorCode.MODEL_ERROR, "the backbone produced a non-finite feature")
                        )
        rows.extend(out)
    return rows


def _frame(rows: list[FeatureRow]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "features": [r.features for r in rows],
            "stage": [r.stage for r in rows],
            "error": [r.error for r in rows],
        }
    )


def features_udf(archive: Broadcast[BackboneArchive], config: ScoringConfig) -> Callable[[Column], Column]:
    """uri → struct(features, stage, error), the backbone loaded once per Python worker."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(FEATURES_SCHEMA)  # type: ignore[call-overload]
    def features(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        logs.silence_header_quoters()  # the worker's stderr ends up in the driver's log
        backbone = archive.value.backbone
        extractor = load_extractor(archive.value, config.inference_threads, config.inference_device)
        for uris in batches:
            yield _frame(extract([str(uri) for uri in uris], extractor, backbone, config))

    # It reads files and clocks: evaluated exactly once per row, never once per struct field.
    return features.asNondeterministic()


def partitions_for(rows: int, slots: int, per_task: int = 64) -> int:
    """Tasks for `rows` images: about `per_task` each (the progress moves, a failed task costs little), and at
    least one per core while there are images for them."""
    return max(1, min(rows, max(slots, -(-rows // per_task))))


def with_features(
    spark: SparkSession, frame: DataFrame, archive: Broadcast[BackboneArchive], config: ScoringConfig, rows: int
) -> DataFrame:
    """`frame` plus features, stage and error columns (lazy: the caller persists and materializes it)."""
    from pyspark.sql import functions as F

    slots = spark.sparkContext.defaultParallelism
    spread = frame.repartition(partitions_for(rows, slots))
    return spread.withColumn("f", features_udf(archive, config)(F.col("uri"))).select(
        *frame.columns, "f.features", "f.stage", "f.error"
    )
