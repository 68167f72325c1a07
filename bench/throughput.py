"""Throughput of cxr-stream next to its peers, on the same real X-rays, in one run.

Peers, all scoring the same N references (the sixteen sample chest X-rays, repeated):
  keras-loop        plain Keras: load_img(nearest, 150x150) -> preprocess -> model.predict, batches of B
  keras-eager       the same inputs through eager `model(x)` calls (what an uncompiled UDF would do)
  infer-eager       inference alone on already decoded inputs, eager `model(x)` per batch
  infer-graph       inference alone, through cxr-stream's compiled (tf.function) predict
  scorer            cxr-stream's per-row core (parse, fetch, decode, preprocess, compiled predict, triage,
                    message) in-process, no Spark, no Kafka
  stream            the whole system: embedded Kafka broker -> Spark Structured Streaming job -> Kafka,
                    from the first reference published to the last result read (model already warm)

Prints images/s for each and the ratio to keras-loop. Usage:
    .venv/bin/python -m bench.throughput [--images 128] [--batch 16] [--skip-stream]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from streaming import bundle as bundles
from streaming.contracts import Reference, Source
from streaming.fetch import FetchPolicy
from streaming.scoring import RawMessage, ScoringConfig, score_messages
from streaming.settings import Settings, default_bundle_dir, sample_images_dir


def timed(fn: Callable[[], object], repeat: int = 2) -> float:
    """Best of `repeat` wall times (after one untimed warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--only-stream", action="store_true", help="just the end-to-end run (for tuning)")
    args = parser.parse_args()

    paths = sorted(sample_images_dir().glob("*.jpeg"))
    paths = (paths * (args.images // len(paths) + 1))[: args.images]
    if args.only_stream:
        seconds = stream(paths)
        print(f"stream: {len(paths)} images in {seconds:.2f} s, {len(paths) / seconds:.1f} images/s")
        return

    import keras
    import tensorflow as tf

    descriptor = bundles.read_descriptor(default_bundle_dir())
    model_path = bundles.resolve_model_path(descriptor, default_bundle_dir())
    model = keras.models.load_model(model_path, compile=False)
    loaded = bundles.load(default_bundle_dir())

    def keras_inputs() -> np.ndarray:
        arrays = [keras.utils.img_to_array(keras.utils.load_img(p, target_size=(150, 150))) for p in paths]
        return np.stack(arrays) / 127.5 - 1.0

    def keras_loop() -> None:
        x = keras_inputs()
        for i in range(0, len(x), args.batch):
            tf.nn.softmax(model.predict(x[i : i + args.batch], verbose=0))

    def keras_eager() -> None:
        x = keras_inputs().astype(np.float32)
        for i in range(0, len(x), args.batch):
            tf.nn.softmax(model(x[i : i + args.batch], training=False))

    decoded = keras_inputs().astype(np.float32)

    def infer_eager() -> None:
        for i in range(0, len(decoded), args.batch):
            model(decoded[i : i + args.batch], training=False).numpy()

    def infer_compiled() -> None:
        loaded.predict(decoded, args.batch)

    config = ScoringConfig(
        fetch=FetchPolicy(allowed_roots=(sample_images_dir().resolve(),)), inference_batch_size=args.batch
    )
    messages = [
        RawMessage(Reference(event_id=str(uuid.uuid4()), uri=p.as_uri()).to_json(), Source("bench", 0, i))
        for i, p in enumerate(paths)
    ]

    def scorer() -> None:
        # In Spark each Arrow batch is one call; feed it the same way.
        for i in range(0, len(messages), 64):
            outcomes = score_messages(messages[i : i + 64], loaded, config)
            assert all(o.scored for o in outcomes)

    figures = {
        "keras-loop": timed(keras_loop),
        "keras-eager": timed(keras_eager),
        "scorer": timed(scorer),
        "infer-eager": timed(infer_eager),
        "infer-graph": timed(infer_compiled),
    }
    if not args.skip_stream:
        figures["stream"] = stream(paths)

    base = len(paths) / figures["keras-loop"]
    print(f"\n{len(paths)} images, batch {args.batch}, best of 2 after warm-up (stream: one timed run)")
    print(f"{'peer':<12} {'seconds':>8} {'images/s':>9} {'vs keras-loop':>14}")
    for name, seconds in figures.items():
        rate = len(paths) / seconds
        print(f"{name:<12} {seconds:>8.2f} {rate:>9.1f} {rate / base:>13.2f}x")


def stream(paths: list[Path]) -> float:
    from kafka import KafkaConsumer

    from producers.publish import ReferencePublisher
    from streaming.broker import EmbeddedBroker
    from streaming.pipeline import ScoringJob
    from streaming.spark import get_session

    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    base = Settings.load()
    with EmbeddedBroker(base.jvm_lib_dir, workdir=workdir / "kafka") as broker:
        broker.create_topics([base.input_topic, base.results_topic, base.dead_letter_topic], partitions=2)
        settings = base.model_copy(
            update={
                "kafka_bootstrap_servers": broker.bootstrap_servers,
                "checkpoint_dir": workdir / "checkpoint",
                "trigger_interval": "0 seconds",
                "max_offsets_per_trigger": 256,
            }
        )
        spark = get_session(settings, "cxr-bench")
        job = ScoringJob.create(settings, spark)
        job.start()
        assert job.wait_for_batches(1, 120)
        consumer = KafkaConsumer(
            settings.results_topic,
            settings.dead_letter_topic,
            auto_offset_reset="latest",
            **settings.kafka_python_config(KafkaConsumer.DEFAULT_CONFIG),
        )
        consumer.poll(timeout_ms=1000)  # join before publishing
        started = time.perf_counter()
        with ReferencePublisher.for_settings(settings) as publisher:
            publisher.send_all(Reference(event_id=str(uuid.uuid4()), uri=p.as_uri()) for p in paths)
        seen = 0
        while seen < len(paths):
            for records in consumer.poll(timeout_ms=500).values():
                seen += sum(1 for r in records if json.loads(r.value)["schema"] == "cxr.result/v1")
        elapsed = time.perf_counter() - started
        for progress in job.query.recentProgress if job.query else []:
            if progress.numInputRows:
                durations = {k: v for k, v in progress.durationMs.items() if v > 50}
                observed = progress.observedMetrics.get("cxr")
                work = {k: round(observed[k], 2) for k in ("pre_sum", "inf_sum")} if observed else {}
                print(f"  batch {progress.batchId}: {progress.numInputRows} rows, ms: {durations}, worker s: {work}")
        consumer.close()
        job.stop()
        spark.stop()
    return elapsed


if __name__ == "__main__":
    main()
