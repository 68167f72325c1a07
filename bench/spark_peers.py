"""The Spark peers: the same source, session and settings as `cxr run`, another way of applying the model.

load-per-batch     cxr-stream's query with the model loaded inside every micro-batch (the common mistake)
predict-batch-udf  Spark's own `pyspark.ml.functions.predict_batch_udf` (the model cached per Python
                   worker, batches of 16), after a pandas UDF that decodes with cxr-stream's code, written
                   with Spark's plain Kafka sink

python -m bench.spark_peers VARIANT BUNDLE_DIR   (Kafka, topics and checkpoint from the CXR_* environment)
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql.functions import pandas_udf

from streaming.bundle import load, load_model_file, read_descriptor, resolve_model_path
from streaming.contracts import dumps, now_utc, parse_reference
from streaming.pipeline import kafka_record, kafka_source, scoring_config
from streaming.scoring import prepare, result_body, score_messages
from streaming.settings import Settings
from streaming.spark import get_session
from streaming.udf import OUTCOME_SCHEMA, _frame, _messages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variant", choices=("load-per-batch", "predict-batch-udf"))
    parser.add_argument("bundle", type=Path)
    args = parser.parse_args()
    settings = Settings.load()
    spark = get_session(settings, f"bench-{args.variant}")
    config = scoring_config(settings)
    descriptor = read_descriptor(args.bundle)
    model_path = resolve_model_path(descriptor, args.bundle)
    kafka_options = settings.spark_kafka_options()
    source = kafka_source(spark, settings)

    if args.variant == "load-per-batch":

        @pandas_udf(OUTCOME_SCHEMA)  # type: ignore[call-overload]
        def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            bundle = load_model_file(descriptor, model_path)  # the mistake: a fresh model every micro-batch
            for frame in batches:
                yield _frame(score_messages(_messages(frame), bundle, config))

        def write(batch: DataFrame, batch_id: int) -> None:
            outcomes = batch.select(score.asNondeterministic()(kafka_record()).alias("o")).select("o.*")
            outcomes.select("topic", "key", "value").write.format("kafka").mode("append").options(
                **kafka_options
            ).save()

        writer = source.writeStream.foreachBatch(write)
    else:
        from pyspark.ml.functions import predict_batch_udf
        from pyspark.sql.types import ArrayType, FloatType

        spec = descriptor.input

        @pandas_udf("array<float>")  # type: ignore[call-overload]
        def decode(values: pd.Series) -> pd.Series:
            return pd.Series([prepare(parse_reference(v), descriptor, config).ravel() for v in values])

        def make_predict_fn():  # type: ignore[no-untyped-def]
            bundle = load(args.bundle)
            return lambda x: bundle.predict(x, 16)

        classify = predict_batch_udf(
            make_predict_fn,
            return_type=ArrayType(FloatType()),
            batch_size=16,
            input_tensor_shapes=[[spec.height, spec.width, spec.channels]],
        )

        @pandas_udf("string")  # type: ignore[call-overload]
        def result(values: pd.Series, probabilities: pd.Series) -> pd.Series:
            scored_at = now_utc()
            bodies = []
            for value, probs in zip(values, probabilities, strict=True):
                ref = parse_reference(value)
                bodies.append(dumps(result_body(ref, np.asarray(probs), descriptor, scored_at)))
            return pd.Series(bodies)

        scored = source.select("value").withColumn("p", classify(decode("value")))
        out = scored.select(result("value", "p").alias("value"))
        writer = out.writeStream.format("kafka").options(**kafka_options).option("topic", settings.results_topic)

    query = (
        writer.option("checkpointLocation", str(settings.checkpoint_dir))
        .trigger(processingTime=settings.trigger_interval)
        .start()
    )
    print("ready", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    while query.isActive and not stopped.wait(0.5):
        pass
    query.stop()
    spark.stop()


if __name__ == "__main__":
    main()
